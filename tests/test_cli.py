"""The ``alrun`` command: bad input gives a one-line error, a non-zero exit and no round dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def alrun(tmp_path: Path, *overrides: str, preset: str = "smoke") -> subprocess.CompletedProcess:
    """Run the CLI; ``preset`` is the experiment (smoke sizes the synthetic data, so tests of
    other datasets pass ``preset="demo"``: they fail before any training)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "alrun.cli",
        f"experiment={preset}",
        "quiet=true",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def assert_clean_failure(result: subprocess.CompletedProcess, tmp_path: Path, *needles: str):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not list((tmp_path / "run").glob("round_*")), "a partial round dir was left behind"
    assert not list((tmp_path / "run").glob(".round_*"))


def test_smoke_runs_and_prints_help(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "alrun.cli", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        check=True,
    ).stdout
    assert "strategy: entropy, least_confidence, margin, random" in help_text
    result = alrun(tmp_path, "budget.rounds=1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "round_01" / "selection.json").exists()


def test_unknown_strategy(tmp_path):
    result = alrun(tmp_path, "strategy=entropyy")
    assert_clean_failure(result, tmp_path, "strategy/entropyy")


def test_config_key_typo(tmp_path):
    result = alrun(tmp_path, "trainer.lrr=0.1")
    assert_clean_failure(result, tmp_path, "lrr")


def test_missing_dataset_path(tmp_path):
    result = alrun(tmp_path, "dataset=voc", "dataset.root=/no/such/dir", preset="demo")
    assert_clean_failure(result, tmp_path, "alrun: error: dataset.root", "/no/such/dir")
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_annotation(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")
    result = alrun(
        tmp_path,
        "dataset=voc",
        f"dataset.root={root}",
        "dataset.pool_split=null",
        "dataset.test_split=null",
        "dataset.test_fraction=0.5",
        preset="demo",
    )
    assert_clean_failure(result, tmp_path, "alrun: error:", "broken.xml")


def test_budget_unit_typo(tmp_path):
    result = alrun(tmp_path, "budget.unit=imgs")
    assert_clean_failure(result, tmp_path, "budget.unit", "imgs")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("dataset.num_pool=0", "must be > 0"),
        ("budget.initial=5000", "budget.initial"),
        ("detector.pretrained=/no/such.pt", "detector.pretrained"),
        ("budget.per_round=0", "budget.per_round"),
        ("trainer.init=warm", "trainer.init"),
        ("strategy.scorer.aggregator=median", "strategy.scorer.aggregator"),
    ],
)
def test_bad_values(tmp_path, override, needle):
    result = alrun(tmp_path, override)
    assert_clean_failure(result, tmp_path, "alrun: error:", needle)


def test_sweep_writes_one_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "alrun.cli",
        "-m",
        "experiment=smoke",
        "budget.rounds=1",
        "strategy=random,entropy",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    runs = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.glob("*/results.csv"))
    assert runs == [
        "budget.rounds=1,experiment=smoke,strategy=entropy",
        "budget.rounds=1,experiment=smoke,strategy=random",
    ]


def test_wrong_key_for_the_chosen_dataset(tmp_path):
    """A synthetic-only key with a VOC dataset is a one-line config error."""
    result = alrun(tmp_path, "dataset=voc", "dataset.root=/tmp", "+dataset.num_pool=60")
    assert_clean_failure(result, tmp_path, "alrun: error: dataset:", "num_pool")
    assert len(result.stderr.strip().splitlines()) == 1
