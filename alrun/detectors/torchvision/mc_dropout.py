"""MC dropout in the heads: channel dropout before the class / box logits (the model trains with
it), and T passes that re-run only those last layers, at the reference boxes' locations."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from alrun.data.dataset import ImageRecord
from alrun.detectors.torchvision.probs import with_background_last


class HeadDropout:
    """Forward pre-hook: dropout on the input of a head's last layer (the class / box logits).

    On feature maps it is channel-wise (spatial) dropout (Tompson et al. 2015: one mask per
    image and channel, the usual choice for conv features, whose neighbours are correlated), so
    an MC pass can be evaluated exactly at just the locations of the reference boxes
    (:func:`dense_mc_passes`); on box features (Faster R-CNN) element-wise. Active in training
    (the model trains with it) and, for MC-dropout passes, in evaluation while ``active`` is
    set. A hook keeps the module tree and ``state_dict`` keys unchanged, so checkpoints load
    with or without it.
    """

    def __init__(self, p: float):
        self.p = float(p)
        self.active = False

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        on = module.training or self.active
        x = args[0]
        dropped = F.dropout2d(x, self.p, on) if x.dim() == 4 else F.dropout(x, self.p, on)
        return (dropped, *args[1:])


def last_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that produce the class and box logits: of a dense head, or the box predictor
    of a two-stage head (one dropout on the box features feeds both its outputs)."""
    if isinstance(model, (FCOS, RetinaNet)):
        return [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
    if isinstance(model, FasterRCNN):
        return [model.roi_heads.box_predictor]
    return []


def install_head_dropout(model: nn.Module, p: float) -> None:
    """Insert dropout of probability ``p`` before the class and box logits of a dense head."""
    for layer in last_layers(model):
        layer.register_forward_pre_hook(HeadDropout(p))


def dropout_hooks(layers: Iterable[nn.Module]) -> list[HeadDropout]:
    """The head-dropout hooks installed on ``layers`` (any backend's last layers)."""
    return [
        hook
        for layer in layers
        for hook in layer._forward_pre_hooks.values()
        if isinstance(hook, HeadDropout)
    ]


def head_dropouts(model: nn.Module) -> list[HeadDropout]:
    return dropout_hooks(last_layers(model))


@contextlib.contextmanager
def mc_rng(device: torch.device, records: Sequence[ImageRecord]):
    """MC-dropout masks from a generator seeded by the batch's image ids (same images, same
    passes), without touching the global random state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32("|".join(r.image_id for r in records).encode()))
        yield


class active_dropout:
    """Context manager: the head-dropout ``hooks`` active in evaluation (MC-dropout passes)."""

    def __init__(self, hooks: Iterable[HeadDropout]):
        self.hooks = list(hooks)

    def __enter__(self) -> None:
        for hook in self.hooks:
            hook.active = True

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.active = False


class stochastic(active_dropout):
    """Head dropout of a torchvision model active in evaluation."""

    def __init__(self, model: nn.Module):
        super().__init__(head_dropouts(model))


def channel_mask(batch_size: int, channels: int, p: float, device) -> Tensor:
    """(B, C) channel-dropout mask, scaled by 1 / (1 - p) as in training."""
    keep = torch.rand(batch_size, channels, device=device) >= p
    return keep.float() / (1.0 - p)


def patches_at(feature: Tensor, b: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """(n, C, 3, 3) neighbourhoods of locations (b, y, x) of ``feature`` (B, C, H, W), zero
    padded as a 3x3 convolution with padding 1 sees them."""
    padded = F.pad(feature, (1, 1, 1, 1))
    offsets = torch.arange(3, device=feature.device)
    ys = (y[:, None] + offsets)[:, :, None]  # (n, 3, 1)
    xs = (x[:, None] + offsets)[:, None, :]  # (n, 1, 3)
    return padded[b[:, None, None], :, ys, xs].permute(0, 3, 1, 2)  # (n, C, 3, 3)


class ConvAt:
    """A 3x3 ``conv`` (padding 1) at gathered locations, output channels ``channels`` (n, k)
    per location, for any channel mask of its input.

    The convolution is linear in its input channels, so ``out[n, k] = sum_c mask[n, c] *
    Q[n, c, k] + bias`` with ``Q`` (each input channel's contribution) computed once; every
    MC pass is then one batched mask-vector product."""

    def __init__(self, patches: Tensor, conv: nn.Conv2d, channels: Tensor):
        weight = conv.weight.flatten(2)  # (out, C, 9)
        # per input channel c: (n, 9) @ (9, out), batched over c -> (n, C, out)
        per_channel = torch.bmm(patches.flatten(2).transpose(0, 1), weight.permute(1, 2, 0))
        contrib = per_channel.transpose(0, 1)  # (n, C, out)
        index = channels[:, None, :].expand(-1, contrib.shape[1], -1)
        self.contrib = contrib.gather(2, index)  # (n, C, k)
        self.bias = conv.bias[channels]  # (n, k)

    def __call__(self, mask: Tensor) -> Tensor:
        return (mask[:, :, None] * self.contrib).sum(dim=1) + self.bias


def dense_mc_passes(
    model: FCOS | RetinaNet,
    batch,
    levels: list[Tensor],
    towers: list[tuple[Tensor, Tensor]],
    anchors: list[Tensor],
    found: list[dict[str, Tensor]],
    p: float,
    passes: int,
) -> list[list[dict[str, Tensor]]]:
    """``passes`` MC-dropout passes of a dense head at the reference boxes' anchors.

    With channel-wise dropout a pass is a (B, C) mask per tower; the last layers (3x3 convs)
    are evaluated only at the reference locations, on tower features computed once. Exactly
    what a full pass with those masks gives there (a test checks it), at a tiny fraction of
    its cost.
    """
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    num_classes, is_fcos = cls_head.num_classes, isinstance(model, FCOS)
    sizes = [(f.shape[2], f.shape[3]) for f in levels]
    per_loc = len(anchors[0]) // sum(h * w for h, w in sizes)  # anchors per location
    starts = torch.tensor([0] + [h * w * per_loc for h, w in sizes]).cumsum(0)
    counts = [len(f["sources"]) for f in found]
    if sum(counts) == 0:  # no reference box in the whole batch
        return [[dict(f) for f in found] for _ in range(passes)]
    device = levels[0].device
    total = int(starts[-1])
    b = torch.repeat_interleave(
        torch.arange(len(found), device=device), torch.tensor(counts, device=device)
    )
    src = torch.cat([f["sources"] for f in found]).to(device)
    labels = torch.cat([f["labels"] for f in found]).to(device)
    # per-class NMS keeps several rows per anchor: compute each (image, anchor) once
    keys, inverse = torch.unique(b * total + src, return_inverse=True)
    ub, usrc = torch.div(keys, total, rounding_mode="floor"), keys % total
    level = torch.searchsorted(starts[1:].to(device), usrc, right=True)
    rows = {"cls": [], "reg": [], "index": []}
    for lvl, (_h, w) in enumerate(sizes):
        at = torch.nonzero(level == lvl).flatten()
        if at.numel() == 0:
            continue
        loc = torch.div(usrc[at] - int(starts[lvl]), per_loc, rounding_mode="floor")
        y, x = torch.div(loc, w, rounding_mode="floor"), loc % w
        rows["cls"].append(patches_at(towers[lvl][0], ub[at], y, x))
        rows["reg"].append(patches_at(towers[lvl][1], ub[at], y, x))
        rows["index"].append(at)
    order = torch.cat(rows["index"])
    cls_patch, reg_patch = torch.cat(rows["cls"]), torch.cat(rows["reg"])
    b_o, src_o = ub[order], usrc[order]
    a = (src_o - starts.to(device)[level[order]]) % per_loc  # anchor index at the location
    cls_channels = (a * num_classes)[:, None] + torch.arange(num_classes, device=device)
    reg_channels = (a * 4)[:, None] + torch.arange(4, device=device)
    anchor_boxes = torch.stack(anchors)[b_o, src_o]
    limits = torch.tensor([[w, h, w, h] for h, w in batch.image_sizes], device=device)[b_o]
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=device)
    row_at = back[inverse]  # each box row's position among the computed anchors
    cls_at = ConvAt(cls_patch, cls_head.cls_logits, cls_channels)
    reg_at = ConvAt(reg_patch, reg_head.bbox_reg, reg_channels)
    ctr_at = ConvAt(reg_patch, reg_head.bbox_ctrness, a[:, None]) if is_fcos else None
    passes_out = []
    for _ in range(passes):
        cls_mask = channel_mask(len(found), cls_patch.shape[1], p, device)[b_o]
        reg_mask = channel_mask(len(found), reg_patch.shape[1], p, device)[b_o]
        logits, regress = cls_at(cls_mask), reg_at(reg_mask)
        if is_fcos:
            boxes = model.box_coder.decode(F.relu(regress), anchor_boxes)
        else:
            boxes = model.box_coder.decode_single(regress, anchor_boxes)
        boxes = torch.minimum(boxes.clamp_min(0), limits)[row_at]
        logits = logits[row_at]
        class_probs = torch.sigmoid(logits)
        score = class_probs.gather(1, labels.reshape(-1, 1)).reshape(-1)
        if is_fcos:
            ctr = ctr_at(reg_mask).reshape(-1)[row_at]
            score = torch.sqrt(score * torch.sigmoid(ctr))
        out = {
            "boxes": boxes,
            "scores": score,
            "probs": with_background_last(logits),
            "class_probs": class_probs,
        }
        split = {k: v.split(counts) for k, v in out.items()}
        passes_out.append(
            [
                {
                    **{k: split[k][i] for k in out},
                    "labels": f["labels"],
                    "feats": f["feats"],
                    "sources": f["sources"],
                }
                for i, f in enumerate(found)
            ]
        )
    return passes_out
