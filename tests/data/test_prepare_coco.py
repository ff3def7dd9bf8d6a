"""scripts/prepare_coco.py on a fabricated COCO 2017 layout: checks, one-line errors, config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.data.fabricate import make_coco_root
from tests.helpers import REPO, compose_config

SCRIPT = REPO / "scripts" / "prepare_coco.py"


def prepare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ALRUN_COCO_ROOT", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_coco: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.integration
def test_checks_a_copy_and_writes_a_user_config(tmp_path, monkeypatch):
    root = make_coco_root(tmp_path / "coco")
    result = prepare(tmp_path, "--root", str(root), "--write-config", "mycoco")
    assert result.returncode == 0, result.stderr
    assert "train2017: 8 images (official: 118287; a partial copy)" in result.stdout
    assert "ok: pool 8 images / 8 boxes, test 4 images / 4 boxes, 2 classes" in result.stdout
    monkeypatch.chdir(tmp_path)
    splits = instantiate(compose_config(["dataset=mycoco"]).dataset)
    assert (len(splits.pool), len(splits.test)) == (8, 4)


@pytest.mark.integration
def test_missing_pieces_are_one_line(tmp_path):
    assert_one_line_error(prepare(tmp_path, "--root", str(tmp_path / "none")), "does not exist")
    root = make_coco_root(tmp_path / "coco")
    (root / "annotations" / "instances_val2017.json").unlink()
    assert_one_line_error(
        prepare(tmp_path, "--root", str(root)), "instances_val2017.json", "annotation file"
    )
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    assert_one_line_error(prepare(tmp_path, "--root", str(root)), "not readable as JSON")


def test_class_list_mismatch_is_one_line(tmp_path):
    root = make_coco_root(tmp_path / "coco")
    assert_one_line_error(
        prepare(tmp_path, "--root", str(root), "--classes", "cat", "zebra"),
        "['zebra'] are not among the categories",
    )
