"""oracle=recorded: imported labels replayed through the loop, checked at start-up (issue 10)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from alrun.data.dataset import DatasetSplits, DetectionDataset, ImageRecord
from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.oracle import CostModel, SimulatedOracle
from alrun.recorded_oracle import RecordedOracle
from alrun.types import ImageLabels
from tests.helpers import compose_config, shared_dataset

CLASSES = ("RBC", "WBC", "Platelets")


def rec(image_id: str, boxes=((4, 4, 20, 20),), labels=(0,), width=64, height=48) -> ImageRecord:
    return ImageRecord(
        image_id,
        Path(f"{image_id}.jpg"),
        width,
        height,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
    )


POOL = (
    rec("a", ((4, 4, 20, 20), (30, 10, 50, 40)), (0, 1)),
    rec("b", ((0, 0, 10, 10),), (2,)),
    rec("c", ((5, 5, 15, 15), (20, 20, 30, 30), (40, 5, 60, 25)), (0, 0, 1)),
)
SPLITS = DatasetSplits(
    DetectionDataset("tiny", CLASSES, POOL), DetectionDataset("tiny", CLASSES, (rec("t"),))
)


def write_lines(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "labels.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def recorded(path: Path, missing: str = "error", **simulated) -> RecordedOracle:
    oracle = RecordedOracle(path, SimulatedOracle(CostModel(), **simulated), missing=missing)
    oracle.check_data(SPLITS)
    return oracle


CLICK_A = {
    "image_id": "a",
    "kind": "center_click",
    "labels": ["RBC", 1],
    "points": [[12, 12], [40.5, 25]],
    "cost_s": 4.25,
}
BOX_B = {"image_id": "b", "kind": "box", "labels": ["Platelets"], "boxes": [[1, 2, 9, 10]]}


def test_answers_are_the_file_with_class_names_as_indices(tmp_path):
    extreme_c = {
        "image_id": "c",
        "kind": "extreme",
        "labels": [2],
        "extreme_points": [[[5, 9], [8, 4], [15, 10], [9, 16]]],
        "cost_s": 7,
    }
    oracle = recorded(write_lines(tmp_path, CLICK_A, BOX_B, extreme_c))
    (a,) = oracle.annotate([POOL[0]], "center_click")
    assert a.kind == "center_click" and a.cost_s == 4.25
    np.testing.assert_array_equal(a.labels, [0, 1])
    np.testing.assert_array_equal(a.points, [[12, 12], [40.5, 25]])
    assert a.boxes.shape == (0, 4)
    (b,) = oracle.annotate([POOL[1]], "box")
    np.testing.assert_array_equal(b.boxes, [[1, 2, 9, 10]])  # not the ground truth (0, 0, 10, 10)
    np.testing.assert_array_equal(b.labels, [2])
    (c,) = oracle.annotate([POOL[2]], "extreme")
    np.testing.assert_array_equal(c.boxes, [[5, 4, 15, 16]])  # the points' tight box
    np.testing.assert_array_equal(c.labels, [2])
    assert c.extreme_points.shape == (1, 4, 2) and c.cost_s == 7.0


def test_cost_is_the_files_else_the_cost_models_price_of_the_recorded_objects(tmp_path):
    lines = [
        {**CLICK_A, "cost_s": None},  # 2 center clicks -> 2 x 1.87
        BOX_B,  # 1 box -> 25.5
        {"image_id": "c", "kind": "image_label", "image_classes": ["WBC", "RBC", 0]},  # 2 classes
    ]
    oracle = recorded(write_lines(tmp_path, *lines))
    a, b, c = POOL
    assert oracle.annotate([a], "center_click")[0].cost_s == pytest.approx(2 * 1.87)
    assert oracle.annotate([b], "box")[0].cost_s == pytest.approx(25.5)
    answer = oracle.annotate([c], "image_label")[0]
    np.testing.assert_array_equal(answer.image_classes, [0, 1])
    assert answer.cost_s == pytest.approx(2.0)
    # the budget's price: the recorded cost, or the simulated price when the file cannot answer
    with_cost = recorded(write_lines(tmp_path, CLICK_A))
    assert with_cost.cost(a, "center_click") == 4.25
    assert with_cost.cost(a, "box") == CostModel().cost(a, "box") == 2 * 25.5
    assert with_cost.cost(b, "center_click") == pytest.approx(1.87)


def test_missing_images_are_an_error_or_simulated(tmp_path, caplog):
    path = write_lines(tmp_path, CLICK_A)
    oracle = recorded(path)
    with pytest.raises(AlrunError) as err:
        oracle.annotate(POOL[:2], "center_click")
    assert str(err.value) == (
        f"oracle.path: {path} has no 'center_click' label for image 'b'; 1 of the 2 images "
        "asked for are not answered; add them to the file or set oracle.missing=simulate"
    )
    with pytest.raises(AlrunError, match="no 'box' label for image 'a' \\(it holds a 'center_c"):
        oracle.annotate(POOL[:1], "box")
    simulate = recorded(path, missing="simulate", seed=3)
    with caplog.at_level(logging.INFO, logger="alrun.recorded_oracle"):
        a, b = simulate.annotate(POOL[:2], "center_click")
    assert (
        "oracle: 1 of 2 'center_click' labels simulated (labels.jsonl has none for them)"
        in caplog.text
    )
    assert a.cost_s == 4.25  # from the file
    expected = SimulatedOracle(CostModel(), seed=3).annotate(POOL[1:2], "center_click")[0]
    assert b.to_json() == expected.to_json()


def test_kinds_and_require_are_the_simulated_oracles(tmp_path):
    path = write_lines(tmp_path, CLICK_A)
    oracle = RecordedOracle(path, SimulatedOracle(CostModel(), kind="center_click"))
    assert oracle.kinds == ("center_click",)
    with pytest.raises(AlrunError, match="oracle.kind=center_click only produces"):
        oracle.require(["box"], "supervision (FullRegime)")


def _errors(path: str) -> list[tuple[list, str]]:
    where = f"oracle.path: {path} line 2"
    image_a = f"{where} (image 'a', 64x48)"
    known = "known classes: 0=RBC, 1=WBC, 2=Platelets"
    return [
        (
            [CLICK_A, '{"image_id": "b", "kind": "box",'],
            f"{where}: malformed JSON (Expecting property name enclosed in double quotes at "
            "column 33); expected one JSON object per line",
        ),
        (
            [BOX_B, {"image_id": "a", "kind": "scribble", "labels": []}],
            f"{where}: unknown kind 'scribble'; expected one of box, extreme, click, center_click, "
            "image_label",
        ),
        (
            [BOX_B, {**CLICK_A, "points": [[12, 12], [70, 25]]}],
            f"{image_a}: click (70, 25) is outside the 64x48 image; expected 0 <= x <= 64 and "
            "0 <= y <= 48",
        ),
        (
            [BOX_B, {"image_id": "a", "kind": "box", "labels": [0], "boxes": [[-2, 0, 10, 10]]}],
            f"{image_a}: box (-2, 0, 10, 10) is outside the 64x48 image; expected 0 <= x <= 64 "
            "and 0 <= y <= 48",
        ),
        (
            [BOX_B, {**CLICK_A, "labels": ["RBC", "neutrophil"]}],
            f"{image_a}: unknown class name 'neutrophil' in 'labels'; {known}",
        ),
        (
            [BOX_B, {**CLICK_A, "labels": [0, 3]}],
            f"{image_a}: class index 3 in 'labels' out of range 0..2; {known}",
        ),
        (
            [BOX_B, {**CLICK_A, "labels": [0]}],
            f"{image_a}: 2 points but 1 labels; expected one class label per object",
        ),
        (
            [BOX_B, {**CLICK_A, "image_id": "zebra"}],
            f"{where}: image id 'zebra' is not in the dataset (4 images in its pool and test "
            "splits, e.g. a, b, c)",
        ),
        (
            [BOX_B, {**BOX_B, "cost_s": 3}],
            f"{where}: duplicate image id 'b' (first on line 1); expected one entry per image",
        ),
        (
            [BOX_B, {**CLICK_A, "cost_s": -1.5}],
            f"{where}: 'cost_s' must be a finite number of seconds >= 0, got -1.5",
        ),
        (
            [BOX_B, {"image_id": "a", "kind": "verify", "labels": [0], "boxes": [[0, 0, 5, 5]]}],
            f"{where}: unknown kind 'verify'; expected one of box, extreme, click, center_click, "
            "image_label ('verify' answers judge the run's own predicted boxes and cannot be "
            "replayed)",
        ),
        (
            [
                BOX_B,
                {
                    "image_id": "a",
                    "kind": "extreme",
                    "labels": [0],
                    "extreme_points": [[[5, 9], [8, -1], [15, 10], [9, 16]]],
                },
            ],
            f"{image_a}: extreme point (8, -1) is outside the 64x48 image; expected 0 <= x <= 64 "
            "and 0 <= y <= 48",
        ),
        (
            [BOX_B, {**CLICK_A, "points": [[10**400, 100], [3, 4]]}],
            f"{image_a}: 'points' must be finite numbers, got a value beyond float range",
        ),
        (
            [BOX_B, {**CLICK_A, "points": [[1e39, 100], [3, 4]]}],
            f"{image_a}: 'points' must be finite numbers, got a value beyond float range",
        ),
        (
            [BOX_B, {**CLICK_A, "cost_s": 10**400}],
            f"{where}: 'cost_s' must be a finite number of seconds >= 0, got a value beyond "
            "float range",
        ),
        (
            [BOX_B, {"image_id": "a", "kind": "box", "labels": [0], "boxes": [[5, 5, 5, 10]]}],
            f"{image_a}: box (5, 5, 5, 10) has no area; expected x1 < x2 and y1 < y2 (xyxy pixels)",
        ),
        (
            [
                BOX_B,
                {
                    "image_id": "a",
                    "kind": "extreme",
                    "labels": [0],
                    "extreme_points": [[[5, 9], [5, 4], [5, 10], [5, 16]]],
                },
            ],
            f"{image_a}: extreme points of object 0 span no area (box (5, 4, 5, 16)); expected "
            "left < right and top < bottom",
        ),
    ]


CASES = (
    "malformed_json",
    "unknown_kind",
    "click_outside",
    "box_outside",
    "unknown_class_name",
    "class_index_out_of_range",
    "count_mismatch",
    "id_not_in_dataset",
    "duplicate_id",
    "negative_cost",
    "verify_kind",
    "extreme_point_outside",
    "huge_int_point",
    "point_beyond_float32",
    "huge_int_cost",
    "zero_width_box",
    "zero_width_extreme",
)


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_bad_files_are_one_line_errors_naming_file_line_and_expectation(tmp_path, case):
    path = tmp_path / "labels.jsonl"
    lines, message = _errors(str(path))[case]
    write_lines(tmp_path, *lines)
    with pytest.raises(AlrunError) as err:
        recorded(path)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


@pytest.mark.integration
def test_cli_refuses_a_click_outside_the_image_before_training(tmp_path):
    from tests.test_cli import alrun, assert_clean_failure

    pool = instantiate(compose_config(["experiment=smoke"]).dataset).pool
    first = pool.images[0]
    click = {
        "image_id": first.image_id,
        "kind": "center_click",
        "labels": [0],
        "points": [[first.width + 7, 3]],
    }
    path = write_lines(tmp_path, click)
    result = alrun(tmp_path, "supervision=weak_point", "oracle=recorded", f"oracle.path={path}")
    assert result.returncode == 2
    expected = (
        f"alrun: error: oracle.path: {path} line 1 (image '{first.image_id}', "
        f"{first.width}x{first.height}): click ({first.width + 7}, 3) is outside the "
        f"{first.width}x{first.height} image; expected 0 <= x <= {first.width} and "
        f"0 <= y <= {first.height}\n  see docs/supervision.md"
    )
    assert result.stderr.strip() == expected
    assert_clean_failure(result, tmp_path)


SMOKE = ["experiment=smoke", "quiet=true", "budget.rounds=1", "supervision=weak_point"]


def test_a_runs_labelled_json_replays_as_the_same_labels(tmp_path):
    run_experiment(compose_config(SMOKE), tmp_path / "run")
    labelled = tmp_path / "run/round_01/labelled.json"
    state = json.loads((tmp_path / "run/state.json").read_text())
    bought = [ImageLabels.from_json(x) for x in state["labels"]]
    assert {x.kind for x in bought} == {"box", "center_click"}
    splits = instantiate(compose_config(SMOKE).dataset)
    oracle = RecordedOracle(labelled, SimulatedOracle(CostModel()))
    oracle.check_data(splits)
    records = splits.pool.by_id()
    for original in bought:
        (replayed,) = oracle.annotate([records[original.image_id]], original.kind)
        assert replayed.to_json() == original.to_json()


def test_weak_point_trains_on_imported_clicks(tmp_path):
    """Round 0's boxes are simulated (missing=simulate), every click comes from the file."""
    pool = instantiate(compose_config(SMOKE).dataset).pool
    lines = []
    for r in pool.images:  # one click 1 px right of each box center, 3 s per image
        centers = (r.boxes[:, :2] + r.boxes[:, 2:]) / 2 + [1.0, 0.0]
        centers = np.minimum(centers, [r.width, r.height])
        names = [pool.classes[i] for i in r.labels.tolist()]
        lines.append(
            {
                "image_id": r.image_id,
                "kind": "center_click",
                "labels": names,
                "points": centers.tolist(),
                "cost_s": 3.0,
            }
        )
    path = write_lines(tmp_path, *lines)
    cfg = compose_config(
        [*SMOKE, "oracle=recorded", f"oracle.path={path}", "oracle.missing=simulate"]
    )
    rows = run_experiment(cfg, tmp_path / "run")
    assert rows[1]["cost_s"] == pytest.approx(rows[0]["cost_s"] + 10 * 3.0)
    labelled = json.loads((tmp_path / "run/round_01/labelled.json").read_text())
    clicked = [im for im in labelled["images"] if im["label_kind"] == "center_click"]
    assert len(clicked) == 10
    by_id = {x["image_id"]: x for x in lines}
    for image in clicked:
        np.testing.assert_allclose(image["points"], by_id[image["alrun_id"]]["points"], atol=1e-4)
        assert image["cost_s"] == 3.0
    record = json.loads((tmp_path / "run/round_01/supervision.json").read_text())
    (pseudo,) = record["pseudo_boxes"]
    assert pseudo["clicks"] == rows[1]["clicks"] == sum(len(im["points"]) for im in clicked)


def _answer_from_truth(record: ImageRecord, kind: str) -> dict:
    """What an annotator of ``kind`` would have recorded for ``record`` (exact, 0.5 s)."""
    boxes = record.boxes.astype(float)
    entry = {"image_id": record.image_id, "kind": kind, "cost_s": 0.5}
    if kind == "image_label":
        return {**entry, "image_classes": sorted(set(record.labels.tolist()))}
    entry["labels"] = record.labels.tolist()
    x1, y1, x2, y2 = boxes.T
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if kind == "box":
        entry["boxes"] = boxes.tolist()
    elif kind == "extreme":
        entry["extreme_points"] = np.stack(
            [np.stack(p, axis=1) for p in ((x1, cy), (cx, y1), (x2, cy), (cx, y2))], axis=1
        ).tolist()
    else:
        entry["points"] = np.stack([cx, cy], axis=1).tolist()
    return entry


@pytest.mark.parametrize(
    ("regime", "kind"),
    [
        ("full", "box"),
        ("extreme", "extreme"),
        ("image_level", "image_label"),
        ("box_verification", "box"),  # verify requests are simulated
        ("weak_point", "center_click"),
    ],
)
@pytest.mark.integration
def test_every_regime_runs_on_recorded_labels(tmp_path, regime, kind):
    overrides = [*SMOKE[:3], f"supervision={regime}"]
    pool = instantiate(compose_config(overrides).dataset).pool
    if regime == "weak_point":  # its initial set is all clicks too: everything from the file
        overrides.append("supervision.initial_kind=center_click")
    path = write_lines(tmp_path, *(_answer_from_truth(r, kind) for r in pool.images))
    extra = ["oracle=recorded", f"oracle.path={path}", "oracle.missing=simulate"]
    rows = run_experiment(compose_config([*overrides, *extra]), tmp_path / "run")
    assert [r["images"] for r in rows] == [10, 20]
    labelled = json.loads((tmp_path / "run/round_01/labelled.json").read_text())
    from_file = [im for im in labelled["images"] if im["label_kind"] == kind]
    if regime == "box_verification":  # rejected proposals' boxes also add the verify seconds
        from_file = [im for im in from_file if im["round"] == 0]
    assert from_file and all(im["cost_s"] == 0.5 for im in from_file)
    simulated = [im for im in labelled["images"] if im["label_kind"] != kind]
    assert all(im["cost_s"] != 0.5 for im in simulated)
    if regime == "weak_point":
        assert len(from_file) == 20 and rows[1]["cost_s"] == pytest.approx(20 * 0.5)
    if regime != "box_verification":  # the run's labelled.json replays as the labels it bought
        state = json.loads((tmp_path / "run/state.json").read_text())
        replay = RecordedOracle(
            tmp_path / "run/round_01/labelled.json", SimulatedOracle(CostModel())
        )
        replay.check_data(instantiate(compose_config(overrides).dataset))
        records = pool.by_id()
        for bought in map(ImageLabels.from_json, state["labels"]):
            (again,) = replay.annotate([records[bought.image_id]], bought.kind)
            assert again.to_json() == bought.to_json()


def test_bad_settings_are_one_line_errors(tmp_path):
    fallback = SimulatedOracle(CostModel())
    with pytest.raises(AlrunError) as err:
        RecordedOracle(tmp_path / "nope.jsonl", fallback)
    assert str(err.value) == f"oracle.path: {tmp_path / 'nope.jsonl'} is not a file"
    with pytest.raises(AlrunError) as err:
        RecordedOracle(write_lines(tmp_path, BOX_B), fallback, missing="maybe")
    assert str(err.value) == "oracle.missing: expected one of error|simulate, got 'maybe'"
    with pytest.raises(AlrunError, match="^oracle.path: .* no labels; expected one JSON object"):
        RecordedOracle(write_lines(tmp_path, ""), fallback)


def test_a_file_for_the_whole_dataset_replays_on_a_max_pool_images_subset(tmp_path):
    """Entries for images that dataset.max_pool_images left out are checked but not refused."""
    bccd = ["experiment=smoke", "dataset=bccd", f"dataset.root={shared_dataset('bccd')}"]
    full = instantiate(compose_config([*bccd, "dataset.max_pool_images=null"]).dataset)
    subset = instantiate(compose_config(bccd).dataset)
    assert len(subset.pool) < len(full.pool)
    outside = next(r for r in full.pool.images if r.image_id not in set(subset.pool.ids))
    inside = subset.pool.images[0]
    lines = [
        {"image_id": r.image_id, "kind": "box", "labels": [int(r.labels[0])],
         "boxes": [r.boxes[0].tolist()], "cost_s": 9.5}
        for r in (outside, inside)
    ]  # fmt: skip
    oracle = RecordedOracle(write_lines(tmp_path, *lines), SimulatedOracle(CostModel()))
    oracle.check_data(subset)
    (answer,) = oracle.annotate([inside], "box")
    assert answer.cost_s == 9.5 and answer.labels.tolist() == [int(inside.labels[0])]
    bad = {**lines[0], "boxes": [[0, 0, outside.width + 50, 5]]}
    oracle = RecordedOracle(write_lines(tmp_path, bad), SimulatedOracle(CostModel()))
    with pytest.raises(AlrunError, match=f"image '{outside.image_id}'.*outside"):
        oracle.check_data(subset)  # still checked against its image
    unknown = {**lines[1], "image_id": "not-an-image"}
    oracle = RecordedOracle(write_lines(tmp_path, unknown), SimulatedOracle(CostModel()))
    with pytest.raises(AlrunError, match="image id 'not-an-image' is not in the dataset"):
        oracle.check_data(subset)


@pytest.mark.parametrize(
    "annotation, expected",
    [
        ({"image_id": 1, "category_id": 1}, "'bbox' must be 4 numbers [x, y, w, h], got None"),
        ({"image_id": 1, "category_id": 1, "bbox": [1, 2, "w", 4]}, "got [1, 2, 'w', 4]"),
        ({"image_id": 1, "bbox": [1, 2, 3, 4]}, "expected 'image_id' and 'category_id'"),
    ],
)
def test_a_malformed_labelled_json_annotation_is_a_one_line_error(tmp_path, annotation, expected):
    coco = {
        "images": [{"id": 1, "alrun_id": "a", "label_kind": "box"}],
        "annotations": [annotation],
        "categories": [{"id": 1, "name": "RBC"}],
    }
    path = tmp_path / "labelled.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(AlrunError) as err:
        recorded(path)
    assert str(err.value).startswith(f"oracle.path: {path} annotation 1: ")
    assert expected in str(err.value) and "\n" not in str(err.value)
