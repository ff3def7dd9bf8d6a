"""LabelPool: which pool images are labelled, in which round, with which labels.

``labelled_round[i]`` is -1 for unlabelled images and r >= 0 for images first trained on in
round r (the initial set is round 0). DESIGN.md used 0 for "unlabelled", but round 0 is a real
round here, so -1 keeps the integer equal to the round number.

A partly labelled image (``partial``, box-level queries) may be asked again in a later round:
its new answers merge into its label (:func:`alrun.regions.merge_partial`), each query keeps
the round it was asked for (``query_rounds``), and the image keeps its first round here.

The pool holds no ground truth: its images are :class:`~alrun.data.dataset.ImageRef` and its
boxes are the labels bought (``labels``). What the oracle and the evaluator hold is in
:mod:`alrun.truth`; ``audit`` lets regimes measure their pseudo-boxes against it (counts only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from alrun.data.dataset import DetectionDataset, ImageRecord, ImageRef, ImageSet
from alrun.errors import AlrunError
from alrun.regions import merge_partial
from alrun.types import LABEL_KINDS, ImageLabels

if TYPE_CHECKING:
    from alrun.truth import TruthAudit


class LabelPool:
    """``dataset``: the pool's images; a :class:`DetectionDataset` is stripped of its ground
    truth here (only :class:`ImageRef` are kept). ``audit``: the evaluator's measure of
    pseudo-boxes against the hidden truth, for regimes' diagnostics (None: not measured)."""

    def __init__(self, dataset: DetectionDataset | ImageSet, audit: TruthAudit | None = None):
        if isinstance(dataset, DetectionDataset):
            dataset = dataset.visible()
        self.dataset: ImageSet = dataset
        self.audit = audit
        self.index = {image_id: i for i, image_id in enumerate(dataset.ids)}
        self.labelled_round = np.full(len(dataset), -1, dtype=np.int64)
        self.labels: dict[str, ImageLabels] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def unlabelled_ids(self) -> list[str]:
        return [self.dataset.images[i].image_id for i in np.flatnonzero(self.labelled_round < 0)]

    @property
    def partial_ids(self) -> list[str]:
        """Labelled images labelled only in the regions asked (``partial``), pool order."""
        return [i for i in self.labelled_ids if self.labels[i].kind == "partial"]

    def box_query_ids(self) -> list[str]:
        """What box-level queries may ask about: unlabelled and partly labelled images."""
        return [
            image.image_id
            for i, image in enumerate(self.dataset.images)
            if self.labelled_round[i] < 0 or self.labels[image.image_id].kind == "partial"
        ]

    @property
    def labelled_ids(self) -> list[str]:
        return [self.dataset.images[i].image_id for i in np.flatnonzero(self.labelled_round >= 0)]

    def record(self, image_id: str) -> ImageRef:
        return self.dataset.images[self.index[image_id]]

    def records(self, image_ids: Iterable[str]) -> list[ImageRef]:
        return [self.record(i) for i in image_ids]

    def add(self, labels: Iterable[ImageLabels], round_index: int) -> None:
        """``labels`` first trained on in round ``round_index``; a ``partial`` label on a partly
        labelled image merges into it; any other second label is refused."""
        for item in labels:
            i = self.index[item.image_id]
            if item.kind == "partial" and item.query_rounds is None:
                item = replace(item, query_rounds=np.full(len(item.answers), round_index))
            if self.labelled_round[i] >= 0:
                old = self.labels[item.image_id]
                if not (old.kind == item.kind == "partial"):
                    raise AlrunError(f"image '{item.image_id}' is already labelled")
                self.labels[item.image_id] = merge_partial(old, item)
                continue
            self.labelled_round[i] = round_index
            self.labels[item.image_id] = item

    def selections(self) -> tuple[tuple[str, ...], ...]:
        """Ids picked after each earlier round (labelled in round r >= 1), oldest first."""
        last = int(self.labelled_round.max(initial=0))
        return tuple(
            tuple(self.dataset.images[i].image_id for i in np.flatnonzero(self.labelled_round == r))
            for r in range(1, last + 1)
        )

    def training_set(self) -> DetectionDataset:
        """The labelled images whose labels give boxes, with those boxes (not the hidden ground
        truth): box and extreme labels, and the accepted boxes of verified images. Images labelled
        with clicks or image-level classes are left out: a regime turns them into boxes first."""
        return self._dataset(only_with_boxes=True)

    def labelled_set(self) -> DetectionDataset:
        """Every labelled image; those whose label kind gives no boxes have none."""
        return self._dataset(only_with_boxes=False)

    def _dataset(self, only_with_boxes: bool) -> DetectionDataset:
        records = []
        for image_id in self.labelled_ids:
            rec, lab = self.record(image_id), self.labels[image_id]
            targets = lab.box_targets()
            if targets is None and only_with_boxes:
                continue
            boxes, labels = targets or (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
            records.append(
                ImageRecord(
                    rec.image_id, rec.file, rec.width, rec.height, boxes, labels, rec.domain
                )
            )
        return DetectionDataset(
            f"{self.dataset.name}:labelled", self.dataset.classes, tuple(records)
        )

    def describe(self, image_id: str) -> dict[str, object]:
        """JSON fields recording how a labelled image was labelled (for labelled.json)."""
        lab = self.labels[image_id]
        extra = lab.to_json()  # the kind's own fields: points, extreme points, verified flags...
        for key in ("image_id", "kind", "boxes", "labels", "cost_s"):
            if not (key == "labels" and lab.kind in ("click", "center_click")):
                extra.pop(key)  # clicks have no COCO annotation: their classes stay here
        return {
            "label_kind": lab.kind,
            "round": int(self.labelled_round[self.index[image_id]]),
            "cost_s": lab.cost_s,
            **extra,
        }

    def totals(self) -> dict[str, float]:
        """Labels bought so far: images, ``boxes`` (drawn, recovered from extreme points or
        answered to box-level queries), ``queries`` (regions asked), ``images_reasked``
        (partly labelled images asked in more than one round),
        ``clicks``, ``verified`` (proposals answered) and ``accepted``, ``image_classes``, seconds,
        and ``images_<kind>`` for every label kind."""
        labs = list(self.labels.values())
        verified = [x.verified for x in labs if x.kind == "verify" and x.verified is not None]
        totals: dict[str, float] = {
            "images": len(labs),
            "boxes": int(
                sum(len(x.labels) for x in labs if x.kind in ("box", "extreme", "partial"))
            ),
            "queries": int(sum(len(x.queries) for x in labs if x.queries is not None)),
            "images_reasked": sum(
                1 for x in labs if x.query_rounds is not None and len(set(x.query_rounds)) > 1
            ),
            "clicks": int(sum(len(x.labels) for x in labs if x.kind in ("click", "center_click"))),
            "verified": int(sum(len(v) for v in verified)),
            "accepted": int(sum(int(v.sum()) for v in verified)),
            "image_classes": int(
                sum(len(x.image_classes) for x in labs if x.image_classes is not None)
            ),
            # exactly rounded, so independent of the order labels were added (a resumed pool
            # is rebuilt in another order than the uninterrupted one was bought)
            "cost_s": math.fsum(x.cost_s for x in labs),
        }
        for kind in LABEL_KINDS:
            totals[f"images_{kind}"] = sum(1 for x in labs if x.kind == kind)
        return totals
