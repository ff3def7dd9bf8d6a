"""The mixture-density head (AL-MDN): hand-computed uncertainties and losses, training through
the detector, reading at the kept boxes' anchors, checkpoints, refusals."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from alrun.data.images import load_image
from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.base import TrainSchedule
from alrun.detectors.mdn import (
    Mixture,
    focal_loss_on_probs,
    mixture_losses,
    mixture_nll,
    mixture_probability,
    mixture_uncertainty,
)
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.errors import AlrunError
from alrun.types import Needs

MDN = Needs(probs=True, mixture_density=2)


def _mixture(reg_mu, reg_var, reg_pi, cls_mu, cls_var, cls_pi) -> Mixture:
    t = partial(torch.tensor, dtype=torch.float64)
    return Mixture(t(cls_mu), t(cls_var), t(cls_pi), t(reg_mu), t(reg_var), t(reg_pi))


def test_uncertainties_of_a_hand_made_two_component_mixture():
    # one box, K = 2, C = 1; coordinate 0 has component means 0 and 2, the others agree
    mix = _mixture(
        reg_mu=[[[0.0, 1, 1, 1], [2.0, 1, 1, 1]]],
        reg_var=[[[1.0] * 4, [3.0] * 4]],
        reg_pi=[[[0.5] * 4, [0.5] * 4]],
        cls_mu=[[[0.0], [math.log(3.0)]]],  # sigmoid: 0.5 and 0.75
        cls_var=[[[0.2], [0.4]]],
        cls_pi=[[0.25, 0.75]],
    )
    got = mixture_uncertainty(mix, torch.tensor([0]))
    # loc aleatoric: 0.5 * 1 + 0.5 * 3 = 2 on every coordinate; epistemic: coordinate 0 has
    # mean 1 and 0.5 * 1 + 0.5 * 1 = 1, the others 0 -> max 1
    # cls: mean p = 0.25 * 0.5 + 0.75 * 0.75 = 0.6875; aleatoric 0.25 * 0.2 + 0.75 * 0.4 = 0.35;
    # epistemic 0.25 * 0.1875^2 + 0.75 * 0.0625^2 = 0.01171875
    assert torch.allclose(got, torch.tensor([[2.0, 1.0, 0.35, 0.01171875]], dtype=torch.float64))


def test_classification_uncertainty_is_read_for_the_box_class():
    mix = _mixture(
        reg_mu=[[[0.0] * 4]],
        reg_var=[[[1.0] * 4]],
        reg_pi=[[[1.0] * 4]],
        cls_mu=[[[0.0, 5.0]]],
        cls_var=[[[0.1, 0.7]]],
        cls_pi=[[1.0]],
    )
    assert mixture_uncertainty(mix, torch.tensor([1]))[0, 2] == pytest.approx(0.7)
    assert mixture_uncertainty(mix, torch.tensor([0]))[0, 2] == pytest.approx(0.1)
    # one component: no epistemic spread
    assert mixture_uncertainty(mix, torch.tensor([1]))[0, 3] == 0


def test_nll_of_one_component_is_the_gaussian_nll():
    mix = _mixture(
        [[[0.5, 0, 0, 0]]], [[[2.0, 1, 1, 1]]], [[[1.0] * 4]], [[[0.0]]], [[[1.0]]], [[1.0]]
    )
    y = torch.tensor([[1.5, 0, 0, 0]], dtype=torch.float64)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    expected = (half_log_2pi + 0.5 * math.log(2.0) + 0.5 * 1.0 / 2.0) + 3 * half_log_2pi
    assert float(mixture_nll(mix, y)) == pytest.approx(expected)
    # two identical components weighted 0.5 each: the same density
    two = _mixture(
        [[[0.5, 0, 0, 0], [0.5, 0, 0, 0]]],
        [[[2.0, 1, 1, 1], [2.0, 1, 1, 1]]],
        [[[0.5] * 4, [0.5] * 4]],
        [[[0.0], [0.0]]],
        [[[1.0], [1.0]]],
        [[0.5, 0.5]],
    )
    assert float(mixture_nll(two, y)) == pytest.approx(expected)


def test_focal_loss_on_probabilities_matches_torchvision_on_logits():
    logits = torch.tensor([[-2.0, 0.5], [1.0, 3.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ours = focal_loss_on_probs(torch.sigmoid(logits), target)
    assert float(ours) == pytest.approx(float(sigmoid_focal_loss(logits, target, reduction="sum")))
    # a one-component mixture without noise is the plain sigmoid
    mix = Mixture(
        logits[:, None, :],
        torch.ones(2, 1, 2),
        torch.ones(2, 1),
        *[torch.zeros(2, 1, 4)] * 2,
        torch.ones(2, 1, 4),
    )
    assert torch.allclose(mixture_probability(mix), torch.sigmoid(logits))


def test_losses_ignore_between_threshold_rows_and_normalise_by_foreground():
    torch.manual_seed(0)
    k, c, rows = 2, 3, 5
    mix = Mixture(
        torch.randn(1, rows, k, c),
        torch.rand(1, rows, k, c) + 0.1,
        torch.softmax(torch.randn(1, rows, k), -1),
        torch.randn(1, rows, k, 4),
        torch.rand(1, rows, k, 4) + 0.1,
        torch.softmax(torch.randn(1, rows, k, 4), -2),
    )
    cls_target = torch.tensor([[2, -1, -2, 0, -1]])
    reg_target = torch.randn(1, rows, 4)
    noise = torch.zeros(1, rows, k, c)
    got = mixture_losses(mix, cls_target, reg_target, noise)
    p = mixture_probability(mix, noise)[0]
    onehot = torch.zeros(rows, c)
    onehot[0, 2] = onehot[3, 0] = 1
    valid = torch.tensor([True, True, False, True, True])
    assert float(got["mdn_classification"]) == pytest.approx(
        float(focal_loss_on_probs(p[valid], onehot[valid]) / 2), rel=1e-6
    )
    fg = torch.tensor([True, False, False, True, False])
    assert float(got["mdn_regression"]) == pytest.approx(
        float(mixture_nll(mix.rows((0, fg)), reg_target[0, fg]) / 2), rel=1e-6
    )


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(16, image_size=64, split="mdn-head")


def _detector(components=2) -> TorchvisionDetector:
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    det.prepare(Needs(mixture_density=components))
    return det


def _schedule(iterations):
    return TrainSchedule(
        iterations=iterations, batch_size=8, lr=0.01, warmup_iters=2, grad_clip=10.0
    )


def _batch(records):
    images = [load_image(r) for r in records]
    targets = [
        {
            "boxes": torch.as_tensor(r.boxes, dtype=torch.float32),
            "labels": torch.as_tensor(r.labels),
        }
        for r in records
    ]
    return images, targets


def test_mixture_losses_train_the_head_only_and_fall(data):
    det = _detector()

    images, targets = _batch(data.images[:8])
    det.train_mode()
    losses = det.losses(images, targets)
    assert {"mdn_classification", "mdn_regression"} <= set(losses)
    det.model.zero_grad()
    (losses["mdn_classification"] + losses["mdn_regression"]).backward()
    head = det.model.head
    assert head.mdn.cls.weight.grad.abs().sum() > 0 and head.mdn.reg.weight.grad.abs().sum() > 0
    # detached tower features: the mixture losses leave the detector's own weights alone
    for module in (head.classification_head.conv, det.model.backbone):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())
    before = {k: float(v.detach()) for k, v in losses.items() if k.startswith("mdn")}
    det.fit(data, _schedule(40), seed=0)
    det.train_mode()
    with torch.no_grad():
        after = {k: float(v) for k, v in det.losses(images, targets).items() if k.startswith("mdn")}
    assert after["mdn_regression"] < before["mdn_regression"]
    assert after["mdn_classification"] < before["mdn_classification"]


def test_uncertainties_are_read_at_each_box_anchor_whatever_the_batch(data):
    det = _detector()
    det.fit(data, _schedule(15), seed=0)
    batch = det.predict(data.images[:4], MDN)
    assert all(d.mdn is not None and d.mdn.shape == (len(d), 4) for d in batch)
    assert sum(len(d) for d in batch) > 0
    assert all(bool((d.mdn >= 0).all()) for d in batch)
    alone = det.predict(data.images[2:3], MDN)[0]
    assert torch.allclose(alone.mdn, batch[2].mdn, atol=1e-5)
    assert det.predict(data.images[:1], Needs(probs=True))[0].mdn is None  # only when asked


def test_checkpoint_holds_the_mixture_head_and_loads_back(data):
    det = _detector()
    det.fit(data, _schedule(5), seed=0)
    state = det.state_dict()
    assert any(k.startswith("head.mdn.") for k in state)
    other = _detector()
    other.load_state_dict(state)
    a = det.predict(data.images[:2], MDN)
    b = other.predict(data.images[:2], MDN)
    assert all(torch.equal(x.mdn, y.mdn) for x, y in zip(a, b))
    # a deep copy (an EMA teacher) trains and predicts on its own
    det.train_mode()
    det.losses(*_batch(data.images[:2]))  # a training forward: its captures are released
    teacher = copy.deepcopy(det.model)
    assert teacher.head.compute_loss.model is teacher
    teacher.train()
    assert {"mdn_classification", "mdn_regression"} <= set(teacher(*_batch(data.images[:2])))


def test_mixture_head_on_a_detector_without_a_dense_head_is_refused():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    det = TorchvisionDetector(
        partial(ssdlite320_mobilenet_v3_large, weights=None, weights_backbone=None),
        num_classes=3,
        label_offset=1,
        device="cpu",
    )
    with pytest.raises(AlrunError, match=r"mixture-density head \(AL-MDN\).*FCOS and RetinaNet"):
        det.prepare(Needs(mixture_density=4))


def test_the_detector_trains_exactly_as_without_the_mixture_head(data):
    plain = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    mixed = _detector()
    plain.fit(data, _schedule(12), seed=3, from_scratch=True)
    mixed.fit(data, _schedule(12), seed=3, from_scratch=True)
    # detached features, a separate gradient-clip group and a noise generator of its own: the
    # detector's weights come out bit for bit the same
    own = plain.model.state_dict()
    other = mixed.model.state_dict()
    assert set(other) - set(own) == {k for k in other if k.startswith("head.mdn.")}
    assert all(torch.equal(own[k], other[k]) for k in own)


def test_retinanet_gets_a_mixture_head_with_nine_anchors_per_location(data):
    from torchvision.models.detection import retinanet_resnet50_fpn

    builder = partial(
        retinanet_resnet50_fpn,
        weights=None,
        weights_backbone=None,
        min_size=64,
        max_size=64,
        score_thresh=0.0,
    )
    det = TorchvisionDetector(builder, num_classes=4, device="cpu")
    det.prepare(Needs(mixture_density=3))
    assert det.model.head.mdn.num_anchors == 9
    stats = det.fit(data, _schedule(2), seed=0)
    assert math.isfinite(stats["final_loss"])
    found = det.predict(data.images[:2], Needs(probs=True, mixture_density=3))
    assert all(d.mdn.shape == (len(d), 4) and len(d) > 0 for d in found)
    # RetinaNet's encoding (dx, dy, dw, dh) is what the regression mixture is trained on
    images, targets = _batch(data.images[:2])
    det.train_mode()
    assert {"mdn_classification", "mdn_regression"} <= set(det.losses(images, targets))


def _towers(det: TorchvisionDetector) -> dict[str, torch.Tensor]:
    head = det.model.head
    return {
        **{f"cls.{k}": v for k, v in head.classification_head.conv.state_dict().items()},
        **{f"reg.{k}": v for k, v in head.regression_head.conv.state_dict().items()},
    }


def test_coupled_mixture_losses_reach_the_towers_and_backbone(data):
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    det.prepare(Needs(mixture_density=2, mixture_coupling="coupled"))
    det.train_mode()
    losses = det.losses(*_batch(data.images[:8]))
    det.model.zero_grad()
    (losses["mdn_classification"] + losses["mdn_regression"]).backward()
    head = det.model.head
    for module in (head.classification_head.conv, head.regression_head.conv, det.model.backbone):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_one_step_coupled_changes_the_towers_side_does_not(data):
    """The same step from the same weights: ``side`` leaves the towers exactly as a detector
    without the mixture head has them, ``coupled`` moves them (its losses train them)."""
    after = {}
    for coupling in (None, "side", "coupled"):
        det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
        if coupling:
            det.prepare(Needs(mixture_density=2, mixture_coupling=coupling))
        det.fit(data, _schedule(1), seed=5, from_scratch=True)
        after[coupling] = _towers(det)
    plain = after[None]
    assert all(torch.equal(plain[k], after["side"][k]) for k in plain)
    assert any(not torch.equal(plain[k], after["coupled"][k]) for k in plain)


def test_unknown_coupling_is_refused():
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    with pytest.raises(
        AlrunError, match=r"^strategy.scorer.coupling: expected one of side\|coupled"
    ):
        det.add_mixture_head(2, "glued")
