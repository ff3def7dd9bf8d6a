"""MI-AOD's ``dense_head`` on mmdet's RetinaNet: the training forward's FPN levels, the head's
anchors and the resized targets, and one real ``strategy=mi_aod`` round through the CLI.
Marked ``mmdet`` (run with ``.venv-mmdet/bin/python -m pytest -m mmdet``)."""

from __future__ import annotations

import json

import pytest
import torch

from alrun.data.images import load_image
from alrun.detectors import base
from alrun.errors import AlrunError
from tests.detectors.mmdet_helpers import (
    faster_rcnn,
    needs_mmdet,
    one_cli_round,
    retinanet,
)

pytestmark = [needs_mmdet, pytest.mark.mmdet]


def test_dense_batches_are_the_training_forwards_levels_anchors_and_targets(data):
    det = retinanet(len(data.classes))
    assert isinstance(det, base.DenseHead) and det.anchors_per_location == 9
    records = data.images[:2]
    images = [load_image(r) for r in records]
    targets = [
        {"boxes": torch.as_tensor(r.boxes).float(), "labels": torch.as_tensor(r.labels).long()}
        for r in records
    ]
    seen: list[base.DenseBatch] = []
    stop = det.watch_dense_batches(seen.append)
    det.train_mode()
    det.losses(images, targets)
    det.features(images)  # no targets: not reported
    stop()
    det.losses(images, targets)
    assert len(seen) == 1
    (batch,) = seen
    with torch.no_grad():
        inputs, samples = det._prepare(images, targets)
        levels = list(det.model.extract_feat(inputs))
        sizes = [f.shape[-2:] for f in levels]
        priors = det.model.bbox_head.prior_generator.grid_priors(sizes, device="cpu")
    assert all(lv.requires_grad for lv in batch.levels)
    for got, want in zip(batch.levels, levels):
        torch.testing.assert_close(got.detach(), want)
    assert len(batch.anchors) == 2 and torch.equal(batch.anchors[0], torch.cat(priors))
    assert len(batch.anchors[0]) == sum(h * w for h, w in sizes) * det.anchors_per_location
    for got, sample, plain in zip(batch.targets, samples, targets):
        torch.testing.assert_close(got["boxes"], sample.gt_instances.bboxes)
        assert torch.equal(got["labels"], plain["labels"])


def test_faster_rcnn_has_no_dense_head(data):
    det = faster_rcnn(len(data.classes))
    assert base.DENSE_HEAD not in det.capabilities
    with pytest.raises(AlrunError, match="need an mmdet dense head"):
        det.watch_dense_batches(lambda batch: None)


def test_one_round_of_mi_aod(tmp_path):
    """The real CLI: strategy=mi_aod (its heads trained beside RetinaNet's, with the max and
    min steps on unlabelled batches) on detector=mmdet_retinanet_r50 (ResNet-18 at 96 px)."""
    run_dir, _ = one_cli_round(tmp_path, "mmdet_retinanet_r50", "strategy=mi_aod", pool_images=10)
    train = json.loads((run_dir / "round_00" / "metrics.json").read_text())["train"]
    assert "mi_aod/final_det_cls" in train and "mi_aod/final_imgcls" in train, sorted(train)
    assert train["mi_aod/unlabelled_steps"] == train["iterations"]
    selection = json.loads((run_dir / "round_00" / "selection.json").read_text())
    assert selection["scorer"] == "mi_aod" and len(selection["selected"]) == 2
