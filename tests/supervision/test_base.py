"""Regime state is saved with the run and restored on resume; a hook raising mid-training
discards the round, leaves the last completed round intact and reports one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alrun.engine import BatchSource, TrainingHook, TrainingHookError, train_round
from alrun.loop import run_experiment
from alrun.supervision.full import FullSupervision
from tests.helpers import compose_config


class CrashOnce(TrainingHook):
    name = "crash_once"

    def __init__(self, marker: Path):
        self.marker = marker

    def after_step(self, step):
        if step.index == 2 and not self.marker.exists():
            self.marker.write_text("crashed")
            raise RuntimeError("simulated failure")


class RememberingRegime(FullSupervision):
    """Full supervision that remembers the rounds it trained (its state) and, once, crashes in
    round ``crash_round`` (a marker file makes the resumed run go through)."""

    def __init__(self, crash_round: int, marker: str):
        self.crash_round, self.marker = crash_round, Path(marker)
        self.trained: list[int] = []

    def train(self, detector, pool, schedule, seed, round_index, progress=None, strategy=None):
        hooks = [CrashOnce(self.marker)] if round_index == self.crash_round else []
        source = BatchSource("labelled", pool.training_set())
        stats = train_round(
            detector, [source], schedule, seed, round_index, hooks, progress, strategy
        )
        self.trained.append(round_index)
        return stats

    def state_dict(self):
        return {"trained": list(self.trained)}

    def load_state_dict(self, state):
        self.trained = list(state["trained"])


def test_hook_failure_discards_the_round_and_resume_restores_regime_state(tmp_path):
    run = tmp_path / "run"
    cfg = compose_config(
        [
            "experiment=smoke",
            "quiet=true",
            "+supervision.crash_round=2",
            f"+supervision.marker={tmp_path / 'crashed'}",
            f"supervision._target_={__name__}.RememberingRegime",
        ]
    )
    with pytest.raises(TrainingHookError, match="hook 'crash_once' failed at iteration 3 of 5"):
        run_experiment(cfg, run)
    state = json.loads((run / "state.json").read_text())
    assert state["last_completed_round"] == 1 and state["regime"] == {"trained": [0, 1]}
    assert sorted(p.name for p in run.iterdir() if "round" in p.name) == ["round_00", "round_01"]
    rows = run_experiment(cfg, run)  # resumes after round 1 with the regime's saved state
    assert [r["round"] for r in rows] == [0, 1, 2]
    state = json.loads((run / "state.json").read_text())
    assert state["regime"] == {"trained": [0, 1, 2]}  # [2] alone if the state were not restored
