"""scripts/round_gains.py: paired round-on-round gains over seeds, hand-computed."""

from __future__ import annotations

from scripts import round_gains
from tests.test_report import make_run

#: seed -> mAP per round; round 1 gains 0.05/0.04/0.06 (mean 0.05, sd 0.01: CI ± 0.025 > 0),
#: round 2 gains 0.05/0.05/0.02 (mean 0.04, sd 0.0173: CI ± 0.043 contains 0)
MAPS = {0: [0.30, 0.35, 0.40], 1: [0.32, 0.36, 0.41], 2: [0.31, 0.37, 0.39]}


def test_round_table_pairs_each_seed_with_its_previous_round(tmp_path):
    for seed, maps in MAPS.items():
        make_run(tmp_path, "random", seed, maps)
    rows = round_gains.round_table([tmp_path], "mAP")
    assert rows[0].startswith("| round | images | mAP per seed (0/1/2) |")
    assert rows[2].startswith("| 0 | 10 | 0.300 / 0.320 / 0.310 | 0.310 ± 0.025 (n=3) |")
    assert "| +0.050 ± 0.025 | significant (95% CI excludes 0) — better |" in rows[3]
    assert "| +0.040 ± 0.043 | not significant (95% CI contains 0) |" in rows[4]
    assert len(rows) == 2 + 3


def test_round_table_stops_at_the_shortest_run_and_refuses_two_strategies(tmp_path, capsys):
    make_run(tmp_path, "random", 0, MAPS[0])
    make_run(tmp_path, "random", 1, MAPS[1][:2], rounds=2)  # still running
    assert len(round_gains.round_table([tmp_path], "mAP")) == 2 + 2
    make_run(tmp_path, "entropy", 0, MAPS[2])
    assert round_gains.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("round_gains: error: one strategy at a time") and err.count("\n") == 1
