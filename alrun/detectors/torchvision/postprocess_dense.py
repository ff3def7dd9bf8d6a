"""Post-processing of dense heads (FCOS, RetinaNet) that keeps what torchvision's stock
``postprocess_detections`` drops: each box's logits row (``class_probs`` are the independent
sigmoids; ``probs`` the constructed ``softmax([logits, 0])``, background last - see
``alrun.types.Detections``), its feature row (the FPN feature at the anchor's location) and the
anchor it came from (``sources``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.ops import boxes as box_ops

from alrun.detectors.torchvision.probs import with_background_last


def head_towers(model: FCOS | RetinaNet, levels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per level, the classification and regression towers' outputs (deterministic)."""
    heads = model.head
    return [(heads.classification_head.conv(x), heads.regression_head.conv(x)) for x in levels]


def to_anchor_rows(t: Tensor, width: int) -> Tensor:
    """(N, A*width, H, W) -> (N, HWA, width), as torchvision's heads reshape."""
    n, _, h, w = t.shape
    return t.view(n, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, width)


def head_last(model: FCOS | RetinaNet, towers: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """The head's outputs from cached tower features: what ``model.head(levels)`` returns,
    running only the last layers (so MC-dropout passes re-run only those)."""
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    cls, reg, ctr = [], [], []
    for cls_feat, reg_feat in towers:
        cls.append(to_anchor_rows(cls_head.cls_logits(cls_feat), cls_head.num_classes))
        regression = reg_head.bbox_reg(reg_feat)
        if isinstance(model, FCOS):
            regression = F.relu(regression)
            ctr.append(to_anchor_rows(reg_head.bbox_ctrness(reg_feat), 1))
        reg.append(to_anchor_rows(regression, 4))
    out = {"cls_logits": torch.cat(cls, dim=1), "bbox_regression": torch.cat(reg, dim=1)}
    if ctr:
        out["bbox_ctrness"] = torch.cat(ctr, dim=1)
    return out


def dense_detections(
    model: FCOS | RetinaNet,
    batch,
    levels: list[Tensor],
    head_outputs: dict[str, Tensor] | None = None,
    anchors: list[Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """FCOS / RetinaNet post-processing that keeps each box's logits row and feature row.

    Locations in the batch's padding (torchvision pads every image at the bottom / right to
    the batch's largest size, a multiple of 32) see no image, yet the head scores them; their
    boxes, clipped to the image, used to lie along its bottom or right edge (a tiny FCOS on
    640x480 photos: most confident boxes touched the bottom edge, scripts/bottom_edge.py). They
    are not candidates, and boxes left with no area by the clipping are dropped.

    ``head_outputs`` / ``anchors`` may be passed in (computed once for several passes)."""
    if head_outputs is None:
        head_outputs = model.head(levels)
    if anchors is None:
        anchors = model.anchor_generator(batch, levels)
    num_per_level = [f.shape[2] * f.shape[3] for f in levels]
    num_anchors_per_loc = head_outputs["cls_logits"].shape[1] // sum(num_per_level)
    num_per_level = [n * num_anchors_per_loc for n in num_per_level]
    is_fcos = isinstance(model, FCOS)
    # (B, HW, D) per level, so anchor index // A gives the location's feature
    flat_feats = [f.flatten(2).transpose(1, 2) for f in levels]
    results = []
    for b in range(len(batch.image_sizes)):
        logits = head_outputs["cls_logits"][b].split(num_per_level)
        regress = head_outputs["bbox_regression"][b].split(num_per_level)
        ctr = head_outputs["bbox_ctrness"][b].split(num_per_level) if is_fcos else None
        anchors_b = anchors[b].split(num_per_level)
        height, width = batch.image_sizes[b]
        kept = {
            "boxes": [],
            "scores": [],
            "labels": [],
            "probs": [],
            "class_probs": [],
            "feats": [],
            "sources": [],
        }
        level_start = 0
        for lvl in range(len(levels)):
            num_classes = logits[lvl].shape[-1]
            if is_fcos:
                scores = torch.sqrt(torch.sigmoid(logits[lvl]) * torch.sigmoid(ctr[lvl])).flatten()
            else:
                scores = torch.sigmoid(logits[lvl]).flatten()
            centres = (anchors_b[lvl][:, :2] + anchors_b[lvl][:, 2:]) / 2
            on_image = (centres[:, 0] < width) & (centres[:, 1] < height)
            scores = scores * on_image.repeat_interleave(num_classes)  # padding: never > thresh
            candidates = torch.where(scores > model.score_thresh)[0]
            scores = scores[candidates]
            k = min(int(candidates.numel()), model.topk_candidates)
            scores, order = scores.topk(k)
            candidates = candidates[order]
            anchor_idx = torch.div(candidates, num_classes, rounding_mode="floor")
            if is_fcos:
                boxes = model.box_coder.decode(regress[lvl][anchor_idx], anchors_b[lvl][anchor_idx])
            else:
                boxes = model.box_coder.decode_single(
                    regress[lvl][anchor_idx], anchors_b[lvl][anchor_idx]
                )
            kept["boxes"].append(box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b]))
            kept["scores"].append(scores)
            kept["labels"].append(candidates % num_classes)
            kept["probs"].append(with_background_last(logits[lvl][anchor_idx]))
            kept["class_probs"].append(torch.sigmoid(logits[lvl][anchor_idx]))
            kept["feats"].append(flat_feats[lvl][b][anchor_idx // num_anchors_per_loc])
            kept["sources"].append(anchor_idx + level_start)
            level_start += num_per_level[lvl]
        merged = {k: torch.cat(v) for k, v in kept.items()}
        has_area = box_ops.remove_small_boxes(merged["boxes"], 1e-3)
        merged = {k: v[has_area] for k, v in merged.items()}
        keep = box_ops.batched_nms(
            merged["boxes"], merged["scores"], merged["labels"], model.nms_thresh
        )[: model.detections_per_img]
        results.append({k: v[keep] for k, v in merged.items()})
    return results


def dense_at_sources(
    model: FCOS | RetinaNet,
    batch,
    head_outputs: dict[str, Tensor],
    anchors: list[Tensor],
    found: list[dict[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """One pass of full-map head outputs read at the anchors the reference boxes came from
    (the reference that :func:`dense_mc_passes` computes more cheaply; tests compare them).

    Under MC dropout the anchors do not move, only the head's outputs do: each reference box's
    anchor gives its class probabilities, score and regressed box in this pass, row for row
    (same ``sources``, same labels), without a new top-k and NMS. That keeps T passes cheap and
    the correspondence exact; :func:`alrun.acquisition.multipass.match_passes` then compares
    row i with row i (and still applies the overlap threshold).
    """
    is_fcos = isinstance(model, FCOS)
    results = []
    for b, ref in enumerate(found):
        src, labels = ref["sources"], ref["labels"]
        logits = head_outputs["cls_logits"][b][src]
        regress = head_outputs["bbox_regression"][b][src]
        if is_fcos:
            boxes = model.box_coder.decode(regress, anchors[b][src])
        else:
            boxes = model.box_coder.decode_single(regress, anchors[b][src])
        class_probs = torch.sigmoid(logits)
        p = class_probs.gather(1, labels.reshape(-1, 1)).reshape(-1)
        if is_fcos:
            p = torch.sqrt(p * torch.sigmoid(head_outputs["bbox_ctrness"][b][src].reshape(-1)))
        results.append(
            {
                "boxes": box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b]),
                "scores": p,
                "labels": labels,
                "probs": with_background_last(logits),
                "class_probs": class_probs,
                "feats": ref["feats"],
                "sources": src,
            }
        )
    return results


def centre_features(
    maps: list[Tensor], found: list[dict[str, Tensor]], num_anchors: int, padded: tuple[int, int]
) -> list[Tensor]:
    """Per image, each box's feature sampled (bilinear) at its centre on ``maps`` (one per FPN
    level, (B, C, h, w)) at the level its anchor is on: PPAL's CCMS feature
    (``RetinaHeadFeat`` + ``get_inter_feats``) when ``maps`` are the classification tower's
    outputs. Centres are normalised by the padded batch size the maps cover (``padded``: H, W)."""
    sizes = [m.shape[2] * m.shape[3] for m in maps]
    per_loc = num_anchors // sum(sizes)
    ends = torch.tensor(sizes, device=maps[0].device).cumsum(0) * per_loc
    height, width = padded
    out = []
    for b, boxes in enumerate(f["boxes"] for f in found):
        level = torch.searchsorted(ends, found[b]["sources"], right=True)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        grid = torch.stack([centre[:, 0] / width, centre[:, 1] / height], dim=1) * 2 - 1
        feats = boxes.new_zeros(len(boxes), maps[0].shape[1])
        for lvl, fmap in enumerate(maps):
            at = torch.where(level == lvl)[0]
            if at.numel():
                sampled = F.grid_sample(
                    fmap[b : b + 1], grid[at][None, None], mode="bilinear", align_corners=False
                )  # (1, C, 1, n)
                feats[at] = sampled[0, :, 0].T
        out.append(feats)
    return out
