"""Learned scorers: each head trains with the tiny detector and its loss decreases."""

from functools import partial

import pytest
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.learned import (
    FalseNegativePrediction,
    LossPrediction,
    PerLevelHead,
    margin_ranking,
    missed_counts,
)
from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.base import TrainSchedule
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.engine import BatchSource, train
from alrun.errors import AlrunError
from alrun.types import Needs


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(16, image_size=64, split="learned-heads")


def detector():
    return TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")


def schedule(iterations, grad_clip=10.0):
    return TrainSchedule(
        iterations=iterations, batch_size=8, lr=0.01, warmup_iters=2, grad_clip=grad_clip
    )


def test_margin_ranking_loss_values():
    """alrun's earlier pairing (``pairs=halves``): (i, i + B/2), sign of the target gap."""
    pred = torch.tensor([2.0, 0.0, 0.0, 0.5])
    target = torch.tensor([5.0, 1.0, 1.0, 3.0])
    # pairs (0, 2): right order by 2 >= margin -> 0; (1, 3): right order but only by 0.5 -> 0.5
    assert float(margin_ranking(pred, target, 1.0, "halves")) == pytest.approx(0.25)
    # reversed predictions: (2 + 1) and (0.5 + 1)
    assert float(margin_ranking(-pred, target, 1.0, "halves")) == pytest.approx(2.25)
    assert margin_ranking(pred[:1], target[:1], 1.0) is None


def test_margin_ranking_parity_with_the_reference_loss_pred_loss():
    """Mephisto405/Learning-Loss-for-Active-Learning main.py LossPredLoss: pairs (i, B-1-i),
    one = 2 sign(clamp(l_i - l_j, 0)) - 1. On the inputs above: pairs (0, 3): target gap 2 ->
    +1, prediction gap 1.5 >= margin -> 0; (1, 2): tie -> -1, prediction gap 0 -> 1: mean 0.5.
    Reversed predictions: 1 + 1.5 = 2.5 and 1: mean 1.75."""
    pred = torch.tensor([2.0, 0.0, 0.0, 0.5])
    target = torch.tensor([5.0, 1.0, 1.0, 3.0])
    assert float(margin_ranking(pred, target, 1.0)) == pytest.approx(0.5)
    assert float(margin_ranking(-pred, target, 1.0)) == pytest.approx(1.75)
    grad = torch.tensor([2.0, 0.0, 0.0, 0.5], requires_grad=True)
    margin_ranking(grad, target.clone().requires_grad_(), 1.0).backward()  # targets detached
    assert grad.grad.tolist() == pytest.approx([0.0, 0.5, -0.5, 0.0])


def test_per_level_head_is_the_reference_loss_net():
    """LossNet (models/lossnet.py): per level GAP -> FC(128) -> ReLU, concatenated -> FC(1)."""
    head = PerLevelHead([2, 3], hidden=128)
    assert [tuple(fc.weight.shape) for fc in head.levels] == [(128, 2), (128, 3)]
    assert tuple(head.out.weight.shape) == (1, 256)
    x = torch.randn(5, 5)
    expected = head.out(
        torch.cat([torch.relu(head.levels[0](x[:, :2])), torch.relu(head.levels[1](x[:, 2:]))], 1)
    )
    torch.testing.assert_close(head(x), expected)


def test_missed_counts_greedy_same_class():
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 1]),
        }
    ]
    targets = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]),
            "labels": torch.tensor([0, 0, 1]),
        }
    ]
    # one class-0 detection matches one of the two class-0 boxes; the class-1 box is elsewhere
    assert missed_counts(dets, targets, 0.5).tolist() == [2.0]
    assert missed_counts(dets, targets, 0.95).tolist() == [3.0]


def test_loss_prediction_head_trains_with_the_detector_and_its_loss_decreases(data):
    det = detector()
    scorer = LossPrediction(hidden=32)
    hooks = scorer.training_hooks  # what the loop hands the regime, and it the engine
    stats = train(det, [BatchSource("labelled", data)], schedule(40), 0, True, hooks)
    assert stats["loss_prediction/updates"] == 40
    assert stats["loss_prediction/final_loss"] < stats["loss_prediction/first_loss"]
    assert any(k.startswith("loss_prediction/") for k in stats)
    preds = det.predict(data.images[:6], Needs(embedding=True))
    batch = PredictionBatch.from_detections(preds)
    scores = scorer(AcquisitionContext(batch.image_ids, 0, 0, preds=batch))
    assert set(scores) == set(batch.image_ids)
    assert len(set(scores.values())) > 1  # a function of the image, not a constant


def test_loss_prediction_trains_on_every_micro_batch_of_a_step(data):
    """trainer.accumulate=2: each micro-batch's own backbone forward (the second read the first
    one's, already backpropagated: 'backward through the graph a second time')."""
    scorer = LossPrediction(hidden=8)
    plan = TrainSchedule(iterations=2, batch_size=8, accumulate=2, lr=0.01, warmup_iters=0)
    stats = train(detector(), [BatchSource("labelled", data)], plan, 0, True, scorer.training_hooks)
    assert stats["loss_prediction/updates"] == 4


def test_loss_prediction_leaves_the_detector_weights_alone_when_detached(data):
    """``detach_after=0`` (alrun's earlier choice): detached features + restored BatchNorm
    statistics, and without gradient clipping the detector trains exactly as without it."""
    plain, with_head = detector(), detector()
    hooks = LossPrediction(hidden=16, detach_after=0.0).training_hooks
    sources = [BatchSource("labelled", data)]
    train(plain, sources, schedule(6, grad_clip=0.0), seed=1, from_scratch=True)
    stats = train(
        with_head, sources, schedule(6, grad_clip=0.0), seed=1, from_scratch=True, hooks=hooks
    )
    assert stats["loss_prediction/steps_with_gradient"] == 0
    for p, q in zip(plain.model.state_dict().values(), with_head.model.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-5)


def test_loss_prediction_gradient_reaches_the_backbone_for_the_first_60_percent(data):
    """The reference (main.py train_epoch) lets the module's gradient into the backbone until
    epoch 120 of 200: here 3 of 5 iterations; the detector then trains differently."""
    plain, with_head = detector(), detector()
    hooks = LossPrediction(hidden=16).training_hooks
    sources = [BatchSource("labelled", data)]
    train(plain, sources, schedule(5, grad_clip=0.0), seed=1, from_scratch=True)
    stats = train(
        with_head, sources, schedule(5, grad_clip=0.0), seed=1, from_scratch=True, hooks=hooks
    )
    assert stats["loss_prediction/steps_with_gradient"] == 3
    backbone = [k for k in plain.model.state_dict() if k.startswith("backbone.")]
    moved = [
        k
        for k in backbone
        if not torch.allclose(
            plain.model.state_dict()[k].float(), with_head.model.state_dict()[k].float(), atol=1e-5
        )
    ]
    assert moved  # the ranking loss trained the backbone too


def test_loss_prediction_ranks_a_seeded_random_subset(data):
    """config.py SUBSET: the reference ranks a random 10,000 of the pool each cycle; here 3 of 6,
    the same 3 for the same (seed, round), others for another round."""
    det = detector()
    scorer = LossPrediction(hidden=16, subset=3)
    hooks = scorer.training_hooks
    train(det, [BatchSource("labelled", data)], schedule(2), seed=0, from_scratch=True, hooks=hooks)
    batch = PredictionBatch.from_detections(det.predict(data.images[:6], Needs(embedding=True)))
    first = scorer(AcquisitionContext(batch.image_ids, 0, 0, preds=batch))
    assert len(first) == 3 and set(first) <= set(batch.image_ids)
    assert first == scorer(AcquisitionContext(batch.image_ids, 0, 0, preds=batch))
    others = [set(scorer(AcquisitionContext(batch.image_ids, 0, r, preds=batch))) for r in range(6)]
    assert len({frozenset(o) for o in others}) > 1
    whole = LossPrediction(hidden=16, subset=None)
    whole.hook.head = scorer.hook.head
    assert len(whole(AcquisitionContext(batch.image_ids, 0, 0, preds=batch))) == 6


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(head="mlp"), "strategy.scorer.head: expected one of"),
        (dict(detach_after=1.5), "strategy.scorer.detach_after: expected a fraction"),
        (dict(subset=0), "strategy.scorer.subset: expected >= 1 or null"),
        (dict(pairs="random"), "strategy.scorer.pairs: expected one of"),
    ],
)
def test_bad_loss_prediction_options_are_one_line(settings, message):
    with pytest.raises(AlrunError, match=message):
        LossPrediction(**settings)


def test_false_negative_head_fits_missed_counts_and_scores_the_pool(data):
    det = detector()
    scorer = FalseNegativePrediction(hidden=32, fit_steps=150, score_threshold=0.3)
    hooks = scorer.training_hooks
    stats = train(det, [BatchSource("labelled", data)], schedule(20), 0, True, hooks)
    assert stats["fn_prediction/images"] == 16
    assert stats["fn_prediction/mean_missed"] > 0  # an undertrained detector misses objects
    assert stats["fn_prediction/final_loss"] < 0.5 * stats["fn_prediction/first_loss"]
    preds = det.predict(data.images, Needs(embedding=True))
    batch = PredictionBatch.from_detections(preds)
    scores = scorer(AcquisitionContext(batch.image_ids, 0, 0, preds=batch))
    assert all(v >= 0 for v in scores.values())


def test_false_negative_head_is_fitted_on_every_micro_batch_of_a_step(data):
    """trainer.accumulate=2: both micro-batches' images (2 ranks gather theirs the same way)."""
    scorer = FalseNegativePrediction(hidden=8, fit_steps=1)
    plan = TrainSchedule(iterations=1, batch_size=8, accumulate=2, lr=0.01, warmup_iters=0)
    stats = train(detector(), [BatchSource("labelled", data)], plan, 0, True, scorer.training_hooks)
    assert stats["fn_prediction/images"] == 8


def test_untrained_head_is_a_clear_error():
    ctx = AcquisitionContext(("a",), 0, 0)
    with pytest.raises(AlrunError, match="not been trained"):
        LossPrediction()(ctx)


@pytest.mark.integration
def test_loss_prediction_trains_on_a_detector_with_1x1_batchnorm_maps(data):
    """SSDlite's extra layers end in 1x1 maps with BatchNorm: the per-image loss forwards
    (one image each) used to fail with 'Expected more than 1 value per channel'."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    builder = partial(ssdlite320_mobilenet_v3_large, weights=None, weights_backbone=None)
    det = TorchvisionDetector(builder, num_classes=4, device="cpu")
    hooks = LossPrediction(hidden=16).training_hooks
    stats = train(det, [BatchSource("labelled", data)], schedule(2), 0, True, hooks)
    assert stats["loss_prediction/updates"] == 2
