"""scripts/demo_table.py: the docs' demo table is the recorded run, and the agreement check."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from scripts import demo_table
from tests.helpers import REPO

RECORD = REPO / "docs" / "data" / "demo_seed0.csv"


def _write(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_benchmarks_page_shows_the_table_the_script_makes_from_the_record():
    table = demo_table.markdown_table(demo_table.read_rows(RECORD))
    assert table in (REPO / "docs" / "benchmarks.md").read_text()
    assert table.splitlines()[2].startswith("| 0 | 100 | 318 | 8109 | 0.202 | 0.371 |")


def test_check_is_exact_or_within_tolerance_and_names_each_disagreement(tmp_path, capsys):
    recorded = demo_table.read_rows(RECORD)
    near = [dict(r) for r in recorded]
    near[0]["mAP50"] = str(float(near[0]["mAP50"]) + 0.033)  # the fresh-clone difference
    near[4]["boxes"] = "990"  # other selections, other boxes: fine statistically
    assert demo_table.disagreements(near, recorded, 0.05, exact=False) == []
    assert demo_table.disagreements(near, recorded, 0.05, exact=True) == [
        "round 0 mAP50: 0.404, recorded 0.371 (|diff| 0.033 > 0.0005)",
        "round 4 boxes: 990, recorded 1055",
    ]
    far = [dict(r) for r in recorded]
    far[2]["mAP"], far[3]["images"] = "0.300", "260"
    path = _write(tmp_path / "results.csv", far)
    assert demo_table.main([str(path), "--check", str(RECORD)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "demo_table: round 2 mAP: 0.300, recorded 0.366 (|diff| 0.066 > 0.05)",
        "demo_table: round 3 images: 260, recorded 250",
    ]
    assert demo_table.disagreements(far[:3], recorded, 0.05, exact=False) == [
        "rounds: the run has 3, the record 5"
    ]


@pytest.mark.slow
def test_the_demo_agrees_with_the_recorded_run_within_the_stated_tolerance(tmp_path):
    """The reproducibility statement itself: minutes of CPU, so by hand (pytest -m slow)."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # the record used torch's default thread count
    subprocess.run(
        [sys.executable, "-m", "alrun.cli", "experiment=demo", f"hydra.run.dir={out}"],
        env=env, cwd=tmp_path, check=True, capture_output=True, timeout=3600,
    )  # fmt: skip
    rows = demo_table.read_rows(out / "results.csv")
    assert demo_table.disagreements(rows, demo_table.read_rows(RECORD), 0.05, exact=False) == []
