"""What the MMDetection tests share: the skip marker, small RetinaNet / Faster R-CNN builders,
a short training and one round of the real CLI on a ResNet-18 model at 96 px (CI's mmdet step
fits them). Run them with ``.venv-mmdet/bin/python -m pytest -m mmdet tests/detectors``."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from alrun.detectors.base import TrainSchedule
from tests.helpers import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
SKIP_REASON = (
    "mmdet not installed in this environment: build it with `bash scripts/install_mmdet.sh` "
    "and run `.venv-mmdet/bin/python -m pytest -m mmdet tests/detectors/test_mmdet.py`"
)


def have_mmdet() -> bool:
    try:
        import mmdet  # noqa: F401
    except ImportError:
        return False
    return True


needs_mmdet = pytest.mark.skipif(not have_mmdet(), reason=SKIP_REASON)
without_mmdet = pytest.mark.skipif(have_mmdet(), reason="mmdet is installed here")

SMALL = {"min_size": 96, "max_size": 128}

#: a ResNet-18 model (random init) for the CLI runs
R18 = ("+detector.builder.cfg_options.model.backbone.depth=18",
       "+detector.builder.cfg_options.model.neck.in_channels=[64,128,256,512]")  # fmt: skip


def retinanet(num_classes: int = 3, **options):
    return _small("retinanet_r50_fpn.py", "model.test_cfg.score_thr", num_classes, options)


def faster_rcnn(num_classes: int = 3, **options):
    return _small("faster-rcnn_r50_fpn.py", "model.test_cfg.rcnn.score_thr", num_classes, options)


def _small(config: str, score_key: str, num_classes: int, options: dict):
    """mmdet's ``config`` (R-50, random init) at 96-128 px on the CPU, every box kept."""
    from alrun.detectors.mmdet import MMDetDetector, mmdet_model

    builder = partial(
        mmdet_model,
        config=f"mmdet::_base_/models/{config}",
        cfg_options={score_key: 0.0, **options},
        **SMALL,
    )
    return MMDetDetector(builder, num_classes=num_classes, device="cpu")


def short_training(det, data, iterations: int = 2) -> dict:
    from alrun.engine import BatchSource, train

    schedule = TrainSchedule(iterations=iterations, batch_size=2, warmup_iters=1, lr=0.001)
    return train(det, [BatchSource("labelled", data)], schedule, seed=0, from_scratch=True)


def one_cli_round(
    tmp_path: Path, detector: str, *overrides: str, pool_images: int = 8
) -> tuple[Path, subprocess.CompletedProcess]:
    """Rounds 0 and 1 of ``alrun experiment=smoke detector=<detector> <overrides>`` on a
    ResNet-18 at 96 px, every box kept; checked to succeed with two results rows."""
    run_dir = tmp_path / "run"
    score = "rcnn.score_thr" if "faster_rcnn" in detector else "score_thr"
    result = subprocess.run(
        [sys.executable, "-m", "alrun.cli", "experiment=smoke", f"detector={detector}",
         *overrides, "detector.builder.min_size=96", "detector.builder.max_size=128",
         f"dataset.max_pool_images={pool_images}", "dataset.max_test_images=2",
         "budget.initial=4", "budget.per_round=2", "budget.rounds=1", "trainer.batch_size=2",
         "trainer.first_iterations=2", "trainer.iterations=1", "trainer.warmup_iters=1",
         "trainer.lr=0.001", "quiet=true", f"hydra.run.dir={run_dir}",
         f"+detector.builder.cfg_options.model.test_cfg.{score}=0.0", *R18],
        env={**ENV, "ALRUN_CACHE": str(tmp_path / "cache")}, cwd=REPO, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((run_dir / "results.csv").read_text().splitlines()) == 3
    return run_dir, result


def csd_training_step(det, records):
    """One step of CSD's flip-consistency hook on ``records`` as an unlabelled batch, the
    detector in training mode; the summed class + box loss (backward already run) and the hook."""
    import torch

    from alrun.data.images import load_image
    from alrun.engine import Batch, BatchSource, Step
    from alrun.supervision.consistency import ConsistencyRule, FlipConsistencyHook

    det.train_mode()
    rule = ConsistencyRule(match="threshold", match_threshold=0.0)  # a young head: all match
    hook = FlipConsistencyHook("u", 1.0, 1.0, rule, ramp="linear", rampup=0.0, rampdown=0.0)
    hook.before_training(det, 1)
    images = [load_image(r) for r in records]
    ids = tuple(str(i) for i in range(len(images)))
    batch = Batch(BatchSource("u", None, role="unlabelled"), images, None, ids, (0,) * len(ids))
    losses = hook.extra_losses(Step(0, 1, 0.01, det, {"u": batch}))
    total = losses["class"] + losses["box"]
    assert torch.isfinite(total) and hook.sums["matched"] > 0
    total.backward()
    return total, hook
