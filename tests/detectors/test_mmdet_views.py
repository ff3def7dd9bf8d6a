"""CSD's two-stage flipped views on mmdet's Faster R-CNN (``flip_views``): row i of the
mirrored view is the RoI head on proposal i mirrored, on the mirrored image; torchvision's
layout; CSD's hook trains through it, and one real ``supervision=consistency`` round.
Marked ``mmdet`` (run with ``.venv-mmdet/bin/python -m pytest -m mmdet``)."""

from __future__ import annotations

import json

import pytest
import torch

from alrun.data.images import load_image
from alrun.detectors import base
from tests.detectors.mmdet_helpers import (
    csd_training_step,
    faster_rcnn,
    needs_mmdet,
    one_cli_round,
)

pytestmark = [needs_mmdet, pytest.mark.mmdet]


def test_two_stage_views_pair_each_proposal_with_its_mirror_image(data):
    """Independently of the batched pass: the flipped image through the model alone, the RoI
    head on the mirrored proposals (eval mode: BatchNorm statistics would couple the views)."""
    from mmdet.structures.bbox import bbox2roi

    det = faster_rcnn(len(data.classes))
    assert base.FLIP_VIEWS in det.capabilities
    det.model.eval()
    images = [load_image(r) for r in data.images[:2]]
    with torch.no_grad():
        views = det.flip_view_outputs(images)
        inputs, samples = det._prepare(images)
        levels = det.model.extract_feat(inputs)
        proposals = [r.bboxes for r in det.model.rpn_head.predict(levels, samples, rescale=False)]
        flipped_inputs = inputs.clone()
        for i, s in enumerate(samples):
            h, w = s.metainfo["img_shape"]
            flipped_inputs[i, :, :h, :w] = inputs[i, :, :h, :w].flip(-1)
        flipped_levels = det.model.extract_feat(flipped_inputs)
        mirrored = []
        for p, s in zip(proposals, samples):
            w = s.metainfo["img_shape"][1]
            mirrored.append(torch.stack([w - p[:, 2], p[:, 1], w - p[:, 0], p[:, 3]], dim=1))
        roi_head = det.model.roi_head
        n = roi_head.bbox_roi_extractor.num_inputs
        feats = roi_head.bbox_roi_extractor(flipped_levels[:n], bbox2roi(mirrored))
        cls_score, bbox_pred = roi_head.bbox_head(feats)
    plain = sum(len(p) for p in proposals)
    assert views.plain == plain and views.logits.shape == (2 * plain, len(data.classes) + 1)
    assert views.deltas.shape == (2 * plain, (len(data.classes) + 1) * 4)
    # torchvision's layout: background first, a zero background slot before the class deltas
    torch.testing.assert_close(views.logits[plain:, 0], cls_score[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(views.logits[plain:, 1:], cls_score[:, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(views.deltas[plain:, 4:], bbox_pred, atol=1e-4, rtol=1e-4)
    assert not views.deltas[:, :4].any()


def test_csd_hook_trains_through_the_two_stage_views(data):
    det = faster_rcnn(len(data.classes))
    csd_training_step(det, data.images[:2])
    bbox_head = det.model.roi_head.bbox_head
    assert float(bbox_head.fc_cls.weight.grad.abs().sum()) > 0
    assert float(bbox_head.fc_reg.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in det.model.rpn_head.parameters())  # proposals: inputs


def test_one_round_of_consistency_on_faster_rcnn(tmp_path):
    run_dir, _ = one_cli_round(tmp_path, "mmdet_faster_rcnn_r50", "supervision=consistency")
    train = json.loads((run_dir / "round_01" / "metrics.json").read_text())["train"]
    assert train["consistency/images"] > 0
