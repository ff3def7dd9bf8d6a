"""Every strategy and regime that keeps state between rounds resumes identically (issue 25 C).

The families: teachers (pseudo-label EMA / previous round, UDA), switches (weak-point hard /
soft), ensembles (independent, snapshot), MC dropout, learned heads (loss prediction,
false-negative prediction), the mixture-density head (AL-MDN), per-round scorer state (PPAL,
weighted schedule, failure-mode weights), synthetic pre-training, box verification, the
query-by-committee members and MI-AOD's instance heads.

Each family, paired with another one in the same run (a strategy with a regime, to halve the
runs), is stopped in-process right after round 0's directory was committed and before
``state.json`` caught up (``rename-done round_00``): the resumed run then rebuilds every strategy
and regime object from scratch and must redo round 1 exactly as the uninterrupted run did, from
what is on disk alone (checkpoint, regime state, pool). Later crash windows resume the same way
(from the newest committed round), so this one point tests what a family has to keep. The fast
tier runs the pairs holding the issue's cases; the slow tier the other pairs, and
``scripts/fault_drill.py`` itself (SIGKILL at sampled file operations and at the round-0 commit,
each resumed in a new process) on each family alone.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alrun import io as alrun_io
from alrun.loop import run_experiment
from tests.helpers import REPO, compose_config

_spec = importlib.util.spec_from_file_location("fault_drill", REPO / "scripts" / "fault_drill.py")
fault_drill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_drill)

#: the UDA regime on the synthetic generator's two domains, smoke-sized
UDA = [
    "supervision=uda",
    "dataset.domain=target",
    "supervision.target_domain=target",
    "supervision.source={_target_:alrun.data.synthetic.synthetic_splits,num_pool:8,num_test:1,"
    "image_size:${dataset.image_size},domain:source,data_seed:${dataset.data_seed},"
    "cache_dir:${dataset.cache_dir}}",
]

#: every stateful family, alone (extra overrides on top of the drill's smoke run)
FAMILIES: dict[str, list[str]] = {
    "pseudo_label_ema": ["supervision=pseudo_label"],
    "pseudo_label_previous_round": [
        "supervision=pseudo_label",
        "supervision.teacher=previous_round",
        "supervision.threshold=0.0",  # any box of the weak smoke teacher counts
    ],
    "pseudo_label_previous_round_scratch": [
        "supervision=pseudo_label",
        "supervision.teacher=previous_round",
        "supervision.threshold=0.0",
        "trainer.init=scratch",
    ],
    "weak_point_hard": ["supervision=weak_point_hard", "supervision.min_score=0.0"],
    "weak_point_soft": ["supervision=weak_point_soft", "supervision.min_score=0.0"],
    "uda": UDA,
    "consistency": ["supervision=consistency"],
    "synthetic_pretrain": ["supervision=synthetic_pretrain"],
    "box_verification": ["supervision=box_verification"],
    "ppal": ["strategy=ppal"],
    "al_mdn": ["strategy=al_mdn", "strategy.scorer.score_threshold=0.0"],
    "weighted": ["strategy=weighted"],
    "failure_aware": ["strategy=failure_aware"],
    "ensemble_independent": ["strategy=ensemble_entropy"],
    "ensemble_snapshot": ["strategy=ensemble_entropy", "strategy.scorer.ensemble_kind=snapshot"],
    "mc_dropout": ["strategy=mc_entropy"],
    "loss_prediction": ["strategy=loss_prediction"],
    "fn_prediction": ["strategy=fn_prediction"],
    "qbc": ["strategy=qbc"],  # the committee of ensemble members
    "mi_aod": ["strategy=mi_aod"],  # instance heads rebuilt every round
}

#: one regime and one strategy family per run (each family appears once); the first three, the
#: issue's cases, are the fast tier, the others run in the slow one (each ~2 smoke runs)
PAIRS = [
    ("pseudo_label_previous_round_scratch", "weighted"),  # issue 25 case 4 (teacher)
    ("weak_point_hard", "ppal"),  # cases 5 (PPAL candidates) and 6 (click cost sums)
    ("weak_point_soft", "al_mdn"),  # case 5 (AL-MDN normalisation)
    ("pseudo_label_ema", "failure_aware"),
    ("uda", "ensemble_snapshot"),
    ("consistency", "loss_prediction"),
    ("synthetic_pretrain", "ensemble_independent"),
    ("box_verification", "mc_dropout"),
    ("pseudo_label_previous_round", "fn_prediction"),
    ("qbc",),  # every regime is drilled above: the last two strategy families run alone
    ("mi_aod",),
]
FAST = 3


def test_every_family_is_drilled_in_the_fast_tier():
    drilled = [name for pair in PAIRS for name in pair]
    assert sorted(drilled) == sorted(FAMILIES)


def _run(run_dir: Path, overrides: list[str]) -> None:
    run_experiment(compose_config([*fault_drill.DEFAULT_OVERRIDES, *overrides]), run_dir)


@pytest.mark.parametrize(
    "pair",
    [
        pytest.param(p, id="+".join(p), marks=() if n < FAST else pytest.mark.slow)
        for n, p in enumerate(PAIRS)
    ],
)
def test_resume_after_round_zero_commit_matches_uninterrupted_run(pair, tmp_path, monkeypatch):
    overrides = [o for name in pair for o in FAMILIES[name]]
    _run(tmp_path / "reference", overrides)
    expected = fault_drill.snapshot(tmp_path / "reference")
    run = tmp_path / "run"
    monkeypatch.setattr(alrun_io, "_fault_count", 0)
    monkeypatch.setenv("ALRUN_FAULT_KIND", "enospc")
    monkeypatch.setenv("ALRUN_FAULT_AT", f"rename-done {run / 'round_00'}")
    with pytest.raises(OSError, match="No space left"):
        _run(run, overrides)
    monkeypatch.delenv("ALRUN_FAULT_AT")
    assert not (run / "round_01").exists() and (run / "round_00").exists()
    _run(run, overrides)
    got = fault_drill.snapshot(run)
    diff = fault_drill.first_difference(expected, got)
    assert diff is None, f"{diff}: resumed {got.get(diff)} vs uninterrupted {expected.get(diff)}"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fault_drill_over_a_stateful_family(family, tmp_path):
    """The script: SIGKILL at 6 evenly spread file operations and at round 0's commit."""
    cmd = [sys.executable, "scripts/fault_drill.py", "--sample", "6", "--match",
           "rename-done round_00", "--workdir", str(tmp_path), "--", *FAMILIES[family]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    passed, total = result.stdout.strip().splitlines()[-1].split("/")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert passed == total and int(total) >= 6, result.stdout
