"""End-to-end runs of the loop on the tiny detector: outputs, determinism, resume after kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alrun import io as alrun_io
from alrun.errors import AlrunError, BudgetError
from alrun.loop import run_experiment
from tests.helpers import REPO, compose_config

SMOKE = ["experiment=smoke", "quiet=true"]


def _run(tmp: Path, overrides: list[str]) -> list[dict]:
    return run_experiment(compose_config(SMOKE + overrides), tmp)


def _selections(run_dir: Path) -> dict[str, dict]:
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted(run_dir.glob("round_*/selection.json"))
    }


def test_two_round_run_writes_every_artifact(tmp_path):
    rows = _run(tmp_path, ["budget.rounds=2"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["images"] for r in rows] == [10, 20, 30]
    assert rows[0]["cost_s"] < rows[1]["cost_s"] < rows[2]["cost_s"]
    for r in range(3):
        rd = tmp_path / f"round_{r:02d}"
        labelled = json.loads((rd / "labelled.json").read_text())
        assert len(labelled["images"]) == rows[r]["images"]
        assert {im["label_kind"] for im in labelled["images"]} == {"box"}
        metrics = json.loads((rd / "metrics.json").read_text())
        assert {"mAP", "mAP50", "mAR", "fp", "missed", "timings_s"} <= set(metrics)
    sel = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert sel["strategy"] == "entropy" and sel["aggregator"] == "mean"
    assert sel["score_threshold"] == 0.1 and len(sel["selected"]) == 10
    ids = [s["image_id"] for s in sel["selected"]]
    assert len(set(ids)) == 10
    labelled_r0 = {
        im["alrun_id"]
        for im in json.loads((tmp_path / "round_00/labelled.json").read_text())["images"]
    }
    labelled_r1 = {
        im["alrun_id"]
        for im in json.loads((tmp_path / "round_01/labelled.json").read_text())["images"]
    }
    assert labelled_r1 == labelled_r0 | set(ids)
    assert json.loads((tmp_path / "round_02/selection.json").read_text())["selected"] == []
    with open(tmp_path / "results.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == 3
    assert {"train_s", "predict_s", "score_s", "select_s", "cost_s", "mAP50"} <= set(csv_rows[0])
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["last_completed_round"] == 2
    # checkpoints: only the last round's is kept by default
    assert [p.parent.name for p in tmp_path.glob("round_*/checkpoint.pt")] == ["round_02"]
    assert not list(tmp_path.glob(".round_*"))


def test_same_seed_same_selections_other_seed_differs(tmp_path):
    _run(tmp_path / "a", ["seed=1"])
    _run(tmp_path / "b", ["seed=1"])
    _run(tmp_path / "c", ["seed=2"])
    assert _selections(tmp_path / "a") == _selections(tmp_path / "b")
    first = json.loads((tmp_path / "a/round_00/labelled.json").read_text())["images"]
    other = json.loads((tmp_path / "c/round_00/labelled.json").read_text())["images"]
    assert {i["alrun_id"] for i in first} != {i["alrun_id"] for i in other}


def test_random_strategy_skips_prediction(tmp_path):
    rows = _run(tmp_path, ["strategy=random", "budget.rounds=1"])
    assert rows[0]["predict_s"] == 0.0
    sel = json.loads((tmp_path / "round_00/selection.json").read_text())
    assert sel["strategy"] == "random" and sel["scorer"] == "random"
    assert sel["fill"] == "stop" and "seeded" in sel["tie_break"]


@pytest.mark.parametrize("unit,budget", [("boxes", 30), ("seconds", 600)])
def test_boxes_and_seconds_budgets_never_exceeded(tmp_path, unit, budget):
    _run(
        tmp_path,
        [
            f"budget.unit={unit}",
            f"budget.initial={budget}",
            f"budget.per_round={budget}",
            "budget.rounds=1",
        ],
    )
    sel = json.loads((tmp_path / "round_00/selection.json").read_text())
    labelled = json.loads((tmp_path / "round_00/labelled.json").read_text())
    boxes_by_image = {}
    for ann in labelled["annotations"]:
        boxes_by_image[ann["image_id"]] = boxes_by_image.get(ann["image_id"], 0) + 1
    if unit == "boxes":
        assert sum(boxes_by_image.values()) <= budget
        assert sel["total_cost_s"] <= budget * 25.5 + len(sel["selected"]) * 1.0
    else:
        assert sel["total_cost_s"] <= budget
        assert sum(im["cost_s"] for im in labelled["images"]) <= budget
    assert sel["selected"], "a budget this size buys at least one image"


@pytest.mark.integration
def test_pool_exhaustion_stops_cleanly(tmp_path):
    rows = _run(
        tmp_path,
        ["dataset.num_pool=25", "budget.initial=10", "budget.per_round=10", "budget.rounds=4"],
    )
    # 10 + 10 + 5 images: the third selection takes the rest, then one more training round
    assert [r["images"] for r in rows] == [10, 20, 25]
    state = json.loads((tmp_path / "state.json").read_text())
    assert "exhausted" in state["stopped"]


def test_initial_budget_larger_than_pool_is_an_error(tmp_path):
    with pytest.raises(BudgetError, match="budget.initial: 1000 images .* only holds 60"):
        _run(tmp_path, ["budget.initial=1000"])
    assert not list(tmp_path.glob("round_*"))


@pytest.mark.integration
def test_changed_config_in_same_dir_is_refused(tmp_path):
    _run(tmp_path, ["budget.rounds=1"])
    with pytest.raises(AlrunError, match=r"different config \(trainer\.lr: 0\.01 -> 0\.02\)"):
        _run(tmp_path, ["budget.rounds=1", "trainer.lr=0.02"])


@pytest.mark.integration
def test_completed_run_is_not_redone(tmp_path):
    rows = _run(tmp_path, ["budget.rounds=1"])
    mtime = (tmp_path / "round_01/metrics.json").stat().st_mtime_ns
    again = _run(tmp_path, ["budget.rounds=1"])
    assert again == rows
    assert (tmp_path / "round_01/metrics.json").stat().st_mtime_ns == mtime


def _cli(run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "alrun.cli", *SMOKE, f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.integration
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """Killed by another process inside round 1's training (observed: its temp dir appears)."""
    extra = ["budget.rounds=2", "trainer.iterations=40"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _cli(tmp_path / "full", extra), check=True, env=env, cwd=REPO, capture_output=True
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed, extra), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    building = killed / ".round_01.tmp"  # created just before round 1 trains (40 iterations)
    deadline = time.monotonic() + 300
    while not building.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("round 1 never started")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = killed / "state.json"
    assert json.loads(state.read_text())["last_completed_round"] == 0
    assert not (killed / "round_01").exists()

    subprocess.run(_cli(killed, extra), check=True, env=env, cwd=REPO, capture_output=True)
    assert json.loads(state.read_text())["last_completed_round"] == 2
    assert _selections(killed) == _selections(tmp_path / "full")
    assert len(_selections(killed)) == 3
    assert not list(killed.glob(".round_*"))


def _crash(tmp: Path, overrides: list[str], point: str, monkeypatch) -> None:
    """Stop a run at the first file operation matching ``point`` as a full disk would."""
    monkeypatch.setattr(alrun_io, "_fault_count", 0)
    monkeypatch.setenv("ALRUN_FAULT_KIND", "enospc")
    monkeypatch.setenv("ALRUN_FAULT_AT", point)
    with pytest.raises(OSError, match="No space left"):
        _run(tmp, overrides)
    monkeypatch.delenv("ALRUN_FAULT_AT")


def _labelled_ids(run_dir: Path) -> dict[str, list[str]]:
    return {
        p.parent.name: [im["alrun_id"] for im in json.loads(p.read_text())["images"]]
        for p in sorted(run_dir.glob("round_*/labelled.json"))
    }


@pytest.mark.integration
def test_state_lagging_a_finished_round_resumes_without_redoing_it(tmp_path, monkeypatch):
    """Crash right after round 1's directory was committed, before state.json caught up;
    with init=scratch and keep_checkpoints=all."""
    overrides = ["budget.rounds=2", "trainer.init=scratch", "keep_checkpoints=all"]
    reference = _run(tmp_path / "ref", overrides)
    run = tmp_path / "run"
    _crash(run, overrides, "rename-done " + str(run / "round_01"), monkeypatch)
    assert json.loads((run / "state.json").read_text())["last_completed_round"] == 0
    mtime = (run / "round_01" / "metrics.json").stat().st_mtime_ns
    rows = _run(run, overrides)
    assert (run / "round_01" / "metrics.json").stat().st_mtime_ns == mtime  # not redone
    assert [r["images"] for r in rows] == [r["images"] for r in reference]
    assert [r["mAP50"] for r in rows] == [r["mAP50"] for r in reference]
    assert _selections(run) == _selections(tmp_path / "ref")
    assert _labelled_ids(run) == _labelled_ids(tmp_path / "ref")
    assert len(list(run.glob("round_*/checkpoint.pt"))) == 3  # keep_checkpoints=all


def test_resume_true_continues_from_checkpoint_and_resume_false_refuses(tmp_path, monkeypatch):
    overrides = ["budget.rounds=1"]
    _run(tmp_path / "ref", overrides)
    run = tmp_path / "run"
    _crash(run, overrides, "write " + str(run / ".round_01.tmp" / "metrics.json"), monkeypatch)
    assert not (run / "round_01").exists() and (run / "round_00" / "checkpoint.pt").exists()
    with pytest.raises(AlrunError, match="already holds a run; resume it"):
        _run(run, [*overrides, "resume=false"])
    _run(run, [*overrides, "resume=true"])
    ref = json.loads((tmp_path / "ref/round_01/metrics.json").read_text())
    got = json.loads((run / "round_01/metrics.json").read_text())
    assert got["train"] == ref["train"]  # same final loss: continued from round 0's weights
    assert _selections(run) == _selections(tmp_path / "ref")
    assert [p.parent.name for p in run.glob("round_*/checkpoint.pt")] == ["round_01"]
    with pytest.raises(AlrunError, match="resume=true: no run to resume"):
        _run(tmp_path / "empty", [*overrides, "resume=true"])


@pytest.mark.integration
def test_real_voc_dataset_with_recorded_skips(tmp_path):
    from tests.helpers import shared_dataset

    cfg = compose_config(
        [
            "dataset=bccd",
            f"dataset.root={shared_dataset('bccd')}",
            "quiet=true",
            "budget.initial=8",
            "budget.per_round=8",
            "budget.rounds=1",
            "trainer.iterations=3",
            "trainer.first_iterations=3",
            "trainer.warmup_iters=1",
            "trainer.batch_size=4",
        ]
    )
    rows = run_experiment(cfg, tmp_path)
    assert [r["images"] for r in rows] == [8, 16]
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert skipped["count"] == 2
    assert any("BloodImage_00338.xml" in item for item in skipped["items"])


def test_saved_predictions_explain_the_selection(tmp_path):
    import numpy as np

    _run(tmp_path, ["budget.rounds=1", "save_predictions=true"])
    saved = np.load(tmp_path / "round_00" / "preds.npz")
    sel = json.loads((tmp_path / "round_00/selection.json").read_text())
    assert len(saved["image_ids"]) == 50  # 60-image pool minus the 10 initial ones
    assert saved["offsets"][-1] == len(saved["boxes"]) == len(saved["probs"])
    by_id = dict(zip(saved["image_ids"].tolist(), saved["image_scores"].tolist()))
    for item in sel["selected"]:
        expected = item["score"]
        if isinstance(expected, str):
            expected = float(expected)
        assert by_id[item["image_id"]] == pytest.approx(expected)
    assert not (tmp_path / "round_01" / "preds.npz").exists()  # the last round selects nothing


def test_a_collapsed_round_is_said_loudly(tmp_path, caplog):
    # lr so small that nothing is learnt: every round's model scores mAP50 ~ 0
    rows = _run(tmp_path, ["budget.rounds=1", "trainer.lr=1e-6"])
    assert [r["collapsed"] for r in rows] == [1, 1]
    metrics = json.loads((tmp_path / "round_00" / "metrics.json").read_text())
    assert "mAP50" in metrics["collapsed"]
    with open(tmp_path / "results.csv") as handle:
        assert [row["collapsed"] for row in csv.DictReader(handle)] == ["1", "1"]
    assert any("looks collapsed" in rec.message for rec in caplog.records)


@pytest.mark.integration
def test_scratch_resume_gives_regimes_the_last_rounds_model(tmp_path, monkeypatch):
    """trainer.init=scratch retrains every round, but weak_point makes its pseudo-boxes with the
    previous round's model first: a resumed run must hand it the same model (it used to get a
    freshly initialised one, so pseudo-boxes and results differed from an uninterrupted run)."""
    overrides = ["budget.rounds=2", "trainer.init=scratch", "supervision=weak_point"]
    overrides += [
        "supervision.min_score=0.0",
        "supervision.require_inside=false",
    ]  # any prediction of the weak smoke model counts
    _run(tmp_path / "ref", overrides)
    run = tmp_path / "run"
    _crash(run, overrides, "write " + str(run / ".round_02.tmp" / "metrics.json"), monkeypatch)
    assert json.loads((run / "state.json").read_text())["last_completed_round"] == 1
    _run(run, overrides)
    for name in ("supervision.json", "metrics.json"):
        ref = json.loads((tmp_path / "ref" / "round_02" / name).read_text())
        got = json.loads((run / "round_02" / name).read_text())
        if name == "metrics.json":
            ref, got = ref["train"], got["train"]
        assert got == ref, name


def test_rerun_of_a_finished_run_keeps_its_checkpoints(tmp_path):
    """Issue 25.1: re-running a finished keep_checkpoints=all run without the flag."""
    _run(tmp_path, ["budget.rounds=1", "keep_checkpoints=all"])
    assert len(list(tmp_path.glob("round_*/checkpoint.pt"))) == 2
    _run(tmp_path, ["budget.rounds=1"])
    assert len(list(tmp_path.glob("round_*/checkpoint.pt"))) == 2


def test_resume_with_another_thread_count_is_refused(tmp_path, monkeypatch):
    """Issue 25.7: the thread count is recorded; resuming with another one needs
    allow_thread_change=true (and the rounds after say which count they ran with)."""
    import torch

    overrides = ["budget.rounds=1"]
    _crash(tmp_path, overrides, f"write {tmp_path / '.round_01.tmp' / 'metrics.json'}", monkeypatch)
    assert json.loads((tmp_path / "state.json").read_text())["torch_threads"] == 1
    torch.set_num_threads(2)
    with pytest.raises(AlrunError, match=r"torch threads: round 0 ran with 1, this process has 2"):
        _run(tmp_path, overrides)
    assert not (tmp_path / "round_01").exists()
    _run(tmp_path, [*overrides, "allow_thread_change=true"])
    assert json.loads((tmp_path / "state.json").read_text())["torch_threads"] == 2
    torch.set_num_threads(1)
    _run(tmp_path, overrides)  # a finished run is not refused: nothing is computed
