"""scripts/gpu_smoke.sh and scripts/bench_real.sh, run end to end at tiny CPU sizes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, shared_dataset

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
ALRUN = f"{sys.executable} -m alrun.cli"


@pytest.mark.integration
def test_gpu_smoke_script_in_its_tiny_cpu_setting(tmp_path):
    out = tmp_path / "smoke"
    env = {**ENV, "GPU_SMOKE_TINY": "1", "GPU_SMOKE_DIR": str(out), "ALRUN_CMD": ALRUN,
           "ALRUN_CACHE": str(tmp_path / "cache")}  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_smoke.sh")], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1"]  # a 2-round loop
    table = result.stdout.split("per round (results.csv):")[1].splitlines()
    assert table[1].split()[0] == "round" and len(table) == 4
    assert table[2].split()[2] == f"{float(rows[0]['train_s']):.1f}"  # what results.csv says
    config = (out / "config.json").read_text()
    assert "retinanet_resnet50_fpn" in config


@pytest.mark.integration
def test_bench_real_script_sweeps_and_reports(tmp_path):
    shared_dataset("bccd")
    out = tmp_path / "bench"
    env = {**ENV, "ALRUN_CMD": ALRUN, "REPORT_CMD": f"{sys.executable} -m alrun.report.cli",
           "DATASETS": "bccd", "STRATEGIES": "random,entropy", "SEEDS": "0", "OUT": str(out),
           "ALRUN_CACHE": str(tmp_path / "cache")}  # fmt: skip
    tiny = ["dataset.max_pool_images=12", "dataset.max_test_images=4", "budget.initial=4",
            "budget.per_round=2", "budget.rounds=1", "trainer.first_iterations=2",
            "trainer.iterations=1", "trainer.warmup_iters=1",
            "detector.builder.image_size=64"]  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "bench_real.sh"), *tiny], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in Path(out / "bccd").glob("*/results.csv"))
    assert len(runs) == 2 and any("random" in r for r in runs) and any("entropy" in r for r in runs)
    summary = (out / "bccd" / "report_mAP50" / "summary.csv").read_text()
    assert "random" in summary and "entropy" in summary


def test_ci_mmdet_step_is_on_by_default_and_says_why_it_skips(tmp_path):
    """The CI step runs unless turned off, and exits 0 with a one-line reason when it skips."""
    step = REPO / ".ci" / "mmdet_step.sh"
    for env, reason in (
        ({"ALRUN_CI_MINUTES": "1"}, "skipped (only"),  # on by default: stops only for time
        ({"ALRUN_CI_MMDET": "0"}, "skipped (ALRUN_CI_MMDET=0; unset it"),
        ({"ALRUN_CI_MMDET": "1", "ALRUN_CI_MINUTES": "1"}, "skipped (only"),  # no CI budget left
    ):
        result = subprocess.run(
            ["bash", str(step)], env={**ENV, "ALRUN_CI_LOGS": str(tmp_path), **env},
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ci: mmdet step: ") and reason in result.stdout
