"""Splits and subsets every dataset config shares: split_seed, max_*_images, splits.json,
ignore regions through the label pool, and experiment=smoke with every shipped dataset config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from alrun.data.dataset import (
    DatasetSplits,
    DetectionDataset,
    ImageRecord,
    limit_splits,
    seeded_split,
    split_record,
)
from alrun.errors import DatasetError
from alrun.loop import build_experiment
from alrun.oracle import CostModel, SimulatedOracle
from alrun.pool import LabelPool
from alrun.truth import HiddenTruth
from tests.data.builders import make_coco, make_voc, make_yolo
from tests.data.fabricate import make_coco_root, make_vocdevkit
from tests.helpers import REPO, compose_config, shared_dataset

DATASET_CONFIGS = sorted(p.stem for p in (REPO / "alrun" / "configs" / "dataset").glob("*.yaml"))


def _records(n: int) -> tuple[ImageRecord, ...]:
    box = np.array([[1, 1, 5, 5]], dtype=np.float32)
    return tuple(
        ImageRecord(
            f"id{i:03d}",
            Path(f"/nowhere/{i}.png"),
            10,
            10,
            box,
            np.array([0]),
            ignore_boxes=box + 2 if i % 3 == 0 else None,
            ignore_labels=np.array([0]) if i % 3 == 0 else None,
        )
        for i in range(n)
    )


def test_seeded_subsets_depend_on_split_seed_only_and_keep_ignore_regions() -> None:
    data = DetectionDataset("d", ("a",), _records(50), skipped=("x: bad",))
    splits = seeded_split(data, 0.2, split_seed=7)
    a = limit_splits(splits, max_pool_images=10, max_test_images=4, split_seed=7)
    b = limit_splits(splits, max_pool_images=10, max_test_images=4, split_seed=7)
    c = limit_splits(splits, max_pool_images=10, max_test_images=4, split_seed=8)
    assert (len(a.pool), len(a.test)) == (10, 4) and a.pool.ids == b.pool.ids
    assert a.test.ids == b.test.ids and a.pool.ids != c.pool.ids
    assert set(a.pool.ids) <= set(splits.pool.ids) and set(a.test.ids) <= set(splits.test.ids)
    assert a.pool.skipped == ("x: bad",) and a.split_seed == 7
    by_id = splits.pool.by_id()
    for rec in a.pool.images:  # the very same records: ignore regions survive subsetting
        assert rec is by_id[rec.image_id]
    assert any(rec.ignore_boxes is not None for rec in a.pool.images)
    assert limit_splits(splits, None, 1000, 7) is splits  # nothing to cut: unchanged
    with pytest.raises(DatasetError, match=r"^dataset\.max_pool_images: expected a positive"):
        limit_splits(splits, 0, None, 7)
    with pytest.raises(DatasetError, match=r"^dataset\.split_seed: expected a non-negative"):
        limit_splits(splits, 5, None, -1)


def test_split_record_names_every_pool_and_test_id() -> None:
    splits = seeded_split(DetectionDataset("d", ("a",), _records(10)), 0.3, split_seed=3)
    record = split_record(splits)
    assert record["split_seed"] == 3 and record["classes"] == ["a"]
    assert record["test"]["ids"] == splits.test.ids and record["test"]["count"] == 3
    assert sorted(record["pool"]["ids"] + record["test"]["ids"]) == [
        f"id{i:03d}" for i in range(10)
    ]
    json.dumps(record)  # plain JSON types only


def test_training_set_and_oracle_never_carry_ignore_regions() -> None:
    dataset = DetectionDataset("d", ("a",), _records(6))
    pool = LabelPool(dataset)
    oracle = SimulatedOracle(CostModel(), "box")
    oracle.hold_truth(HiddenTruth(dataset.images))
    pool.add(oracle.annotate(pool.records(["id000", "id003", "id004"])), 0)
    training = pool.training_set()
    assert training.ids == ["id000", "id003", "id004"]
    for rec in training.images:
        assert rec.ignore_boxes is None and rec.ignore_labels is None
        np.testing.assert_array_equal(rec.boxes, [[1, 1, 5, 5]])  # the real box only
    assert pool.labels["id003"].boxes.shape == (1, 4)  # the oracle copied boxes, not ignores


# --- configs: split_seed, subset keys, required keys ----------------------------------------


def _fixture_overrides(option: str, tmp_path: Path) -> list[str]:
    """Overrides that point each dataset config at data (shared or fabricated)."""
    if option in ("bccd", "cards", "txl_pbc"):
        return [f"dataset.root={shared_dataset(option)}"]
    if option == "coco":
        return [f"dataset.annotation_file={make_coco(tmp_path / 'coco')}"]
    if option == "voc":
        return [f"dataset.root={make_voc(tmp_path / 'voc')}"]
    if option == "yolo":
        return [f"dataset.root={make_yolo(tmp_path / 'yolo')}"]
    if option == "voc0712":
        root = make_vocdevkit(tmp_path / "VOCdevkit")
        return [f"dataset.root={root}", "dataset.classes=[cat,dog]"]
    if option == "coco2017":
        return [f"dataset.root={make_coco_root(tmp_path / 'coco2017')}"]
    return []


@pytest.mark.parametrize("option", DATASET_CONFIGS)
def test_smoke_composes_and_builds_with_every_dataset_config(option: str, tmp_path: Path) -> None:
    """experiment=smoke used to set synthetic-only keys (num_pool): every other dataset failed."""
    cfg = compose_config(
        ["experiment=smoke", f"dataset={option}"] + _fixture_overrides(option, tmp_path)
    )
    exp = build_experiment(cfg)
    assert 0 < len(exp.splits.pool) <= 60 and 0 < len(exp.splits.test) <= 20
    if option in ("bccd", "cards", "txl_pbc", "synthetic"):  # big enough to be cut
        assert (len(exp.splits.pool), len(exp.splits.test)) == (60, 20)
    assert not set(exp.splits.pool.ids) & set(exp.splits.test.ids)


@pytest.mark.parametrize("option", ["coco", "voc", "yolo"])
def test_seeded_split_is_the_same_for_every_run_seed(option: str, tmp_path: Path) -> None:
    """The split used to follow `seed`, so each seed of a sweep had its own test set."""
    overrides = [f"dataset={option}", *_fixture_overrides(option, tmp_path)]
    if option == "voc":
        overrides.append("dataset.test_fraction=0.25")
    if option == "yolo":
        overrides.append("dataset.test_split=null")
    tests = {
        seed: instantiate(compose_config([*overrides, f"seed={seed}"]).dataset).test.ids
        for seed in (0, 1, 2)
    }
    assert tests[0] == tests[1] == tests[2]
    other = instantiate(compose_config([*overrides, "dataset.split_seed=11"]).dataset)
    assert other.test.ids != tests[0] and other.split_seed == 11


def test_voc_folder_without_imagesets_uses_config_dirs_and_a_seeded_split(tmp_path: Path) -> None:
    """annotations/ + images/ without ImageSets/: dirs settable without `+`, split by split_seed."""
    root = make_voc(tmp_path / "voc", "annotations", "images", split_files=False)
    overrides = [
        "dataset=voc",
        f"dataset.root={root}",
        "dataset.annotations_dir=annotations",
        "dataset.images_dir=images",
    ]
    splits: DatasetSplits = instantiate(compose_config(overrides).dataset)
    assert (len(splits.pool), len(splits.test)) == (10, 2) and splits.split_seed == 0
    again: DatasetSplits = instantiate(compose_config([*overrides, "seed=4"]).dataset)
    assert again.test.ids == splits.test.ids


# --- the command line, as a user runs it ----------------------------------------------------


def _alrun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "alrun.cli", "quiet=true", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [*cmd, *overrides], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["dataset=coco"], "alrun: error: dataset.annotation_file: required; set "),
        (["dataset=voc"], "alrun: error: dataset.root: required; set dataset.root=<path>"),
        (["dataset=yolo"], "alrun: error: dataset.root: required; set dataset.root=<path>"),
    ],
)
@pytest.mark.integration
def test_required_dataset_keys_are_one_line_errors(tmp_path, overrides, expected) -> None:
    result = _alrun(tmp_path, *overrides)
    assert result.returncode != 0
    error, page = result.stderr.strip().splitlines()[-2:]
    assert error.startswith(expected) and page == "  see docs/getting-started.md", result.stderr
    assert "Traceback" not in result.stderr and "MissingMandatoryValue" not in result.stderr
    assert not list((tmp_path / "run").glob("round_*"))


@pytest.mark.integration
def test_data_yaml_naming_a_missing_directory_from_the_cli(tmp_path: Path) -> None:
    root = make_yolo(
        tmp_path / "ds", data_yaml="train: images/train\nval: images/va\nnames: [a, b]\n"
    )
    result = _alrun(tmp_path, "dataset=yolo", f"dataset.root={root}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-2:] == [
        f"alrun: error: {root / 'data.yaml'}: 'val' names {root / 'images' / 'va'}, "
        "which does not exist",
        "  see docs/getting-started.md",
    ]
    assert not list((tmp_path / "run").glob("round_*"))


@pytest.mark.integration  # ~10 s: the fast tier keeps one end-to-end run per family
def test_smoke_run_on_a_real_dataset_writes_its_splits(tmp_path: Path) -> None:
    """experiment=smoke dataset=bccd finishes, and splits.json records the audited test set."""
    bccd = shared_dataset("bccd")
    result = _alrun(tmp_path, "experiment=smoke", "dataset=bccd", f"dataset.root={bccd}")
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / "round_02" / "metrics.json").is_file()
    record = json.loads((run / "splits.json").read_text())
    assert record["split_seed"] == 0
    assert (record["pool"]["count"], record["test"]["count"]) == (60, 20)
    test_ids = set(record["test"]["ids"])
    bccd_test = (bccd / "ImageSets" / "Main" / "test.txt").read_text().split()
    assert test_ids <= set(bccd_test)  # a subset of BCCD's own test split
    labelled = json.loads((run / "round_00" / "labelled.json").read_text())
    assert not {im["alrun_id"] for im in labelled["images"]} & test_ids
