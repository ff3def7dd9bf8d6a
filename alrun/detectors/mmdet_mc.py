"""MC dropout for the MMDetection backend (:mod:`alrun.detectors.mmdet`): where the dropout
goes in RetinaNet and Faster R-CNN heads, and the T passes that re-run only the last layers.

The same computation as the torchvision backend's (``HeadDropout``, ``ConvAt``, channel masks
from :mod:`alrun.detectors.torchvision`): backbone, neck and towers run once, each pass is read
at the reference boxes' anchors or proposals, row for row. mmdet is imported lazily here too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alrun.detectors.torchvision.mc_dropout import (
    ConvAt,
    HeadDropout,
    active_dropout,
    channel_mask,
    dropout_hooks,
    patches_at,
)
from alrun.detectors.torchvision.probs import with_background_last


def last_layers(model: nn.Module, kind: str) -> list[nn.Module]:
    """The layers MC dropout goes before: RetinaNet's ``retina_cls`` / ``retina_reg`` (3x3
    convs on the towers), or the class / box layers of a box head whose two branches share
    their input (``Shared2FCBBoxHead``: no branch-specific convs or fcs). Empty: none."""
    from mmdet.models.dense_heads import RetinaHead

    if kind == "dense":
        head = model.bbox_head
        return [head.retina_cls, head.retina_reg] if isinstance(head, RetinaHead) else []
    head = model.roi_head.bbox_head
    branches = ("num_cls_convs", "num_cls_fcs", "num_reg_convs", "num_reg_fcs")
    if all(getattr(head, name, 1) == 0 for name in branches):
        return [head.fc_cls, head.fc_reg]
    return []


class Stochastic(active_dropout):
    """Head dropout of an mmdet model active in evaluation (MC-dropout passes)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__(dropout_hooks(last_layers(model, kind)))


def retina_towers(head: nn.Module, levels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per level, RetinaHead's classification and regression towers (deterministic: run once
    whatever the number of passes), as ``RetinaHead.forward_single`` computes them."""
    towers = []
    for x in levels:
        cls_feat, reg_feat = x, x
        for conv in head.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in head.reg_convs:
            reg_feat = conv(reg_feat)
        towers.append((cls_feat, reg_feat))
    return towers


def retina_last(head: nn.Module, towers: list[tuple[Tensor, Tensor]]) -> tuple[list, list]:
    """What ``head(levels)`` returns, from the cached towers."""
    return [head.retina_cls(c) for c, _ in towers], [head.retina_reg(r) for _, r in towers]


def anchor_rows(t: Tensor, width: int) -> Tensor:
    """(B, A*width, H, W) -> (B, HWA, width), the row order of mmdet's post-processing."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, width)


def dense_mc_passes(
    head: nn.Module,
    levels: list[Tensor],
    towers: list[tuple[Tensor, Tensor]],
    found: list[dict[str, Tensor]],
    samples: list[Any],
    passes: int,
) -> list[list[dict[str, Tensor]]]:
    """``passes`` MC-dropout passes of RetinaHead at the reference boxes' anchors.

    The same computation as the torchvision backend's ``dense_mc_passes``: a pass is one
    channel mask per image and tower; ``retina_cls`` / ``retina_reg`` are evaluated only at the
    reference locations (:class:`~alrun.detectors.torchvision.mc_dropout.ConvAt`), exactly what
    a full
    pass with those masks gives there (a test checks it)."""
    p = next(h.p for h in head.retina_cls._forward_pre_hooks.values() if isinstance(h, HeadDropout))
    num_classes, per_loc = head.cls_out_channels, head.num_base_priors
    sizes = [(f.shape[2], f.shape[3]) for f in levels]
    counts = [len(f["sources"]) for f in found]
    if sum(counts) == 0:  # no reference box in the whole batch
        return [[dict(f) for f in found] for _ in range(passes)]
    device = levels[0].device
    starts = torch.tensor([0] + [h * w * per_loc for h, w in sizes], device=device).cumsum(0)
    total = int(starts[-1])
    b = torch.repeat_interleave(
        torch.arange(len(found), device=device), torch.tensor(counts, device=device)
    )
    src = torch.cat([f["sources"] for f in found])
    labels = torch.cat([f["labels"] for f in found])
    # class-aware NMS keeps several rows per anchor: compute each (image, anchor) once
    keys, inverse = torch.unique(b * total + src, return_inverse=True)
    ub, usrc = torch.div(keys, total, rounding_mode="floor"), keys % total
    level = torch.searchsorted(starts[1:], usrc, right=True)
    cls_rows, reg_rows, index = [], [], []
    for lvl, (_h, w) in enumerate(sizes):
        at = torch.nonzero(level == lvl).flatten()
        if at.numel() == 0:
            continue
        loc = torch.div(usrc[at] - starts[lvl], per_loc, rounding_mode="floor")
        y, x = torch.div(loc, w, rounding_mode="floor"), loc % w
        cls_rows.append(patches_at(towers[lvl][0], ub[at], y, x))
        reg_rows.append(patches_at(towers[lvl][1], ub[at], y, x))
        index.append(at)
    order = torch.cat(index)
    cls_patch, reg_patch = torch.cat(cls_rows), torch.cat(reg_rows)
    b_o, src_o = ub[order], usrc[order]
    a = (src_o - starts[level[order]]) % per_loc  # anchor index at the location
    cls_channels = (a * num_classes)[:, None] + torch.arange(num_classes, device=device)
    reg_channels = (a * 4)[:, None] + torch.arange(4, device=device)
    priors = head.prior_generator.grid_priors(sizes, dtype=levels[0].dtype, device=device)
    anchor_boxes = torch.cat(list(priors))[src_o]
    limits = torch.tensor(
        [[s.metainfo["img_shape"][1], s.metainfo["img_shape"][0]] * 2 for s in samples],
        device=device,
        dtype=anchor_boxes.dtype,
    )[b_o]
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=device)
    row_at = back[inverse]  # each box row's position among the computed anchors
    cls_at = ConvAt(cls_patch, head.retina_cls, cls_channels)
    reg_at = ConvAt(reg_patch, head.retina_reg, reg_channels)
    passes_out = []
    for _ in range(passes):
        cls_mask = channel_mask(len(found), cls_patch.shape[1], p, device)[b_o]
        reg_mask = channel_mask(len(found), reg_patch.shape[1], p, device)[b_o]
        boxes = head.bbox_coder.decode(anchor_boxes, reg_at(reg_mask))
        boxes = torch.minimum(boxes.clamp_min(0), limits)[row_at]
        logits = cls_at(cls_mask)[row_at]
        class_probs = logits.sigmoid()
        out = {
            "boxes": boxes,
            "scores": class_probs.gather(1, labels.reshape(-1, 1)).reshape(-1),
            "probs": with_background_last(logits),
            "class_probs": class_probs,
        }
        split = {k: v.split(counts) for k, v in out.items()}
        passes_out.append(
            [
                {**{k: split[k][i] for k in out}, **{k: f[k] for k in _SAME_IN_EVERY_PASS}}
                for i, f in enumerate(found)
            ]
        )
    return passes_out


#: what an MC-dropout pass of a dense head keeps from the reference pass
_SAME_IN_EVERY_PASS = ("labels", "feats", "sources")


def two_stage_at_sources(
    bbox_head: nn.Module, found: list[dict[str, Tensor]], samples: list[Any]
) -> list[dict[str, Tensor]]:
    """One MC-dropout pass of the box head's ``fc_cls`` / ``fc_reg`` on the reference boxes'
    box features (their shared input, kept by :func:`_two_stage`), read for the same proposal
    and class (row i of the pass = row i of the reference)."""
    results = []
    for ref, sample in zip(found, samples):
        labels = ref["labels"]
        probs = torch.softmax(bbox_head.fc_cls(ref["feats"]), dim=-1)  # background last
        num_classes = probs.shape[1] - 1
        decoded = bbox_head.bbox_coder.decode(
            ref["proposals"], bbox_head.fc_reg(ref["feats"]), max_shape=sample.metainfo["img_shape"]
        )
        if decoded.shape[-1] == 4:  # class-agnostic regression
            boxes = decoded
        else:
            boxes = decoded.reshape(len(labels), num_classes, 4)[torch.arange(len(labels)), labels]
        results.append(
            {
                "boxes": boxes,
                "scores": probs.gather(1, labels.reshape(-1, 1)).reshape(-1),
                "labels": labels,
                "probs": probs,
                "class_probs": probs[:, :num_classes],
                "feats": ref["feats"],
                "proposals": ref["proposals"],
                "sources": ref["sources"],
            }
        )
    return results
