"""Extra prediction passes that do not depend on the backend: ensembles and test-time views.

An :class:`Ensemble` holds members 1..K-1 of a K-model ensemble (the run's detector is member 0).
Members are built fresh by the detector's own factory (its config, instantiated again), never
copied from the run's detector: a copy would carry whatever was attached to it (issue 19: a
learned scorer's training hook trained its head on a member's backbone while scoring read the
main model). The engine trains them (``alrun.engine.train_round``): ``independent`` members each
from their own init and batch order, ``snapshot`` members as copies of member 0's weights taken
during its round. :class:`Predictor` is what the loop asks for pool predictions: the detector's
own passes (MC dropout, mixture head), then one pass per test-time view (any detector with the
``image_views`` capability) or per ensemble member (any detector).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from alrun.data.dataset import ImageRef
from alrun.data.images import load_image
from alrun.detectors.base import Detector, ImageViews, Progress
from alrun.detectors.views import apply_view, boxes_to_original, parse_view
from alrun.errors import AlrunError
from alrun.seeding import Purpose
from alrun.types import NOTHING, Detections, Needs

#: ``strategy.scorer.ensemble_kind`` choices
ENSEMBLE_KINDS = ("independent", "snapshot")

#: images per batch of view passes
VIEW_BATCH = 16

#: what every extra pass keeps: probabilities (for the scores), boxes, sources
PASS_NEEDS = Needs(probs=True)


def member_seed(seed: int, member: int) -> int:
    """Member ``member``'s own seed (init and batch order) for a round seeded ``seed``."""
    return int(
        np.random.SeedSequence([seed, int(Purpose.ENSEMBLE_MEMBER), member]).generate_state(1)[0]
        >> 1
    )


def is_member_key(name: str) -> bool:
    """Whether a checkpoint key belongs to an ensemble member (``member<k>.<name>``)."""
    head = name.split(".", 1)[0]
    return head.startswith("member") and head[len("member") :].isdigit()


class Ensemble:
    """Members 1..K-1 of a ``size``-model ensemble, built by ``factory()`` (a fresh detector of
    the run's config); member k starts from ``reset(k)``, as an independent init."""

    def __init__(self, factory: Callable[[], Detector], size: int, kind: str = "independent"):
        if size < 2:
            raise AlrunError(f"strategy.scorer.members: an ensemble needs >= 2 members, got {size}")
        if kind not in ENSEMBLE_KINDS:
            raise AlrunError(
                f"strategy.scorer.ensemble_kind: expected one of {'|'.join(ENSEMBLE_KINDS)}, "
                f"got '{kind}'"
            )
        self.kind = kind
        self.members: list[Detector] = []
        for k in range(1, size):
            member = factory()
            member.reset(k)
            self.members.append(member)

    @property
    def size(self) -> int:
        return len(self.members) + 1

    def snapshot(self, source: Detector, k: int) -> None:
        """Copy ``source``'s current weights into member ``k`` (1..K-1)."""
        self.members[k - 1].load_state_dict(source.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Every member's weights under ``member<k>.`` (beside member 0's in a checkpoint)."""
        state: dict[str, Any] = {}
        for k, member in enumerate(self.members, start=1):
            state.update({f"member{k}.{name}": v for name, v in member.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, member in enumerate(self.members, start=1):
            prefix = f"member{k}."
            part = {n[len(prefix) :]: v for n, v in state.items() if n.startswith(prefix)}
            if part:
                member.load_state_dict(part)


def _plain(det: Detections) -> Detections:
    """``det`` as an extra pass: probabilities kept, no features, embedding or passes."""
    return replace(det, feats=None, embedding=None, passes=())


@dataclass
class Predictor:
    """The run's detector plus the strategy's backend-independent passes (see module doc)."""

    detector: Detector
    ensemble: Ensemble | None = None

    def predict(
        self,
        records: Sequence[ImageRef],
        needs: Needs = NOTHING,
        progress: Progress | None = None,
    ) -> list[Detections]:
        own_needs = replace(needs, augment=(), ensemble=0)
        if self.ensemble is not None and needs.ensemble:
            own_needs = replace(own_needs, passes=1)
        found = self.detector.predict(records, own_needs, progress)
        if needs.augment:
            found = with_views(self.detector, records, found, needs.augment)
        if self.ensemble is not None and needs.ensemble:
            own = [_plain(d) for d in found]
            members = [m.predict(records, PASS_NEEDS) for m in self.ensemble.members]
            found = [
                replace(d, passes=(own[i], *(m[i] for m in members))) for i, d in enumerate(found)
            ]
        return found


def with_views(
    detector: Detector,
    records: Sequence[ImageRef],
    found: list[Detections],
    views: Sequence[str],
) -> list[Detections]:
    """``found`` with one extra pass per test-time view in ``Detections.passes`` (boxes mapped
    back to the original image), from any detector that predicts on image tensors."""
    if not isinstance(detector, ImageViews):
        raise AlrunError(
            f"strategy: test-time views need predictions on image tensors (predict_images), "
            f"which {type(detector).__name__} does not give"
        )
    parsed = [parse_view(v, "needs.augment") for v in views]
    out: list[Detections] = []
    for start in range(0, len(records), VIEW_BATCH):
        chunk = list(records[start : start + VIEW_BATCH])
        images = [load_image(r).to(detector.device) for r in chunk]
        per_view = []
        for view in parsed:
            viewed = [apply_view(t, view, r.image_id) for r, t in zip(chunk, images)]
            dets = detector.predict_images(chunk, viewed, PASS_NEEDS)
            per_view.append(
                [
                    replace(d, boxes=boxes_to_original(d.boxes, view, tuple(t.shape[-2:])))
                    for d, t in zip(dets, images)
                ]
            )
        for i, det in enumerate(found[start : start + VIEW_BATCH]):
            out.append(replace(det, passes=tuple(v[i] for v in per_view)))
    return out
