"""Box-level supervision (alrun/supervision/box_level.py): the mixed-supervision hook on
hand-made teacher outputs, the label kinds it asks for, bad input, and rounds end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alrun.cli import user_error
from alrun.data.dataset import ImageRecord
from alrun.engine import Batch, BatchSource, Step
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.oracle import CostModel, SimulatedOracle
from alrun.supervision.base import LabelRequest
from alrun.supervision.box_level import BoxLevelHook, BoxLevelSupervision
from alrun.types import ImageLabels
from tests.helpers import compose_config
from tests.supervision._cli import alrun_errors
from tests.supervision.test_pseudo_label import FixedTeacher, RecordingDetector

T = torch.tensor


def _partial(image_id, boxes, labels, queries, answers):
    return ImageLabels(
        image_id,
        "partial",
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        10.0,
        queries=np.asarray(queries, np.float32).reshape(-1, 4),
        query_labels=np.zeros(len(answers), np.int64),
        answers=np.asarray(answers, np.int64),
    )


ANSWERS = {
    "a": _partial("a", [[0, 0, 10, 10]], [2], [[0, 0, 10, 10], [40, 40, 50, 50]], [0, -1]),
    "b": _partial("b", [], [], [[0, 0, 8, 8]], [-1]),
}
FOUND = [  # the teacher's detections (head classes: dataset class + 1)
    {
        "boxes": T([[1.0, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 49], [0, 0, 5, 5]]),
        "labels": T([1, 2, 1, 2]),
        "scores": T([0.95, 0.92, 0.97, 0.5]),  # the last one below the threshold
    },
    {"boxes": torch.zeros(0, 4), "labels": T([], dtype=torch.long), "scores": T([])},
]


def _step(detector, flipped=(False, False)):
    images = [torch.zeros(3, 60, 60), torch.zeros(3, 60, 60)]
    batch = Batch(BatchSource("partial", None, role="unlabelled"), images, None, ("a", "b"),
                  flipped)  # fmt: skip
    return Step(0, 1, 0.1, detector, {"partial": batch})


def test_partial_images_train_on_answers_plus_pseudo_boxes_elsewhere():
    hook = BoxLevelHook(ANSWERS, 0.9, 0.5, FixedTeacher(FOUND), 0.999, 0.4, "ignore", "skip")
    detector = RecordingDetector()
    hook.before_training(detector, 1)
    losses = hook.extra_losses(_step(detector))
    assert float(losses["partial/cls"]) == pytest.approx(1.0)  # 2.0 x weight 0.5
    (first,) = detector.seen[0]  # "b": no answer, no pseudo-box: skipped (empty=skip)
    # the answer, then the pseudo-boxes overlapping it by IoU <= 0.4 (BLAD merge_gt_pseudo)
    assert first["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 49]]
    assert first["labels"].tolist() == [2, 1, 0]
    stats = hook.after_training()
    assert stats["answers_seen"] == 1 and stats["pseudo_kept"] == 2
    assert stats["pseudo_dropped"] == 1 and "unlabelled_boxes" not in stats


def test_rejected_regions_drop_their_pseudo_boxes_and_flips_follow_the_image():
    hook = BoxLevelHook(ANSWERS, 0.9, 1.0, FixedTeacher(FOUND), 0.999, 0.4, "drop", "background")
    detector = RecordingDetector()
    hook.before_training(detector, 1)
    hook.extra_losses(_step(detector))
    first, second = detector.seen[0]  # "b" trained as background (empty=background)
    assert first["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]  # [40,40,50,49] rejected
    assert len(second["boxes"]) == 0
    hook.extra_losses(_step(detector, flipped=(True, False)))
    assert detector.seen[1][0]["boxes"][0].tolist() == [50, 0, 60, 10]  # the answer, mirrored


def test_regime_asks_boxes_first_then_the_planned_regions():
    regime = BoxLevelSupervision()
    assert regime.label_kinds == ("box", "partial") and "teacher" in regime.requires
    oracle = SimulatedOracle(CostModel())
    rec = ImageRecord("im", Path("im.png"), 64, 64, np.array([[0, 0, 10, 10]], np.float32),
                      np.array([1]))  # fmt: skip
    oracle.hold_truth({"im": rec})
    (full,) = regime.annotate(oracle, [rec.ref], LabelRequest(0))
    assert full.kind == "box" and regime.label_kind(LabelRequest(2)) == "partial"
    queries = {"im": (np.array([[0, 0, 10, 9]], np.float32), np.array([1]))}
    (part,) = regime.annotate(oracle, [rec.ref], LabelRequest(1, queries=queries))
    assert part.kind == "partial" and part.answers.tolist() == [0] and part.cost_s == 1.6
    with pytest.raises(AlrunError, match="needs a box-query strategy"):
        regime.annotate(oracle, [rec.ref], LabelRequest(1))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"teacher": None}, "supervision.teacher: box-level supervision trains unqueried"),
        ({"rejected": "keep"}, "supervision.rejected: expected one of ignore|drop"),
        ({"background": "soft"}, "supervision.background: expected hard"),
        ({"merge_iou": 1.5}, "supervision.merge_iou: expected a number in [0, 1]"),
    ],
)
def test_bad_regime_options_name_the_key(kwargs, needle):
    with pytest.raises(AlrunError) as err:
        BoxLevelSupervision(**kwargs)
    assert str(err.value).startswith(needle)


SMOKE = ["experiment=smoke", "quiet=true"]
BOX_LEVEL = ["supervision=box_level", "strategy=compas", "budget.unit=boxes",
             "budget.initial=30", "budget.per_round=15"]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["budget.unit=images"], "budget.unit: supervision=box_level buys boxes of images"),
        (["strategy=entropy"], "strategy=entropy: supervision=box_level needs a box-query"),
        (["supervision=full"], "strategy=compas: asks for boxes, not images; it needs"),
        (["budget.fill=skip"], "budget.fill: box-level queries are bought in rank order"),
        (["supervision.teacher=null"], "supervision.teacher: box-level supervision"),
        (["strategy.charge=none"], "strategy.charge"),
        (["+strategy/selector=kcenter"], "strategy/selector: strategy=compas plans its box"),
        (["strategy/scorer=entropy"], "strategy/scorer: strategy=compas ranks boxes"),
        (
            [
                "strategy=entropy",
                "strategy/scorer=compas",
                "supervision=full",
                "budget.unit=images",
            ],
            "strategy/scorer=compas: ranks boxes, not images",
        ),
    ],
)
def test_bad_box_level_runs_are_one_line_naming_the_key(overrides, needle):
    with pytest.raises(Exception) as err:
        build_experiment(compose_config([*SMOKE, *BOX_LEVEL, *overrides]))
    message = user_error(err.value)
    assert message is not None and needle in message and "\n" not in message, message


def test_box_level_needs_the_simulated_oracle(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"image_id": "x", "kind": "box", "boxes": [], "labels": [], "cost_s": 1}\n')
    with pytest.raises(Exception) as err:
        build_experiment(
            compose_config([*SMOKE, *BOX_LEVEL, "oracle=recorded", f"oracle.path={labels}"])
        )
    message = user_error(err.value)
    assert message == (
        "oracle: box-level queries are answered by the simulated oracle (oracle=default), "
        "not RecordedOracle"
    )


@pytest.mark.integration
def test_cli_box_level_with_an_image_budget_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    code, errors = alrun_errors(*SMOKE, *BOX_LEVEL, "budget.unit=images", f"hydra.run.dir={out}")
    assert code == 2
    assert errors == [
        "alrun: error: budget.unit: supervision=box_level buys boxes of images, not images; "
        "set budget.unit=boxes or budget.unit=seconds"
    ]
    assert not (out / "state.json").exists() and not list(out.glob("round_*"))


@pytest.mark.integration
@pytest.mark.parametrize("unit", ["boxes", "seconds"])
def test_box_level_rounds_end_to_end(tmp_path, unit):
    initial, per_round = {"boxes": (30, 12), "seconds": (800, 150)}[unit]
    cfg = compose_config([*SMOKE, *BOX_LEVEL, f"budget.unit={unit}", f"budget.initial={initial}",
                          f"budget.per_round={per_round}", "budget.rounds=1",
                          "strategy.scorer.score_threshold=0.05", "supervision.threshold=0.05",
                          "trainer.iterations=20", "trainer.first_iterations=40"])  # fmt: skip
    rows = run_experiment(cfg, tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    selection = json.loads((tmp_path / "round_00/selection.json").read_text())
    assert selection["strategy"] == "compas" and selection["queries"] >= 1
    spent = {"boxes": rows[1]["boxes"] - rows[0]["boxes"], "seconds": selection["total_cost_s"]}
    assert 0 < spent[unit] <= per_round
    state = json.loads((tmp_path / "state.json").read_text())
    partial = [lab for lab in state["labels"] if lab["kind"] == "partial"]
    assert partial and all(len(p["answers"]) == len(p["queries"]) for p in partial)
    assert sum(len(p["boxes"]) for p in partial) == rows[1]["boxes"] - rows[0]["boxes"]
    train = json.loads((tmp_path / "round_01/metrics.json").read_text())["train"]
    assert train["box_level/partial_images"] == len(partial)
    assert train["box_level/answers_seen"] > 0  # partial batches trained every iteration


#: a small pool asked in two rounds: partly labelled images come back (issue 24)
REASK = ["experiment=smoke", "quiet=true", "dataset.num_pool=30", "dataset.num_test=10",
         "trainer.iterations=3", "trainer.first_iterations=5", *BOX_LEVEL,
         "budget.per_round=10", "strategy.scorer.score_threshold=0.0",
         "supervision.threshold=0.0", "budget.rounds=2"]  # fmt: skip


@pytest.mark.integration
def test_an_image_asked_in_two_rounds_trains_on_both_rounds_answers(tmp_path, monkeypatch):
    """Issue 24 end to end: some image is asked in rounds 1 and 2; its one label holds both
    rounds' queries and answers, round 2 trains on them, and no object is charged twice."""
    seen: dict[str, list] = {}
    merge = BoxLevelHook._partial_losses

    def recording(self, step):  # the partial images' labels as the hook trains on them
        for image_id in step.batches["partial"].image_ids:
            seen[image_id] = self.answers[image_id]
        return merge(self, step)

    monkeypatch.setattr(BoxLevelHook, "_partial_losses", recording)
    rows = run_experiment(compose_config(REASK), tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    labels = {lab["image_id"]: lab for lab in state["labels"]}
    twice = [i for i, lab in labels.items() if len(set(lab.get("query_rounds", []))) > 1]
    assert twice, "no image was asked in two rounds"
    picks = [json.loads((tmp_path / f"round_0{r}/selection.json").read_text()) for r in (0, 1)]
    assert picks[1]["reasked_images"] == len(twice) and picks[0]["reasked_images"] == 0
    assert set(twice) <= {item["image_id"] for item in picks[1]["selected"]}
    for image_id in twice:
        lab = labels[image_id]
        rounds, answers = np.array(lab["query_rounds"]), np.array(lab["answers"])
        assert lab["round"] == 1 and len(rounds) == len(answers) == len(lab["queries"])
        assert sorted(answers[answers >= 0].tolist()) == list(range(len(lab["boxes"])))
        trained = seen[image_id]  # the last round's training target: the merged label
        assert trained.query_rounds.tolist() == rounds.tolist()
        np.testing.assert_array_equal(
            trained.boxes, np.asarray(lab["boxes"], np.float32).reshape(-1, 4)
        )
    both = [i for i in twice if {1, 2} <= set(np.array(labels[i]["query_rounds"])[
        np.array(labels[i]["answers"]) >= 0].tolist())]  # fmt: skip
    assert both, "no image got answers in both rounds"
    # no object charged twice: every answer is a distinct true box, and the box count grows by
    # exactly the answers bought
    for lab in labels.values():
        boxes = {tuple(b) for b in lab["boxes"]}
        assert len(boxes) == len(lab["boxes"])
    bought = sum(len(lab["boxes"]) for lab in labels.values() if lab["kind"] == "partial")
    assert rows[-1]["boxes"] - rows[0]["boxes"] == bought
    assert all(rows[r + 1]["boxes"] - rows[r]["boxes"] <= 10 for r in (0, 1))
    merged_cost = sum(lab["cost_s"] for lab in labels.values() if lab["kind"] == "partial")
    assert merged_cost == pytest.approx(sum(p["total_cost_s"] for p in picks))


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash",
    [
        "rename-done {run}/round_01",  # round 1 committed, the top state not yet
        "write {run}/.round_01.tmp/selection.json",  # round 1's re-asks redone from round 0
    ],
)
def test_box_level_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch, crash):
    """The fault drill's crash windows around round 1 (tests/scripts/test_fault_drill.py),
    whose selection asks partly labelled images again: the merged labels, their queries,
    answers and rounds come back from state.json and the rest is redone exactly."""
    from alrun import io as alrun_io
    from tests.scripts.test_fault_drill import fault_drill

    run_experiment(compose_config(REASK), tmp_path / "reference")
    expected = fault_drill.snapshot(tmp_path / "reference")
    run = tmp_path / "run"
    monkeypatch.setattr(alrun_io, "_fault_count", 0)
    monkeypatch.setenv("ALRUN_FAULT_KIND", "enospc")
    monkeypatch.setenv("ALRUN_FAULT_AT", crash.format(run=run))
    with pytest.raises(OSError, match="No space left"):
        run_experiment(compose_config(REASK), run)
    monkeypatch.delenv("ALRUN_FAULT_AT")
    run_experiment(compose_config(REASK), run)
    got = fault_drill.snapshot(run)
    labels = json.loads((run / "state.json").read_text())["labels"]
    assert any(len(set(lab.get("query_rounds", []))) > 1 for lab in labels)  # asked twice
    diff = fault_drill.first_difference(expected, got)
    assert diff is None, f"{diff}: resumed {got.get(diff)} vs uninterrupted {expected.get(diff)}"
