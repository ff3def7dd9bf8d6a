"""budget.initial_ids: a run starts from a listed initial set (PPAL's and MI-AOD's own splits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from alrun.data.dataset import DatasetSplits, DetectionDataset, ImageRecord
from alrun.errors import BudgetError
from alrun.initial_set import check_affordable, resolve
from alrun.loop import run_experiment
from tests.helpers import compose_config


def _records(prefix: str, names: list[str], boxes: int = 1) -> tuple[ImageRecord, ...]:
    return tuple(
        ImageRecord(
            f"{prefix}_{Path(n).stem}",
            Path(f"/data/{prefix}/{n}"),
            10,
            10,
            np.zeros((boxes, 4), np.float32),
            np.zeros(boxes, np.int64),
        )
        for n in names
    )


def _splits() -> DatasetSplits:
    pool = DetectionDataset("voc0712", ("a",), _records("VOC2007", ["000005.jpg", "000007.jpg"]))
    pool = DetectionDataset(
        "voc0712", ("a",), pool.images + _records("VOC2012", ["2008_000002.jpg"])
    )
    test = DetectionDataset("voc07test", ("a",), _records("VOC2007", ["000001.jpg"]))
    return DatasetSplits(pool, test, None, _records("VOC2012", ["2008_000003.jpg"]))


def test_text_file_of_ids_names_and_stems_keeps_its_order(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# PPAL seed 1\n2008_000002.jpg\n\nVOC2007_000005  # an alrun id\n000007\n")
    assert resolve(path, _splits()) == ("VOC2012_2008_000002", "VOC2007_000005", "VOC2007_000007")


def test_ppal_coco_json_matches_by_file_name_when_its_ids_are_its_own(tmp_path):
    """PPAL's voc_827_labeled_*.json (tools/al_data/create_al_dataset.py): a COCO subset of its
    own trainval_0712.json, integer ids and file names of the flattened VOC0712/images."""
    path = tmp_path / "voc_827_labeled_1.json"
    images = [{"id": 7, "file_name": "000007.jpg"}, {"id": 1, "file_name": "2008_000002.jpg"}]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    assert resolve(path, _splits()) == ("VOC2007_000007", "VOC2012_2008_000002")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("VOC2007_000005\nVOC2007_999999\nnope\n", "'VOC2007_999999' is not an image of the pool"),
        ("000001.jpg\n", "'000001.jpg' is in the test split of 'voc07test', not in the pool"),
        ("2008_000003\n", "'2008_000003' was left out of the pool"),
        ("000005.jpg\nVOC2007_000005\n", "image 'VOC2007_000005' is listed twice"),
        ("# nothing\n\n", "lists no image"),
    ],
)
def test_bad_lists_are_one_line_naming_the_file_and_the_entry(tmp_path, text, message):
    path = tmp_path / "ids.txt"
    path.write_text(text)
    with pytest.raises(BudgetError, match=message) as err:
        resolve(path, _splits())
    assert str(err.value).startswith(f"budget.initial_ids: {path}") and "\n" not in str(err.value)


def test_bad_coco_files_are_one_line(tmp_path):
    path = tmp_path / "split.json"
    path.write_text("{not json")
    with pytest.raises(BudgetError, match="is not valid JSON"):
        resolve(path, _splits())
    path.write_text(json.dumps({"images": [{"id": "VOC2007_000005", "file_name": "000007.jpg"}]}))
    with pytest.raises(BudgetError, match="name different pool images"):
        resolve(path, _splits())
    path.write_text(json.dumps({"images": [{"id": 3, "file_name": "x.jpg"}]}))
    with pytest.raises(BudgetError, match="'3' / 'x.jpg' is not an image of the pool"):
        resolve(path, _splits())
    with pytest.raises(BudgetError, match="budget.initial_ids: no file at"):
        resolve(tmp_path / "missing.txt", _splits())


def test_more_than_the_initial_budget_is_refused():
    with pytest.raises(BudgetError, match="lists 3 images costing 3 images, more than budget.in"):
        check_affordable(Path("f.txt"), ["a", "b", "c"], 2, "images", lambda _: 1.0)
    check_affordable(Path("f.txt"), ["a", "b"], 2, "images", lambda _: 1.0)  # fits


def test_smoke_run_starts_from_the_listed_images(tmp_path):
    """End to end: round 0 trains on exactly the listed images; a too-long list stops the run
    before anything is written."""
    base = ["experiment=smoke", "quiet=true", "budget.rounds=0", "strategy=random"]
    pool_ids = [r.image_id for r in instantiate(compose_config(base).dataset).pool.images]
    listed = pool_ids[3:10]  # 7 of the 10 the budget allows
    ids = tmp_path / "initial.txt"
    ids.write_text("\n".join(listed) + "\n")
    rows = run_experiment(compose_config([*base, f"budget.initial_ids={ids}"]), tmp_path / "run")
    labelled = json.loads((tmp_path / "run/round_00/labelled.json").read_text())["images"]
    assert sorted(im["alrun_id"] for im in labelled) == sorted(listed)
    assert [r["images"] for r in rows] == [7]
    ids.write_text("\n".join(pool_ids[:11]) + "\n")
    with pytest.raises(BudgetError, match="lists 11 images costing 11 images, more than budget"):
        run_experiment(compose_config([*base, f"budget.initial_ids={ids}"]), tmp_path / "big")
    assert not (tmp_path / "big").exists() or not any((tmp_path / "big").iterdir())


@pytest.mark.integration
def test_cli_names_the_file_and_the_unknown_id_and_writes_nothing(tmp_path):
    from tests.test_cli import alrun, assert_clean_failure

    ids = tmp_path / "ids.txt"
    ids.write_text("no_such_image\n")
    result = alrun(tmp_path, f"budget.initial_ids={ids}")
    assert_clean_failure(
        result, tmp_path, f"alrun: error: budget.initial_ids: {ids}: 'no_such_image' is not an"
    )
    assert result.stderr.strip().splitlines()[1:] == ["  see docs/budgets.md"]


@pytest.mark.integration
def test_cli_refuses_a_step_milestone_past_the_round_in_one_line(tmp_path):
    from tests.test_cli import alrun, assert_clean_failure

    result = alrun(tmp_path, "trainer.lr_schedule=step", "trainer.lr_steps=[7]")
    assert_clean_failure(result, tmp_path, "alrun: error: trainer.lr_steps: milestone 7 is past")
    assert len(result.stderr.strip().splitlines()) == 2
