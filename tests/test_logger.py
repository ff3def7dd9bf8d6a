"""The optional wandb logger: offline logging works, and nothing about wandb can break a run."""

from __future__ import annotations

import builtins
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from alrun.logger import NullLogger, WandbLogger
from tests.helpers import compose_config

HAS_WANDB = importlib.util.find_spec("wandb") is not None
ROW = {
    "round": 0,
    "images": 10,
    "boxes": 30,
    "cost_s": 765.0,
    "mAP": 0.25,
    "mAP50": 0.5,
    "mAR": 0.4,
}
METRICS = {
    "per_class": {"cat": {"AP": 0.25, "AP50": 0.5}, "dog": {"AP": None}},
    "error_impact_AP50": {"AP50": 0.5, "d_fp": 0.1},
}


def test_default_logger_is_none():
    assert isinstance(instantiate(compose_config([]).logger), NullLogger)
    assert type(instantiate(compose_config(["logger=wandb"]).logger)) is WandbLogger


def test_missing_wandb_only_warns(monkeypatch, tmp_path, caplog):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    logger = WandbLogger(mode="offline")
    with caplog.at_level(logging.WARNING, logger="alrun"):
        logger.start({"seed": 0}, tmp_path, "x")
        logger.log_round(ROW, METRICS, [])
        logger.finish()
    assert "wandb is not installed" in caplog.text


def test_failing_wandb_init_only_warns(monkeypatch, tmp_path, caplog):
    pytest.importorskip("wandb", reason="wandb not installed (optional [wandb] extra)")
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    logger = WandbLogger(mode="online")
    with caplog.at_level(logging.WARNING, logger="alrun"):
        logger.start({"seed": 0}, tmp_path, "x")
        logger.log_round(ROW, METRICS, [])
        logger.finish()
    assert "wandb.init failed" in caplog.text and "api_key" in caplog.text


@pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed (optional [wandb] extra)")
def test_offline_run_logs_rounds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    logger = WandbLogger(mode="offline", project="alrun-test")
    logger.start({"seed": 0, "strategy": {"name": "entropy"}}, tmp_path, "entropy-seed0")
    run = logger._run
    assert run is not None and run.offline
    logger.log_round(ROW, METRICS, [image])
    logger.log_round({**ROW, "round": 1, "images": 20, "mAP": 0.3}, METRICS, [])
    summary = dict(run.summary)
    logger.finish()
    assert summary["mAP"] == pytest.approx(0.3)
    assert summary["by_cost_s/mAP50"] == pytest.approx(0.5)
    assert summary["per_class/AP/cat"] == pytest.approx(0.25)
    assert "per_class/AP/dog" not in summary  # a class without ground truth is not invented
    assert list(Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed (optional [wandb] extra)")
def test_loop_logs_every_round_offline(tmp_path, monkeypatch):
    from alrun.loop import run_experiment

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("ALRUN_CACHE", str(tmp_path / "cache"))
    seen = []
    original = WandbLogger.log_round

    def spy(self, row, metrics, images):
        seen.append((row["round"], metrics["protocol"], len(images)))
        original(self, row, metrics, images)

    monkeypatch.setattr(WandbLogger, "log_round", spy)
    cfg = compose_config(
        [
            "experiment=smoke",
            "logger=wandb",
            "logger.mode=offline",
            "budget.rounds=1",
            "trainer.iterations=1",
            "trainer.first_iterations=1",
            "dataset.num_pool=20",
            "dataset.num_test=5",
        ]
    )
    run_experiment(cfg, tmp_path / "run")
    assert seen == [(0, "coco", 10), (1, "coco", 0)]  # round 1 is the last: nothing selected
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
