"""AL-MDN's mixture-density head on mmdet's RetinaNet (``mixture_head``): trained on the head's
own assignment (checked against its MaxIoUAssigner), both couplings, uncertainties per kept
box, rebuilds and teacher copies, and one real ``strategy=al_mdn`` round through the CLI.
Marked ``mmdet`` (run with ``.venv-mmdet/bin/python -m pytest -m mmdet``)."""

from __future__ import annotations

import copy
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

pytestmark = [needs_mmdet, pytest.mark.mmdet]
MDN_LOSSES = {"loss_mdn_classification", "loss_mdn_regression"}


def _batch(data):
    records = data.images[:2]
    images = [load_image(r) for r in records]
    targets = [
        {
            "boxes": torch.as_tensor(r.boxes, dtype=torch.float32),
            "labels": torch.as_tensor(r.labels, dtype=torch.int64),
        }
        for r in records
    ]
    return images, targets


def test_mixture_targets_are_the_heads_assignment(data, monkeypatch):
    """The class targets the mixture trains on are the MaxIoUAssigner's (class, -1 negative,
    -2 ignored) and the box targets the head's bbox_coder encoding of the assigned box."""
    from mmengine.structures import InstanceData

    import alrun.detectors.mmdet_mdn as mmdet_mdn

    det = retinanet(len(data.classes))
    det.add_mixture_head(3)
    seen = []
    original = mmdet_mdn.mixture_losses
    monkeypatch.setattr(mmdet_mdn, "mixture_losses", lambda *a: seen.append(a[1:3]) or original(*a))
    images, targets = _batch(data)
    det.train_mode()
    losses = det.losses(images, targets)
    assert MDN_LOSSES <= set(losses) and all(torch.isfinite(losses[k]) for k in MDN_LOSSES)
    ((cls_target, reg_target),) = seen
    head = det.model.bbox_head
    with torch.no_grad():
        inputs, samples = det._prepare(images, targets)
        sizes = [f.shape[-2:] for f in det.model.extract_feat(inputs)]
        priors = torch.cat(head.prior_generator.grid_priors(sizes, device=inputs.device))
    for b, sample in enumerate(samples):
        gt = sample.gt_instances
        gt_inds = head.assigner.assign(InstanceData(priors=priors), gt).gt_inds
        want = torch.full_like(gt_inds, -2)
        want[gt_inds == 0] = -1
        pos = gt_inds > 0
        want[pos] = gt.labels[gt_inds[pos] - 1]
        assert torch.equal(cls_target[b], want) and int(pos.sum()) > 0
        encoded = head.bbox_coder.encode(priors[pos], gt.bboxes[gt_inds[pos] - 1])
        torch.testing.assert_close(reg_target[b][pos], encoded)


@pytest.mark.parametrize("coupling", ["side", "coupled"])
def test_couplings_decide_whether_the_mixture_trains_the_towers(data, coupling):
    det = retinanet(len(data.classes))
    det.add_mixture_head(2, coupling)
    assert base.MIXTURE_HEAD in det.capabilities
    head = det.model.bbox_head
    assert {id(p) for p in det.auxiliary_parameters()} == {id(p) for p in head.mdn.parameters()}
    det.train_mode()
    losses = det.losses(*_batch(data))
    sum(losses[k] for k in MDN_LOSSES).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.mdn.parameters())
    tower = head.cls_convs[-1].conv.weight.grad
    if coupling == "side":
        assert tower is None or float(tower.abs().sum()) == 0
    else:
        assert tower is not None and float(tower.abs().sum()) > 0


def test_uncertainties_rebuild_state_and_teacher_copies(data):
    det = retinanet(len(data.classes))
    records = data.images[:2]
    with pytest.raises(AlrunError, match="has no mixture head"):
        det.predict(records, Needs(mixture_density=2))
    det.add_mixture_head(2)
    plain = det.predict(records, Needs(probs=True))
    found = det.predict(records, Needs(probs=True, mixture_density=2))
    for a, b in zip(plain, found):
        assert torch.equal(a.boxes, b.boxes) and len(b.boxes) > 0
        assert b.mdn.shape == (len(b.boxes), 4) and bool((b.mdn >= 0).all())
    assert a.mdn is None
    state = det.state_dict()
    assert any(k.startswith("bbox_head.mdn.") for k in state)
    det.reset(seed=1)  # the rebuilt model gets its mixture head again
    det.load_state_dict(state)
    again = det.predict(records, Needs(probs=True, mixture_density=2))
    torch.testing.assert_close(again[0].mdn, found[0].mdn)
    teacher = copy.deepcopy(det.model)  # a copy captures its own towers and trains its own head
    teacher.train()
    inputs, samples = det._prepare(*_batch(data))
    losses = teacher.loss(inputs, samples)
    sum(losses[k] for k in MDN_LOSSES).backward()
    assert teacher.bbox_head.mdn.cls.weight.grad is not None
    assert det.model.bbox_head.mdn.cls.weight.grad is None
    stop = det.watch_positive_anchors(lambda *a: None)  # PPAL's watcher leaves the mixture be
    stop()
    det.train_mode()
    assert MDN_LOSSES <= set(det.losses(*_batch(data)))


def test_faster_rcnn_refuses_a_mixture_head(data):
    det = faster_rcnn(len(data.classes))
    assert base.MIXTURE_HEAD not in det.capabilities
    with pytest.raises(AlrunError, match="needs RetinaNet's head"):
        det.add_mixture_head(2)
    with pytest.raises(AlrunError, match="strategy.scorer.coupling"):
        retinanet(len(data.classes)).add_mixture_head(2, "glued")


def test_one_round_of_al_mdn(tmp_path):
    """The real CLI: strategy=al_mdn, coupled as in the paper (the couplings' gradients are
    checked above), on detector=mmdet_retinanet_r50 (ResNet-18 at 96 px)."""
    coupling = "coupled"
    run_dir, _ = one_cli_round(
        tmp_path, "mmdet_retinanet_r50", "strategy=al_mdn",
        f"strategy.scorer.coupling={coupling}", "strategy.scorer.score_threshold=0.0",
        pool_images=10,
    )  # fmt: skip
    state = torch.load(run_dir / "round_01" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("bbox_head.mdn.") for k in state)  # trained and saved with it
    selection = json.loads((run_dir / "round_00" / "selection.json").read_text())
    assert len(selection["selected"]) == 2
