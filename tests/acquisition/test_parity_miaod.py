"""Parity with MI-AOD's code (github.com/yuantn/MI-AOD):

* ``mmdet/apis/test.py`` ``calculate_uncertainty``: sigmoid both classifiers' (N, C) logits,
  ``(p1 - p2)^2``, mean over classes, mean of the ``k`` largest (:func:`_reference_uncertainty`).
* ``MIAOD_retina_head.py`` ``forward_single``: mmdet's ``permute(0, 2, 3, 1).reshape(B, -1, C)``
  layout and ``y_head_cls = softmax_2(f_mil) * softmax_1(max_2 sigmoid((f_1 + f_2) / 2))``.
* ``MIAOD_head.py`` ``get_img_gtlabel_score``: max over levels of the per-level sum, clamped.
* ``L_det`` / ``l_det``: mmdet's sigmoid ``FocalLoss`` (gamma 2, alpha 0.25) summed over the
  anchors whose label weight is 1 (not between the IoU thresholds), over ``num_total_pos``;
  the two classifiers' losses averaged (``base_dense_head.forward_train``, losstype 0).
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from alrun.acquisition.miaod import (
    InstanceClassifiers,
    MiaodHook,
    MiaodUncertainty,
    discrepancy_loss,
    image_class_scores,
    image_uncertainty,
    label_set_loss,
    mil_weights,
    pseudo_image_labels,
)
from alrun.cli import user_error
from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.base import TrainSchedule
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.engine import BatchSource, train
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from tests.helpers import compose_config


def _reference_uncertainty(y_head_f_1, y_head_f_2, k):
    y_head_f_1 = torch.nn.Sigmoid()(torch.cat(y_head_f_1, 0))
    y_head_f_2 = torch.nn.Sigmoid()(torch.cat(y_head_f_2, 0))
    loss_l2_p = (y_head_f_1 - y_head_f_2).pow(2)
    uncertainty_all_N = loss_l2_p.mean(dim=1)
    arg = uncertainty_all_N.argsort()
    return float(uncertainty_all_N[arg[-k:]].mean())


def _reference_forward_single(y_head_f_1, y_head_f_2, y_head_f_mil, C):
    """The tail of MIAODRetinaHead.forward_single on (B, A*C, H, W) conv outputs."""
    y_head_cls_term2 = ((y_head_f_1 + y_head_f_2) / 2).detach()
    y_head_f_mil = y_head_f_mil.permute(0, 2, 3, 1).reshape(y_head_f_1.shape[0], -1, C)
    y_head_cls_term2 = y_head_cls_term2.permute(0, 2, 3, 1).reshape(y_head_f_1.shape[0], -1, C)
    return y_head_f_mil.softmax(2) * y_head_cls_term2.sigmoid().max(2, keepdim=True)[0].softmax(1)


def _reference_img_score(y_head_cls, batch, C):
    y_head_cls_1level = torch.zeros(batch, C)
    for y_head_cls_single in y_head_cls:
        y_head_cls_1level = torch.max(y_head_cls_1level, y_head_cls_single.sum(1))
    return y_head_cls_1level.clamp(1e-5, 1.0 - 1e-5)


def _mmdet_focal(pred, target_labels, weights, avg_factor, C, gamma=2.0, alpha=0.25):
    """mmdet py_sigmoid_focal_loss with one-hot targets (label C = background), reduction
    'mean' with avg_factor = sum / avg_factor."""
    target = torch.nn.functional.one_hot(target_labels, C + 1)[:, :C].float()
    p = pred.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    fw = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
    return (loss * fw * weights[:, None]).sum() / avg_factor


@pytest.mark.parametrize("seed", range(5))
def test_image_uncertainty_matches_calculate_uncertainty(seed):
    g = torch.Generator().manual_seed(seed)
    levels = [int(n) for n in torch.randint(5, 40, (3,), generator=g)]
    f1 = [torch.randn(n, 4, generator=g) * 3 for n in levels]
    f2 = [torch.randn(n, 4, generator=g) * 3 for n in levels]
    for k in (1, 7, 10000):
        expected = _reference_uncertainty(f1, f2, k)
        assert image_uncertainty(torch.cat(f1), torch.cat(f2), k) == pytest.approx(expected)


def test_hand_worked_uncertainty():
    # two instances, one class: p = (0.5, 0.5) vs (0.5, sigmoid(2) = 0.8808)
    f1, f2 = torch.zeros(2, 1), torch.tensor([[0.0], [2.0]])
    d = (torch.sigmoid(torch.tensor(2.0)) - 0.5) ** 2
    assert image_uncertainty(f1, f2, k=1) == pytest.approx(float(d))
    assert image_uncertainty(f1, f2, k=2) == pytest.approx(float(d) / 2)
    # MIL option: sum of discrepancy x the instance's largest class weight
    w = torch.tensor([[0.9], [0.25]])
    assert image_uncertainty(f1, f2, weights=w) == pytest.approx(0.25 * float(d))


def test_heads_layout_and_mil_weights_match_forward_single():
    torch.manual_seed(0)
    anchors, classes = 3, 4
    heads = InstanceClassifiers(8, anchors, classes, stacked_convs=1)
    levels = [torch.randn(2, 8, 5, 6), torch.randn(2, 8, 3, 3)]
    f1, f2, mil = heads(levels)
    weights = []
    for x, a, b, m in zip(levels, f1, f2, mil):
        raw1 = heads.f_1(heads.f_1_convs(x))
        raw2 = heads.f_2(heads.f_2_convs(x))
        rawm = heads.f_mil(heads.f_mil_convs(x))
        mm = raw1.permute(0, 2, 3, 1).reshape(2, -1, classes)  # mmdet's layout
        assert torch.equal(a, mm)
        expected = _reference_forward_single(raw1, raw2, rawm, classes)
        weights.append(mil_weights(a, b, m))
        torch.testing.assert_close(weights[-1], expected)
    torch.testing.assert_close(
        image_class_scores(weights), _reference_img_score(weights, 2, classes)
    )


def test_label_set_loss_matches_mmdet_focal_loss():
    torch.manual_seed(1)
    classes = 3
    anchors = [torch.tensor([[0, 0, 10, 10], [0, 0, 10, 7], [20, 20, 30, 30], [0, 0, 10, 5.5],
                             [40, 40, 50, 50]], dtype=torch.float32)]  # fmt: skip
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([2])}
    f1, f2 = torch.randn(1, 5, classes), torch.randn(1, 5, classes)
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    got = label_set_loss(f1, f2, anchors, [target], 0, matcher)
    # IoUs 1, 0.7, 0, 0.55, 0: positives 0, 1, 3 (class 2), negatives 2, 4, none ignored;
    # anchor with IoU in [0.4, 0.5) would get label weight 0
    labels = torch.tensor([2, 2, classes, 2, classes])
    weights = torch.ones(5)
    expected = (_mmdet_focal(f1[0], labels, weights, 3, classes)
                + _mmdet_focal(f2[0], labels, weights, 3, classes)) / 2  # fmt: skip
    torch.testing.assert_close(got, expected)
    # an anchor between the thresholds (IoU 0.45) is ignored
    anchors2 = [torch.cat([anchors[0], torch.tensor([[0.0, 0.0, 10.0, 4.5]])])]
    f1b, f2b = (
        torch.cat([f1, torch.randn(1, 1, classes)], 1),
        torch.cat([f2, torch.randn(1, 1, 3)], 1),
    )
    got2 = label_set_loss(f1b, f2b, anchors2, [target], 0, matcher)
    labels2, weights2 = (
        torch.cat([labels, torch.tensor([classes])]),
        torch.tensor([1.0] * 5 + [0.0]),
    )
    expected2 = (_mmdet_focal(f1b[0], labels2, weights2, 3, classes)
                 + _mmdet_focal(f2b[0], labels2, weights2, 3, classes)) / 2  # fmt: skip
    torch.testing.assert_close(got2, expected2)


def _reference_wave_dis(y_head_f_1_single, y_head_f_2_single, y_head_cls_single, C, lam, minus):
    """MIAOD_head.l_wave_dis / l_wave_dis_minus on (B, A*C, H, W) logits, weights (B, N, C)."""
    y_head_f_1_single = y_head_f_1_single.permute(0, 2, 3, 1).reshape(-1, C).sigmoid()
    y_head_f_2_single = y_head_f_2_single.permute(0, 2, 3, 1).reshape(-1, C).sigmoid()
    w_i = y_head_cls_single.detach()
    gap = abs(y_head_f_1_single - y_head_f_2_single)
    if minus:
        gap = 1 - gap
    return (gap * w_i.reshape(-1, C)).mean(dim=1).sum() * lam


def _reference_pseudo(y_f, batch_size, C):
    """MIAOD_head.get_img_pseudolabel_score's y_pseudo (y_f: two lists of per-level logits)."""
    y_pseudo = torch.zeros(batch_size, C)
    for s in range(len(y_f[0])):
        y_head_f_i = y_f[0][s].permute(0, 2, 3, 1).reshape(batch_size, -1, C).sigmoid()
        y_head_f_i = y_f[1][s].permute(0, 2, 3, 1).reshape(batch_size, -1, C).sigmoid() + y_head_f_i
        y_head_f_i = y_head_f_i.max(1)[0] / 2
        y_pseudo = torch.max(y_pseudo, y_head_f_i)
    y_pseudo[y_pseudo >= 0.5] = 1
    y_pseudo[y_pseudo < 0.5] = 0
    return y_pseudo


@pytest.mark.parametrize("minus", [False, True])
def test_discrepancy_losses_match_l_wave_dis(minus):
    torch.manual_seed(2)
    classes, anchors = 3, 2
    raw1, raw2 = torch.randn(2, anchors * classes, 4, 5), torch.randn(2, anchors * classes, 4, 5)
    w = torch.rand(2, 4 * 5 * anchors, classes)
    flat = InstanceClassifiers(4, anchors, classes, stacked_convs=0)._flat
    got = discrepancy_loss(flat(raw1), flat(raw2), w, 0.5, maximise=minus)
    torch.testing.assert_close(got, _reference_wave_dis(raw1, raw2, w, classes, 0.5, minus))


def test_pseudo_labels_match_get_img_pseudolabel_score():
    torch.manual_seed(3)
    classes, anchors = 4, 1
    flat = InstanceClassifiers(4, anchors, classes, stacked_convs=0)._flat
    raw = [[torch.randn(3, classes, 6, 6) * 2, torch.randn(3, classes, 3, 3) * 2] for _ in "ab"]
    got = pseudo_image_labels([flat(x) for x in raw[0]], [flat(x) for x in raw[1]])
    torch.testing.assert_close(got, _reference_pseudo(raw, 3, classes))


def test_min_step_classifiers_are_frozen_and_max_step_features_are():
    torch.manual_seed(4)
    heads = InstanceClassifiers(4, 1, 2, stacked_convs=1)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    f1, f2 = heads.frozen_classifiers([x])
    plain = heads([x])
    torch.testing.assert_close(f1[0], plain[0][0])
    discrepancy_loss(f1[0], f2[0], torch.ones(1, 25, 2)).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in heads.parameters())


def test_the_hook_trains_on_every_micro_batch_of_a_step():
    """trainer.accumulate=2: each micro-batch's own captured forward (the second read the
    first one's, already backpropagated: 'backward through the graph a second time')."""
    data = synthetic_dataset(8, image_size=64, split="miaod-accumulate")
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    hook = MiaodHook(stacked_convs=1, adversarial=False)
    plan = TrainSchedule(iterations=2, batch_size=4, accumulate=2, lr=0.01, warmup_iters=0)
    train(det, [BatchSource("labelled", data)], plan, 0, True, [hook])
    assert len(hook.losses["det_cls"]) == 4  # 2 steps x 2 micro-batches


SMOKE = ["experiment=smoke", "quiet=true"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["detector=fasterrcnn_mobilenet_v3_large_320_fpn"],
            "strategy=mi_aod (strategy.scorer): needs",
        ),
        (["strategy.scorer.k=0"], "strategy.scorer.k"),
        (["strategy.scorer.reweight=max"], "strategy.scorer.reweight"),
    ],
)
def test_bad_mi_aod_is_one_line_naming_the_key(overrides, needle):
    with pytest.raises(Exception) as err:
        build_experiment(compose_config([*SMOKE, "strategy=mi_aod", *overrides]))
    message = user_error(err.value)
    assert message is not None and needle in message and "\n" not in message, message


def test_scorer_refuses_before_training():
    with pytest.raises(AlrunError, match="have not been trained"):
        MiaodUncertainty()(None)


@pytest.mark.integration
def test_one_mi_aod_round_on_the_smoke_experiment(tmp_path):
    torch.set_num_threads(1)
    rows = run_experiment(compose_config([*SMOKE, "strategy=mi_aod", "budget.rounds=1"]), tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    selection = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert selection["strategy"] == "mi_aod" and selection["scorer"] == "mi_aod"
    scores = [s["score"] for s in selection["selected"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    assert all(s >= 0 for s in scores) and len(set(scores)) > 1
    train = json.loads((tmp_path / "round_00" / "metrics.json").read_text())["train"]
    assert train["mi_aod/final_imgcls"] < train["mi_aod/first_imgcls"]
    assert "mi_aod/final_det_cls" in train
    # the max and min steps ran on an unlabelled batch every iteration; the max step widened
    # the classifiers' discrepancy (its loss is lambda x sum of (1 - gap) x w)
    assert train["mi_aod/unlabelled_steps"] == train["iterations"]
    assert train["mi_aod/final_wave_max"] < train["mi_aod/first_wave_max"]
