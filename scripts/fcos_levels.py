"""Which FPN level trains on which object: positives per level of the tiny FCOS for several
``anchor_sizes`` on the synthetic demo data (no training; FCOS's own assignment rule).

torchvision's FCOS assigns a location of a level to a box when (a) the location lies inside the
box and within ``1.5 * anchor_size`` of its centre (centre sampling) and (b) the largest of its
distances to the box edges is in ``[4, 8) * anchor_size`` (``[0, 8)`` on the first level,
``[4, inf)`` on the last). The FCOS paper's convention is anchor size = stride.

    python scripts/fcos_levels.py
"""

from __future__ import annotations

import torch

from alrun.config import compose_config
from alrun.loop import build_experiment

STRIDES = (8, 16, 32)


def assignment(
    boxes: torch.Tensor, image_size: int, sizes: tuple[int, ...]
) -> tuple[list[int], torch.Tensor]:
    """Positive locations per level, and which boxes got at least one positive anywhere."""
    counts, assigned = [], torch.zeros(len(boxes), dtype=torch.bool)
    for level, (stride, size) in enumerate(zip(STRIDES, sizes)):
        n = image_size // stride
        centres = (torch.arange(n) * stride + stride // 2).float()  # torchvision: anchor centres
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        x, y = xs.reshape(-1, 1), ys.reshape(-1, 1)
        x0, y0, x1, y1 = boxes.T[:, None, :].unbind(0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        near = torch.maximum((x - cx).abs(), (y - cy).abs()) < 1.5 * size
        dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
        inside = dist.min(dim=2).values > 0
        far = dist.max(dim=2).values
        low = 0.0 if level == 0 else 4.0 * size
        high = float("inf") if level == len(sizes) - 1 else 8.0 * size
        match = near & inside & (far > low) & (far < high)
        counts.append(int(match.any(dim=1).sum()))  # locations with at least one object
        assigned |= match.any(dim=0)
    return counts, assigned


def main() -> None:
    cfg = compose_config(["experiment=demo"])
    splits = build_experiment(cfg).splits
    size = int(cfg.dataset.image_size)
    print(f"{len(splits.pool)} pool images, {splits.pool.num_boxes} boxes, {size} px")
    print(f"{'anchor_sizes':<14}{'P3':>8}{'P4':>8}{'P5':>8}{'objects w/o positive':>22}")
    for sizes in ((16, 32, 64), (8, 16, 32), (4, 8, 16)):
        totals, unassigned = [0, 0, 0], 0
        for rec in splits.pool.images:
            boxes = torch.as_tensor(rec.boxes).reshape(-1, 4)
            if not len(boxes):
                continue
            counts, assigned = assignment(boxes, size, sizes)
            totals = [t + c for t, c in zip(totals, counts)]
            unassigned += int((~assigned).sum())
        print(f"{str(sizes):<14}{totals[0]:>8}{totals[1]:>8}{totals[2]:>8}{unassigned:>22}")


if __name__ == "__main__":
    main()
