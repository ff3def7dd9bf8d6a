"""PPAL's capabilities on the torchvision dense heads: positive-anchor quality inputs
(``anchor_quality``) and the classification tower at the box centre (``head_features``)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models.detection import FasterRCNN, retinanet_resnet50_fpn
from torchvision.ops import box_iou

from alrun.data.images import load_image
from alrun.data.synthetic import synthetic_dataset
from alrun.detectors import base
from alrun.detectors.capabilities import check_capabilities
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector, family_capabilities
from alrun.detectors.torchvision.postprocess_dense import centre_features
from alrun.errors import AlrunError
from alrun.types import Needs
from tests.helpers import box_target, compose_config


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(4, image_size=64, split="ppal-caps")


def test_retinanet_positive_anchors_are_what_its_matcher_assigns(data):
    builder = partial(
        retinanet_resnet50_fpn, weights=None, weights_backbone=None, min_size=64, max_size=64
    )
    det = TorchvisionDetector(builder, len(data.classes), device="cpu")
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
    # independently: torchvision's matcher on the same anchors, IoU by box_iou's diagonal
    model = det.model
    with torch.no_grad():
        batch, scaled = model.transform(images, targets)
        feats = list(model.backbone(batch.tensors).values())
        out = model.head(feats)
        anchors = model.anchor_generator(batch, feats)
        want_labels, want_p, want_iou = [], [], []
        for b, t in enumerate(scaled):
            matched = model.proposal_matcher(box_iou(t["boxes"], anchors[b]))
            pos = torch.where(matched >= 0)[0]
            gt = t["boxes"][matched[pos]]
            boxes = model.box_coder.decode_single(out["bbox_regression"][b][pos], anchors[b][pos])
            lab = t["labels"][matched[pos]]
            want_labels.append(lab)
            want_p.append(torch.sigmoid(out["cls_logits"][b][pos, lab]))
            want_iou.append(box_iou(boxes, gt).diagonal())
    assert len(labels) > 0
    assert torch.equal(labels, torch.cat(want_labels))
    torch.testing.assert_close(probs, torch.cat(want_p))
    torch.testing.assert_close(ious, torch.cat(want_iou), atol=1e-5, rtol=1e-4)


def test_positive_anchor_labels_are_dataset_classes_with_a_label_offset(data):
    det = TorchvisionDetector(
        partial(tiny_fcos, image_size=64), len(data.classes), device="cpu", label_offset=1
    )
    records = data.images[:2]
    targets = [box_target(r) for r in records]
    seen = []
    stop = det.watch_positive_anchors(lambda *a: seen.append(a))
    det.train_mode()
    det.losses([load_image(r) for r in records], targets)
    stop()
    labels = seen[0][0]
    assert len(labels) > 0
    assert set(labels.tolist()) <= {int(c) for r in records for c in r.labels}


def test_centre_features_sample_the_map_at_the_box_centre():
    # one level, 4x4 map of stride 8 over a 32x32 padded batch; value = 10 * y + x per channel
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    fmap = torch.stack([10 * ys + xs, -(10 * ys + xs)])[None]  # (1, 2, 4, 4)
    boxes = torch.tensor(
        [[8.0, 16.0, 16.0, 24.0], [8.0, 8.0, 24.0, 24.0]]
    )  # centres (12, 20), (16, 16)
    found = [{"boxes": boxes, "sources": torch.tensor([0, 5])}]
    (feats,) = centre_features([fmap], found, num_anchors=16, padded=(32, 32))
    assert feats[0].tolist() == pytest.approx([21.0, -21.0])  # pixel (x 1, y 2)'s centre
    assert feats[1].tolist() == pytest.approx([16.5, -16.5])  # between 4 pixels: their mean


def test_head_features_are_the_class_tower_at_box_centres(data):
    det = TorchvisionDetector(
        partial(tiny_fcos, image_size=64, score_thresh=0.001), len(data.classes), device="cpu"
    )
    records = data.images[:2]
    fpn = det.predict(records, Needs(feats=True))
    head = det.predict(records, Needs(feats=True, head_feats=True))
    for a, b in zip(fpn, head):
        assert torch.equal(a.boxes, b.boxes) and len(b.boxes) > 0
        assert b.feats.shape[0] == len(b.boxes) and torch.isfinite(b.feats).all()
        assert not torch.allclose(a.feats, b.feats)  # another embedding space than the FPN


def test_ppal_requires_the_new_capabilities_and_two_stage_models_refuse():
    strategy = instantiate(compose_config(["strategy=ppal"]).strategy)
    assert {base.ANCHOR_QUALITY, base.HEAD_FEATURES} <= strategy.requires
    assert {base.ANCHOR_QUALITY, base.HEAD_FEATURES} <= family_capabilities(
        type(TorchvisionDetector(partial(tiny_fcos, image_size=64), 2, device="cpu").model)
    )
    with pytest.raises(AlrunError, match=r"^strategy=ppal: needs anchor_quality .*detector=tiny"):
        check_capabilities(
            [("strategy=ppal", strategy.requires)], family_capabilities(FasterRCNN), "fasterrcnn"
        )
    faithful_off = instantiate(
        compose_config(
            [
                "strategy=ppal",
                "strategy.scorer.quality=post_nms",
                "strategy.selector.diversity.features=fpn",
            ]
        ).strategy
    )
    assert not {base.ANCHOR_QUALITY, base.HEAD_FEATURES} & faithful_off.requires
