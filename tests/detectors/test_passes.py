"""Backend-independent passes: ensembles built fresh from a factory, test-time views."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.base import TrainSchedule
from alrun.detectors.passes import Ensemble, Predictor, with_views
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.engine import BatchSource, StrategyTraining, train_round
from alrun.errors import AlrunError
from alrun.types import Needs


@pytest.fixture(scope="module")
def images():
    return synthetic_dataset(6, image_size=64, split="det-test")


def _factory():
    builder = partial(tiny_fcos, image_size=64, score_thresh=0.001)
    return TorchvisionDetector(builder, num_classes=4, device="cpu")


def test_ensemble_members_predict_train_and_checkpoint(images):
    det = _factory()
    ensemble = Ensemble(_factory, 3)
    assert len(ensemble.members) == 2 and all(m is not det for m in ensemble.members)
    needs = Needs(probs=True, passes=3, ensemble=3)
    predictor = Predictor(det, ensemble)
    preds = predictor.predict(images.images[:2], needs)
    for p in preds:
        assert len(p.passes) == 3
        torch.testing.assert_close(p.passes[0].boxes, p.boxes)  # member 0 is the model itself
        assert not torch.equal(p.passes[1].probs, p.passes[2].probs)  # own inits
    before = [m.state_dict() for m in ensemble.members]
    schedule = TrainSchedule(iterations=3, batch_size=2, warmup_iters=1)
    stats = train_round(
        det,
        [BatchSource("labelled", images)],
        schedule,
        seed=5,
        round_index=0,
        strategy=StrategyTraining(ensemble=ensemble),
    )
    assert {"member1/final_loss", "member2/final_loss"} <= stats.keys()
    after = [m.state_dict() for m in ensemble.members]
    for b, a in zip(before, after):
        assert any(not torch.equal(b[k], a[k]) for k in b), "members must train"
    # members are stored beside the model and restored into a fresh ensemble
    state = ensemble.state_dict()
    assert any(k.startswith("member2.") for k in state)
    fresh = Ensemble(_factory, 3)
    fresh.load_state_dict(state)
    copy = _factory()
    copy.load_state_dict(det.state_dict())
    trained = predictor.predict(images.images[:2], needs)
    again = Predictor(copy, fresh).predict(images.images[:2], needs)
    for p, q in zip(trained, again):
        for x, y in zip(p.passes, q.passes):
            torch.testing.assert_close(x.boxes, y.boxes)


def test_snapshot_ensemble_takes_checkpoints_of_one_run(images):
    det = _factory()
    ensemble = Ensemble(_factory, 3, "snapshot")
    schedule = TrainSchedule(iterations=6, batch_size=2, warmup_iters=1)
    stats = train_round(
        det,
        [BatchSource("labelled", images)],
        schedule,
        seed=5,
        round_index=0,
        strategy=StrategyTraining(ensemble=ensemble),
    )
    assert stats["snapshot/members"] == 2.0 and "member1/final_loss" not in stats
    final = det.model.state_dict()
    snaps = [m.model.state_dict() for m in ensemble.members]
    weight = "head.classification_head.cls_logits.weight"
    # snapshots after 2 and 4 of 6 iterations: all different from each other and the final
    assert not torch.equal(snaps[0][weight], snaps[1][weight])
    assert not torch.equal(snaps[1][weight], final[weight])


def test_bad_ensembles_are_one_line_errors():
    with pytest.raises(AlrunError, match="members: an ensemble needs >= 2"):
        Ensemble(_factory, 1)
    with pytest.raises(AlrunError, match="ensemble_kind: expected one of independent|snapshot"):
        Ensemble(_factory, 2, "bagged")


def test_views_work_for_any_detector_that_predicts_on_tensors(images):
    """The views wrapper only needs ``predict_images``: the same boxes as the detector's own
    forward on the flipped image, mapped back."""
    det = _factory()
    records = images.images[:2]
    plain = det.predict(records, Needs(probs=True))
    viewed = with_views(det, records, plain, ("hflip",))
    from alrun.data.images import load_image
    from alrun.detectors.views import boxes_to_original, parse_view

    flipped = det.predict_images(records[:1], [load_image(records[0]).flip(-1)], Needs())
    size = tuple(load_image(records[0]).shape[-2:])
    mapped = boxes_to_original(flipped[0].boxes, parse_view("hflip"), size)
    torch.testing.assert_close(viewed[0].passes[0].boxes, mapped, atol=1e-4, rtol=1e-4)

    class NoTensors:  # a detector that only predicts from records
        device = torch.device("cpu")

    with pytest.raises(AlrunError, match="test-time views need predictions on image tensors"):
        with_views(NoTensors(), records, plain, ("hflip",))
