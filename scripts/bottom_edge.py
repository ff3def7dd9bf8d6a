"""Share of predicted boxes that touch the bottom image edge, beside the ground truth's share.

Why: on non-square photos torchvision's transform pads each batch at the bottom/right to a
multiple of 32; dense heads (FCOS, RetinaNet) also score the locations in that padding, and
clipping their boxes to the image puts them on its bottom (or right) edge. A model trained for
a few hundred iterations then "detects" a row of boxes along the bottom of every image.

Trains the round-0 model of a config once (seeded; saved to ``--checkpoint`` and reused when the
file exists, so the same model is measured before and after a post-processing change), predicts
the pool and the test split and prints the shares at score >= ``--min-score``.

    python scripts/bottom_edge.py --checkpoint /tmp/bccd_r0.pt -- experiment=bccd

Measured (2026-12-03, 2 shared CPU cores; same checkpoint before / after the padding filter in
alrun/detectors/torchvision/postprocess_dense.py ``dense_detections``), share of predicted
boxes touching the bottom edge:

* experiment=bccd round 0 (192 px: 640x480 -> 192x144, padded to 192x160), 364 images:
  score >= 0.3: 2.6 % -> 2.6 % (10,079 boxes); score >= 0.05: 6.0 % -> 4.8 %; truth 7.2 %.
* experiment=smoke dataset=bccd (96 px: 96x72 padded to 96x96), random seed 0, round 2:
  score >= 0.05: 10.4 % -> 7.4 %; truth 6.3 %.

On BCCD's one image size the padding is a few rows and a trained model already scores them
low; a set of mixed sizes and orientations pads far more (a portrait and a landscape image in one
batch pad each other to a square).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from alrun.config import compose_config
from alrun.io import save_torch
from alrun.loop import build_experiment, derive_seed, initial_selection
from alrun.pool import LabelPool
from alrun.seeding import Purpose
from alrun.types import Needs


def touches(boxes: np.ndarray, width: int, height: int, tol: float) -> dict[str, np.ndarray]:
    """Per box: does it reach within ``tol`` pixels of the bottom / right image edge."""
    return {"bottom": boxes[:, 3] >= height - tol, "right": boxes[:, 2] >= width - tol}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-score", type=float, default=0.3)
    parser.add_argument("--tol", type=float, default=1.0, help="pixels (original image)")
    parser.add_argument("overrides", nargs="*", default=["experiment=bccd"])
    args = parser.parse_args()
    cfg = compose_config([*args.overrides, f"seed={args.seed}"])
    exp = build_experiment(cfg)
    if args.checkpoint.is_file():
        exp.detector.load_state_dict(torch.load(args.checkpoint, weights_only=False))
        print(f"model: {args.checkpoint}")
    else:
        pool = LabelPool(exp.splits.pool)
        pool.add(exp.oracle.annotate(pool.records(initial_selection(exp, pool))), 0)
        seed0 = derive_seed(args.seed, 0, Purpose.TRAIN)
        exp.regime.train(exp.detector, pool, exp.schedule, seed0, 0, strategy=exp.training)
        save_torch(args.checkpoint, exp.detector.state_dict())
        print(f"model: trained round 0, saved to {args.checkpoint}")
    records = [*exp.splits.pool.images, *exp.splits.test.images]
    sizes = sorted({(r.width, r.height) for r in records})
    print(f"config: {' '.join(args.overrides)}; {len(records)} images, sizes {sizes[:6]}")
    found = exp.detector.predict([r.ref for r in records], Needs())  # the truth stays here
    pred = {"bottom": 0, "right": 0, "n": 0}
    truth = {"bottom": 0, "right": 0, "n": 0}
    for record, det in zip(records, found):
        keep = det.scores.numpy() >= args.min_score
        for counts, boxes in ((pred, det.boxes.numpy()[keep]), (truth, record.boxes)):
            hit = touches(boxes, record.width, record.height, args.tol)
            counts["n"] += len(boxes)
            counts["bottom"] += int(hit["bottom"].sum())
            counts["right"] += int(hit["right"].sum())
    for name, counts in ((f"predicted (score >= {args.min_score:g})", pred), ("truth", truth)):
        n = max(counts["n"], 1)
        print(
            f"{name}: {counts['n']} boxes, bottom edge {counts['bottom'] / n:.1%}, "
            f"right edge {counts['right'] / n:.1%}"
        )


if __name__ == "__main__":
    main()
