"""Seconds per training iteration of detector=lite0_fcos, frozen vs unfrozen, beside tiny_fcos.

Usage: python scripts/bench_lite0.py [--dataset bccd] [--image-size 256] [--iterations 10]

Each variant trains ``--iterations`` iterations (batch 8, hflip) on ``--images`` labelled images
after one untimed pass of the same length (which fills the feature cache of the frozen variant
and warms up the allocator), so the timed pass is what later iterations and rounds cost. The
cache lives in a temporary directory. One torch thread unless OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial

import torch
from hydra.utils import instantiate

from alrun.config import compose_config
from alrun.data.dataset import DetectionDataset
from alrun.detectors.base import TrainSchedule
from alrun.detectors.lite0 import lite0_fcos
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector


def seconds_per_iteration(builder, data: DetectionDataset, iterations: int) -> float:
    det = TorchvisionDetector(builder, num_classes=len(data.classes), device="cpu")
    schedule = TrainSchedule(iterations=iterations, batch_size=8, warmup_iters=0)
    det.fit(data, schedule, seed=0)  # warm-up (fills the feature cache)
    start = time.perf_counter()
    det.fit(data, schedule, seed=1)
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bccd")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    splits = instantiate(compose_config([f"dataset={args.dataset}"]).dataset)
    data = DetectionDataset("bench", splits.classes, splits.pool.images[: args.images])
    size = args.image_size
    with tempfile.TemporaryDirectory() as cache:
        variants = {
            "lite0 frozen + cache": partial(lite0_fcos, image_size=size, cache_dir=cache),
            "lite0 frozen, no cache": partial(lite0_fcos, image_size=size, feature_cache=False),
            "lite0 stages 0-3 frozen": partial(
                lite0_fcos, image_size=size, frozen_stages=4, feature_cache=False
            ),
            "lite0 unfrozen": partial(lite0_fcos, image_size=size, frozen_stages=0),
            "tiny_fcos (scratch)": partial(tiny_fcos, image_size=size),
        }
        times = {
            name: seconds_per_iteration(b, data, args.iterations) for name, b in variants.items()
        }
    base = times["lite0 unfrozen"]
    print(
        f"{args.dataset}, image_size {size}, batch 8, {args.iterations} iterations, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"{'variant':<26} {'s/iter':>8} {'vs unfrozen':>12}")
    for name, t in times.items():
        print(f"{name:<26} {t:8.3f} {base / t:11.2f}x")


if __name__ == "__main__":
    main()
