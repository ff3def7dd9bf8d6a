"""scripts/prepare_voc.py on fabricated VOCdevkit trees: checks, one-line errors, config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra.utils import instantiate

from tests.data.fabricate import make_vocdevkit
from tests.helpers import REPO, compose_config

SCRIPT = REPO / "scripts" / "prepare_voc.py"


def prepare(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k != "ALRUN_VOC_ROOT"}
    run_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_voc: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_checks_a_copy_and_writes_a_user_config(tmp_path, monkeypatch):
    root = make_vocdevkit(tmp_path / "VOCdevkit")
    result = prepare(
        tmp_path, "--root", str(root), "--classes", "cat", "dog", "--write-config", "myvoc"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "VOC2007/trainval: 8 images (official: 5011; a partial copy)" in out
    assert "VOC2012/trainval: 6 images" in out and "VOC2007/test: 4 images" in out
    assert "ok: pool 14 images / 14 boxes, test 4 images / 4 boxes, 2 classes" in out
    assert f"export ALRUN_VOC_ROOT={root}" in out
    # the written config is found on the search path from that working directory
    monkeypatch.chdir(tmp_path)
    splits = instantiate(compose_config(["dataset=myvoc"]).dataset)
    assert (len(splits.pool), len(splits.test), splits.classes) == (14, 4, ("cat", "dog"))


def test_root_from_the_environment(tmp_path):
    root = make_vocdevkit(tmp_path / "elsewhere")
    result = prepare(tmp_path, "--classes", "cat", "dog", env={"ALRUN_VOC_ROOT": str(root)})
    assert result.returncode == 0, result.stderr
    assert "ok: pool 14 images" in result.stdout


def test_missing_root_is_one_line(tmp_path):
    assert_one_line_error(
        prepare(tmp_path, "--root", str(tmp_path / "nothing")),
        "nothing: does not exist",
        "--download",
    )


def test_missing_annotations_folder_is_one_line(tmp_path):
    root = make_vocdevkit(tmp_path / "VOCdevkit")
    (root / "VOC2012" / "Annotations").rename(root / "VOC2012" / "Annotations-moved")
    assert_one_line_error(
        prepare(tmp_path, "--root", str(root)), "VOC2012/Annotations does not exist"
    )


def test_missing_image_is_one_line(tmp_path):
    root = make_vocdevkit(tmp_path / "VOCdevkit")
    (root / "VOC2007" / "JPEGImages" / "im03.jpg").unlink()
    assert_one_line_error(
        prepare(tmp_path, "--root", str(root), "--classes", "cat", "dog"),
        "im03.xml",
        "image file not found",
    )


def test_class_list_mismatch_is_one_line(tmp_path):
    root = make_vocdevkit(tmp_path / "VOCdevkit")
    # the default 20 VOC classes: 18 of them never occur in this copy
    assert_one_line_error(prepare(tmp_path, "--root", str(root)), "dataset.classes", "never occur")
    # a class in the data that the list lacks
    assert_one_line_error(
        prepare(tmp_path, "--root", str(root), "--classes", "cat"), "unknown class 'dog'"
    )
