"""One predict path for every backend: the same refusals, worded once, and the same batches."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.predicting import checked_mc_passes
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.errors import AlrunError
from alrun.types import Needs
from tests.helpers import small_faster_rcnn

PLAIN = {"dropout": False, "mixture": False}


@pytest.fixture(scope="module")
def images():
    return synthetic_dataset(5, image_size=64, split="det-test")


def _fcos(**kw) -> TorchvisionDetector:
    builder = partial(tiny_fcos, image_size=64, score_thresh=0.001)
    return TorchvisionDetector(builder, num_classes=3, device="cpu", **kw)


@pytest.mark.parametrize(
    ("needs", "flags", "message"),
    [
        (Needs(grads=True), PLAIN, "gradient outputs are not implemented"),
        (Needs(passes=3), PLAIN, "3 multi-pass predictions asked without MC dropout"),
        (Needs(passes=4, head_dropout=0.2), PLAIN, "heads have no dropout"),
        (Needs(mixture_density=4), PLAIN, "has no mixture head.*add_mixture_head"),
    ],
)
def test_refusals_are_one_line_naming_what_is_missing(needs, flags, message):
    with pytest.raises(AlrunError, match=message) as err:
        checked_mc_passes(needs, **flags)
    assert "\n" not in str(err.value)


def test_passes_counted_only_with_mc_dropout():
    assert checked_mc_passes(Needs(), **PLAIN) == 0
    assert checked_mc_passes(Needs(passes=1), **PLAIN) == 0
    assert checked_mc_passes(Needs(passes=4, head_dropout=0.2), dropout=True, mixture=False) == 4
    assert checked_mc_passes(Needs(mixture_density=4), dropout=False, mixture=True) == 0


@pytest.mark.parametrize(
    "needs", [Needs(grads=True), Needs(passes=3), Needs(passes=4, head_dropout=0.2)]
)
def test_the_torchvision_backend_refuses_with_the_shared_line(images, needs):
    with pytest.raises(AlrunError) as shared:
        checked_mc_passes(needs, **PLAIN)
    with pytest.raises(AlrunError) as backend:
        _fcos().predict(images.images[:1], needs)
    assert str(backend.value) == str(shared.value)


def test_a_two_stage_model_without_mixture_head_refuses_mixture_density(images):
    """Before one predict path, torchvision's Faster R-CNN silently left ``mdn`` out."""
    det = small_faster_rcnn()
    with pytest.raises(AlrunError, match="has no mixture head"):
        det.predict(images.images[:1], Needs(mixture_density=4))


def test_batches_of_the_detectors_size_with_progress_and_no_gradients(images):
    det = _fcos(predict_batch_size=2)
    forward, chunks, grads = det._forward, [], []

    def watched(records, tensors, *args, **kw):
        chunks.append([r.image_id for r in records])
        grads.append(torch.is_grad_enabled() or det.model.training)
        return forward(records, tensors, *args, **kw)

    det._forward = watched
    det.model.train()
    seen: list[tuple[int, int]] = []
    found = det.predict(images.images, Needs(probs=True), lambda d, t: seen.append((d, t)))
    assert [len(c) for c in chunks] == [2, 2, 1] and not any(grads)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert [d.image_id for d in found] == images.ids
    one_batch = _fcos(predict_batch_size=8)
    one_batch.load_state_dict(det.state_dict())
    for a, b in zip(found, one_batch.predict(images.images, Needs(probs=True))):
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.probs, b.probs)


def test_views_are_the_plain_pass_plus_one_pass_per_view(images):
    det = _fcos()
    plain = det.predict(images.images[:2], Needs(probs=True))
    viewed = det.predict(images.images[:2], Needs(probs=True, augment=("hflip",)))
    for a, b in zip(plain, viewed):
        torch.testing.assert_close(a.boxes, b.boxes)
        assert len(b.passes) == 1 and b.passes[0].probs is not None
