"""Sweep integration: launcher configs compose, the end-of-sweep callback writes the report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

REPO = Path(__file__).resolve().parents[1]
HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


@pytest.mark.skipif(
    not HAS_SUBMITIT, reason="hydra-submitit-launcher not installed ([slurm] extra)"
)
@pytest.mark.parametrize(
    ("option", "cls"),
    [
        ("slurm", "SlurmLauncher"),
        ("submitit_slurm", "SlurmLauncher"),
        ("submitit_local", "LocalLauncher"),
    ],
)
def test_submitit_launcher_configs_compose(option, cls, tmp_path):
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        cfg = compose(
            config_name="run",
            overrides=[f"hydra/launcher={option}", f"hydra.sweep.dir={tmp_path}"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(cls)
    assert launcher.submitit_folder == f"{tmp_path}/.submitit/%j"
    # the plugin accepts every field we ship (an unknown or missing one would fail here)
    built = instantiate(launcher)
    assert type(built).__name__ == cls
    assert set(built.params) == set(launcher) - {"_target_"}
    if option == "slurm":  # alrun's defaults on top of the plugin's
        assert (launcher.cpus_per_task, launcher.timeout_min) == (8, 240)


@pytest.mark.integration
def test_sweep_ends_with_report_and_failed_job_listed(tmp_path):
    """A 2-job sweep where one job fails on bad input: the sweep finishes and reports both."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "ALRUN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alrun.cli",
            "-m",
            "experiment=smoke",
            "strategy=random",
            "budget.initial=10,100000",
            "trainer.iterations=1",
            "trainer.first_iterations=1",
            "budget.rounds=1",
            "dataset.num_pool=20",
            "dataset.num_test=6",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    errors = list(sweep_dir.rglob("error.json"))
    assert len(errors) == 1 and "budget.initial" in json.loads(errors[0].read_text())["error"]
    page = (sweep_dir / "report" / "report.html").read_text()
    assert "failed: budget.initial" in page
    summary = (sweep_dir / "report" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and summary[1].startswith("random,0,complete")
    assert "mAP by strategy.name" in result.stdout


@pytest.mark.integration
def test_a_job_that_hits_a_bug_is_recorded_and_the_sweep_goes_on(tmp_path):
    """A genuine bug (not a user error) in one job: traceback.txt + error.json there, the other
    job still runs, the sweep's report lists the failed job, exit 0."""
    sweep_dir = tmp_path / "sweep"
    env = {
        **os.environ,
        "ALRUN_CACHE": str(tmp_path / "cache"),
        "ALRUN_FAULT_AT": "strategy=entropy",  # the first file written by the entropy job
        "ALRUN_FAULT_KIND": "bug",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alrun.cli",
            "-m",
            "experiment=smoke",
            "strategy=entropy,random",  # the failing job first: nothing after it may be lost
            "trainer.iterations=1",
            "trainer.first_iterations=1",
            "budget.rounds=1",
            "dataset.num_pool=20",
            "dataset.num_test=6",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (failed,) = sweep_dir.glob("*strategy=entropy*")
    (succeeded,) = sweep_dir.glob("*strategy=random*")
    error = json.loads((failed / "error.json").read_text())["error"]
    assert error.startswith("bug: RuntimeError: injected fault at write"), error
    assert "Traceback" in (failed / "traceback.txt").read_text()
    assert (succeeded / "results.csv").is_file() and not (succeeded / "error.json").exists()
    assert "1 of 2 jobs failed" in result.stderr
    page = (sweep_dir / "report" / "report.html").read_text()
    assert "failed: bug: RuntimeError" in page
