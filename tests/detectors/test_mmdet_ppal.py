"""PPAL's capabilities on mmdet's RetinaNet (``anchor_quality``, ``head_features``): the
positive anchors its assigner gives, the class tower at box centres, and one real round of
``strategy=ppal`` and ``strategy=ccms`` through the CLI. Marked ``mmdet``
(``.venv-mmdet/bin/python -m pytest -m mmdet tests/detectors/test_mmdet_ppal.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from alrun.data.images import load_image
from alrun.detectors import base
from alrun.errors import AlrunError
from alrun.types import Needs
from tests.detectors.mmdet_helpers import (
    faster_rcnn,
    needs_mmdet,
    one_cli_round,
    retinanet,
)
from tests.helpers import box_target

pytestmark = [needs_mmdet, pytest.mark.mmdet]


def test_positive_anchors_are_what_the_assigner_assigns(data):
    """One report per training forward; independently: the head's MaxIoUAssigner on its own
    anchors, the regressed boxes' IoU with the assigned ground truth by mmdet's
    bbox_overlaps(is_aligned=True), in the level-major order the head's loss walks."""
    from mmdet.structures.bbox import bbox_overlaps
    from mmengine.structures import InstanceData

    det = retinanet(len(data.classes))
    records = data.images[:2]
    images = [load_image(r) for r in records]
    targets = [box_target(r) for r in records]
    seen = []
    stop = det.watch_positive_anchors(lambda *a: seen.append(a))
    det.train_mode()
    det.losses(images, targets)
    stop()
    det.losses(images, targets)  # no longer watched
    assert len(seen) == 1
    labels, probs, ious = seen[0]
    head = det.model.bbox_head
    with torch.no_grad():
        inputs, samples = det._prepare(images, targets)
        cls_scores, bbox_preds = head(tuple(det.model.extract_feat(inputs)))
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = head.prior_generator.grid_priors(sizes, device=inputs.device)
        everything = torch.cat(priors)
        starts = [0, *torch.tensor([len(p) for p in priors]).cumsum(0).tolist()]
        want = {"labels": [], "probs": [], "ious": []}
        assigned = []
        for sample in samples:
            gt = sample.gt_instances
            result = head.assigner.assign(InstanceData(priors=everything), gt)
            assigned.append((result.gt_inds, gt))
        for lvl, (cls, box) in enumerate(zip(cls_scores, bbox_preds)):
            for b, (gt_inds, gt) in enumerate(assigned):
                rows = gt_inds[starts[lvl] : starts[lvl + 1]]
                pos = torch.where(rows > 0)[0]
                matched = rows[pos] - 1
                logits = cls[b].permute(1, 2, 0).reshape(-1, head.cls_out_channels)[pos]
                deltas = box[b].permute(1, 2, 0).reshape(-1, 4)[pos]
                boxes = head.bbox_coder.decode(priors[lvl][pos], deltas)
                label = gt.labels[matched]
                want["labels"].append(label)
                want["probs"].append(logits.gather(1, label[:, None]).squeeze(1).sigmoid())
                want["ious"].append(bbox_overlaps(boxes, gt.bboxes[matched], is_aligned=True))
    assert len(labels) > 0
    assert torch.equal(labels, torch.cat(want["labels"]))
    torch.testing.assert_close(probs, torch.cat(want["probs"]))
    torch.testing.assert_close(ious, torch.cat(want["ious"]), atol=1e-4, rtol=1e-4)


def test_head_features_are_the_class_tower_at_box_centres(data):
    """Same boxes as the FPN features; each row the bilinear value of RetinaHead's class tower
    at the box centre (in the resized image) on its anchor's level, computed by hand here."""
    from alrun.detectors.mmdet import _dense
    from alrun.detectors.mmdet_mc import retina_towers

    det = retinanet(len(data.classes))
    records = data.images[:2]
    fpn = det.predict(records, Needs(feats=True))
    head_feats = det.predict(records, Needs(feats=True, head_feats=True))
    head = det.model.bbox_head
    for a, b in zip(fpn, head_feats):
        assert torch.equal(a.boxes, b.boxes) and len(b.boxes) > 0
        assert b.feats.shape == (len(b.boxes), head.feat_channels)
        assert not torch.allclose(a.feats, b.feats)  # another embedding space than the FPN
    with torch.no_grad():  # by hand: the tower, the box centre, bilinear weights
        inputs, samples = det._prepare([load_image(records[0])])
        levels = list(det.model.extract_feat(inputs))
        found = _dense(head, levels, samples)[0]
        towers = [cls for cls, _ in retina_towers(head, levels)]
    ends = torch.tensor([t.shape[2] * t.shape[3] * head.num_base_priors for t in towers]).cumsum(0)
    height, width = inputs.shape[-2:]
    for row in range(min(5, len(found["boxes"]))):
        level = int(torch.searchsorted(ends, found["sources"][row], right=True))
        tower = towers[level][0]
        x1, y1, x2, y2 = found["boxes"][row].tolist()
        fx = (x1 + x2) / 2 / width * tower.shape[2] - 0.5
        fy = (y1 + y2) / 2 / height * tower.shape[1] - 0.5
        value = torch.zeros(tower.shape[0])
        for yy in (int(fy // 1), int(fy // 1) + 1):
            for xx in (int(fx // 1), int(fx // 1) + 1):
                weight = (1 - abs(fx - xx)) * (1 - abs(fy - yy))
                if 0 <= yy < tower.shape[1] and 0 <= xx < tower.shape[2]:  # zero padding
                    value += weight * tower[:, yy, xx]
        torch.testing.assert_close(head_feats[0].feats[row], value, atol=1e-5, rtol=1e-4)


def test_faster_rcnn_declares_neither_and_refuses(data):
    det = faster_rcnn(len(data.classes))
    assert not {base.ANCHOR_QUALITY, base.HEAD_FEATURES} & det.capabilities
    assert {base.ANCHOR_QUALITY, base.HEAD_FEATURES} <= retinanet().capabilities
    with pytest.raises(AlrunError, match="needs an mmdet RetinaNet head"):
        det.watch_positive_anchors(lambda *a: None)


def test_one_round_of_ppal(tmp_path):
    """The real CLI on detector=mmdet_retinanet_r50 (ResNet-18 at 96 px): PPAL with its EMA
    class quality (read from the head's loss) and its CCMS step on the class tower's features
    (strategy=ccms is that step alone: the matrix test covers its start-up)."""
    strategy = "ppal"
    run_dir, _ = one_cli_round(
        tmp_path, "mmdet_retinanet_r50", f"strategy={strategy}", pool_images=10
    )
    selection = json.loads((run_dir / "round_00" / "selection.json").read_text())
    assert len(selection["selected"]) == 2
    train = json.loads((run_dir / "round_00" / "metrics.json").read_text())["train"]
    quality = [v for k, v in train.items() if "ppal_quality" in k]
    assert quality and max(quality) > 0, train
