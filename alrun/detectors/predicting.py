"""What every backend's ``predict`` does the same way, so it is written (and worded) once:
refuse what the model cannot give before any image is read, then predict in batches of loaded
images. The backend brings only its forward pass (``forward(records, tensors)``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor, nn

from alrun.data.dataset import ImageRecord
from alrun.data.images import load_image
from alrun.detectors.base import Progress
from alrun.detectors.passes import with_views
from alrun.errors import AlrunError
from alrun.types import Detections, Needs

#: a backend's forward pass on one batch: (records, their loaded image tensors) -> detections
Forward = Callable[[Sequence[ImageRecord], list[Tensor]], list[Detections]]


class BatchPredictor(Protocol):
    """What :func:`predict_in_batches` uses of a backend's detector."""

    model: nn.Module
    device: torch.device
    predict_batch_size: int

    def predict(
        self, images: Sequence[ImageRecord], needs: Needs, progress: Progress | None = None
    ) -> list[Detections]: ...

    def predict_images(
        self, records: Sequence[ImageRecord], images: list[Tensor], needs: Needs
    ) -> list[Detections]: ...


def checked_mc_passes(needs: Needs, *, dropout: bool, mixture: bool) -> int:
    """The MC-dropout passes ``needs`` asks for (0: none), after refusing in one line what a
    detector whose heads have ``dropout`` / a ``mixture`` head cannot give."""
    if needs.grads:
        raise AlrunError("detector: gradient outputs are not implemented by this backend yet")
    if needs.passes > 1 and not needs.head_dropout:
        raise AlrunError(
            f"detector: {needs.passes} multi-pass predictions asked without MC dropout "
            "(needs.head_dropout > 0); ensembles are alrun.detectors.passes.Ensemble"
        )
    passes = needs.passes if needs.head_dropout > 0 else 0
    if passes and not dropout:
        raise AlrunError(
            "detector: MC-dropout passes asked but the heads have no dropout (the strategy sets "
            "it up at start-up through detector.enable_mc_dropout)"
        )
    if needs.mixture_density and not mixture:
        raise AlrunError(
            "detector: mixture-density uncertainties asked but the head has no mixture head "
            "(the strategy sets it up at start-up through detector.add_mixture_head)"
        )
    return passes


def predict_in_batches(
    detector: BatchPredictor,
    images: Sequence[ImageRecord],
    needs: Needs,
    progress: Progress | None,
    forward: Forward,
) -> list[Detections]:
    """``forward`` over ``detector.predict_batch_size`` images at a time, in eval mode and
    without gradients; test-time views (``needs.augment``) are the backend-independent passes
    of :func:`alrun.detectors.passes.with_views` on the plain predictions."""
    if needs.augment:
        plain = detector.predict(images, replace(needs, augment=()), progress)
        return with_views(detector, list(images), plain, needs.augment)
    detector.model.eval()
    records = list(images)
    out: list[Detections] = []
    with torch.no_grad():
        for start in range(0, len(records), detector.predict_batch_size):
            chunk = records[start : start + detector.predict_batch_size]
            out.extend(forward(chunk, [load_image(r).to(detector.device) for r in chunk]))
            if progress:
                progress(len(out), len(records))
    return out
