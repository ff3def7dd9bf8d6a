"""The simulated oracle: labels from ground truth, cost in annotation seconds.

Default times (overridable in configs/oracle/*.yaml, which cite the sources):
box drawing 25.5 s median per box (Su et al. 2012); click-anywhere 2.4 s for the first class +
0.9 s per additional class (Bearman et al. 2016); center click 1.87 s per object (Papadopoulos et
al. 2017, "Training object class detectors with click supervision"); extreme clicking 7.0 s per
box (Papadopoulos et al. 2017); box verification 1.6 s per box (Papadopoulos et al. 2016);
image-level label 1.0 s per class (Papadopoulos et al. 2016); box-level queries
(``partial``) per region asked, :mod:`alrun.regions`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from alrun.data.dataset import DatasetSplits, ImageRecord, ImageRef
from alrun.errors import AlrunError
from alrun.params import NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat
from alrun.regions import RegionAnswers, answer_regions, query_charges
from alrun.truth import TruthAudit, pairwise_iou
from alrun.types import LABEL_KINDS, ImageLabels

__all__ = ["LABEL_KINDS", "CostModel", "ImageLabels", "SimulatedOracle"]


@dataclass(frozen=True)
class CostModel:
    """Seconds an annotator spends per image for each label kind."""

    box_s: PositiveFloat = 25.5
    extreme_s: PositiveFloat = 7.0
    click_first_class_s: PositiveFloat = 2.4
    click_extra_class_s: NonNegativeFloat = 0.9
    center_click_s: PositiveFloat = 1.87
    verify_s: PositiveFloat = 1.6
    image_label_per_class_s: PositiveFloat = 1.0
    empty_image_s: PositiveFloat = 1.0  # looking at an image and finding nothing to draw

    def cost(self, record: ImageRecord, kind: str) -> float:
        n = record.num_boxes
        n_classes = len(set(record.labels.tolist()))
        if kind == "box":
            return n * self.box_s if n else self.empty_image_s
        if kind == "extreme":
            return n * self.extreme_s if n else self.empty_image_s
        if kind == "center_click":
            return n * self.center_click_s if n else self.empty_image_s
        if kind == "click":
            if not n_classes:
                return self.empty_image_s
            return self.click_first_class_s + (n_classes - 1) * self.click_extra_class_s
        if kind == "verify":
            return n * self.verify_s if n else self.empty_image_s
        if kind == "image_label":
            return max(n_classes, 1) * self.image_label_per_class_s
        if kind == "partial":
            raise AlrunError(
                "oracle: 'partial' labels are priced per region asked (box-level queries, "
                "alrun.regions), not per image; they need a box-query strategy (strategy=compas)"
            )
        raise AlrunError(f"oracle.kind: expected one of {LABEL_KINDS}, got '{kind}'")

    def verify_cost(self, num_proposals: int) -> float:
        """Seconds to accept or reject ``num_proposals`` predicted boxes."""
        return num_proposals * self.verify_s if num_proposals else self.empty_image_s


class SimulatedOracle:
    """Answers label requests from ground truth and charges the cost model's seconds.

    ``kind``: ``null`` (default) produces whatever kind the supervision regime asks for; a kind
    restricts the simulated annotator to that one, and a regime that asks for another kind is a
    start-up error (see :meth:`require`). Random parts of an answer (where a click lands, where
    an extreme point sits on a box side, jitter) are drawn from ``(seed, image id, kind)``, so the
    same image gets the same answer whatever the order or round it is asked in.

    * ``click``: one click per object, uniform inside its box (Bearman et al.'s click-anywhere),
      or inside the central ``click_region`` fraction of its width and height;
    * ``center_click``: the box center plus Gaussian jitter of ``center_jitter_px``, kept inside
      the box;
    * ``extreme``: the four extreme points, each at a uniform position along its box side plus
      Gaussian jitter of ``extreme_jitter_px`` (0 recovers the box exactly), clipped to the image;
    * ``verify``: each proposed box is accepted when its IoU with a ground-truth box of the same
      class is >= ``verify_iou``; billed per proposal (``verify_s``, or ``empty_image_s`` when
      there is none). Needs ``proposals`` from the caller (e.g. the detector's predictions);
    * ``image_label``: the classes present;
    * ``partial``: the true boxes of the regions asked about (``queries`` from the caller: image
      id -> (boxes, labels) in rank order), matched at IoU >= ``match_iou`` (BLAD's 0.25) and
      billed per query (:mod:`alrun.regions`; confirming uses ``verify_iou``).
    """

    def __init__(
        self,
        cost_model: CostModel,
        kind: Literal[LABEL_KINDS] | None = None,
        seed: NonNegativeInt = 0,
        verify_iou: OpenFraction = 0.5,
        center_jitter_px: NonNegativeFloat = 0.0,
        extreme_jitter_px: NonNegativeFloat = 0.0,
        click_region: OpenFraction = 1.0,
        match_iou: OpenFraction = 0.25,
    ):
        if kind is not None and kind not in LABEL_KINDS:
            raise AlrunError(f"oracle.kind: expected null or one of {LABEL_KINDS}, got '{kind}'")
        if not 0.0 < verify_iou <= 1.0:
            raise AlrunError(f"oracle.verify_iou: expected a value in (0, 1], got {verify_iou}")
        for key, value in (
            ("center_jitter_px", center_jitter_px),
            ("extreme_jitter_px", extreme_jitter_px),
        ):
            if value < 0:
                raise AlrunError(f"oracle.{key}: expected >= 0, got {value}")
        if not 0.0 < click_region <= 1.0:
            raise AlrunError(f"oracle.click_region: expected a value in (0, 1], got {click_region}")
        if not 0.0 < match_iou <= 1.0:
            raise AlrunError(f"oracle.match_iou: expected a value in (0, 1], got {match_iou}")
        self.match_iou = float(match_iou)
        self.cost_model = cost_model
        self.kind = kind
        self.seed = int(seed)
        self.verify_iou = float(verify_iou)
        self.center_jitter_px = float(center_jitter_px)
        self.extreme_jitter_px = float(extreme_jitter_px)
        self.click_region = float(click_region)
        self._truth: Mapping[str, ImageRecord] = {}

    def hold_truth(self, truth: Mapping[str, ImageRecord]) -> None:
        """Hand the oracle the hidden ground truth (image id -> record) it answers and prices
        requests from; ``build_experiment`` does, once the dataset is read."""
        self._truth = truth

    def truth_of(self, image: ImageRef | ImageRecord) -> ImageRecord:
        """The ground truth of ``image``: from the truth held, or ``image`` itself when the
        caller holds the truth (an :class:`ImageRecord` of an image the oracle was not given)."""
        if image.image_id in self._truth:
            return self._truth[image.image_id]
        if isinstance(image, ImageRecord):
            return image
        raise AlrunError(
            f"oracle: no ground truth for image '{image.image_id}'; the oracle answers from "
            "the truth handed to it (SimulatedOracle.hold_truth)"
        )

    @property
    def audit(self) -> TruthAudit:
        """Counts of how regimes' boxes match the truth held (diagnostics; never the truth)."""
        return TruthAudit(self._truth)

    def objects(self, image: ImageRef | ImageRecord) -> int:
        """Ground-truth objects of ``image``: what a box budget counts (a simulation's price)."""
        return self.truth_of(image).num_boxes

    @property
    def kinds(self) -> tuple[str, ...]:
        """The label kinds this oracle can produce."""
        return (self.kind,) if self.kind is not None else LABEL_KINDS

    def check_data(self, splits: DatasetSplits) -> None:
        """Start-up check against the dataset (the recorded oracle checks its file here); a
        simulated oracle answers from the dataset itself."""

    def require(self, kinds: Sequence[str], who: str) -> None:
        """Start-up check: ``who`` (a config group) may ask for each of ``kinds``."""
        for kind in kinds:
            if kind not in LABEL_KINDS:
                raise AlrunError(f"{who}: asks for unknown label kind '{kind}' ({LABEL_KINDS})")
            if kind not in self.kinds:
                raise AlrunError(
                    f"{who}: asks the oracle for '{kind}' labels but oracle.kind={self.kind} "
                    f"only produces '{self.kind}'; set oracle.kind=null or a regime that asks "
                    f"for '{self.kind}'"
                )

    def _kind(self, kind: str | None) -> str:
        kind = kind or self.kind or "box"
        self.require([kind], "oracle.annotate")
        return kind

    def cost(self, record: ImageRef | ImageRecord, kind: str | None = None) -> float:
        """Seconds to label ``record`` with ``kind`` (for ``verify``: one proposal per object)."""
        return self.cost_model.cost(self.truth_of(record), self._kind(kind))

    def _regions(self, record: ImageRecord, boxes, labels, answered=None) -> RegionAnswers:
        return answer_regions(
            boxes,
            labels,
            record.boxes,
            record.labels,
            self.match_iou,
            self.verify_iou,
            self.cost_model.verify_s,
            self.cost_model.box_s,
            answered,
        )

    def region_charges(
        self,
        image: ImageRef | ImageRecord,
        boxes,
        labels,
        unit: str,
        charge: str = "answered",
        answered: np.ndarray | None = None,
    ) -> np.ndarray:
        """What each query (``boxes`` in rank order) costs in budget ``unit``: a simulation's
        price, like :meth:`objects`; the answers themselves are sold by :meth:`annotate`.
        ``answered``: the image's boxes answered in earlier rounds (not answered again)."""
        self.require(["partial"], "oracle.region_charges")
        found = self._regions(self.truth_of(image), boxes, labels, answered)
        return query_charges(found, unit, charge)

    def annotate(
        self,
        records: Sequence[ImageRef | ImageRecord],
        kind: str | None = None,
        proposals: Mapping[str, Any] | None = None,
        queries: Mapping[str, tuple[Any, Any]] | None = None,
        answered: Mapping[str, np.ndarray] | None = None,
    ) -> list[ImageLabels]:
        """Labels of ``kind`` (default: ``oracle.kind``, else ``box``) for each record.

        ``proposals`` maps image id -> anything with ``boxes`` (N, 4) and ``labels`` (N,)
        (e.g. :class:`~alrun.types.Detections`); required for ``verify``. ``queries`` maps
        image id -> (boxes (Q, 4), labels (Q,)) of the regions asked, in rank order; required
        for ``partial``; ``answered``: image id -> boxes answered in earlier rounds, which the
        annotator does not answer again (an image asked a second time).
        """
        kind = self._kind(kind)
        if kind == "verify" and proposals is None:
            raise AlrunError("oracle.annotate: 'verify' labels need proposals (predicted boxes)")
        if kind == "partial":
            if queries is None:
                raise AlrunError("oracle.annotate: 'partial' labels need queries (regions asked)")
            answered = answered or {}
            return [
                self._partial(self.truth_of(r), queries, answered.get(r.image_id)) for r in records
            ]
        return [self._answer(self.truth_of(r), kind, proposals) for r in records]

    def _partial(self, record: ImageRecord, queries: Mapping[str, tuple[Any, Any]], answered):
        if record.image_id not in queries:
            raise AlrunError(f"oracle.annotate: no queries for image '{record.image_id}'")
        q_boxes, q_labels = queries[record.image_id]
        q_boxes = np.asarray(_numpy(q_boxes), np.float32).reshape(-1, 4)
        q_labels = np.asarray(_numpy(q_labels), np.int64).reshape(-1)
        found = self._regions(record, q_boxes, q_labels, answered)
        hit = found.answers[found.answers >= 0]
        index = np.full(len(found.answers), -1, np.int64)
        index[found.answers >= 0] = np.arange(len(hit))
        return ImageLabels(
            record.image_id,
            "partial",
            record.boxes.astype(np.float32).reshape(-1, 4)[hit].copy(),
            record.labels[hit].astype(np.int64),
            float(np.sum(found.seconds)),
            queries=q_boxes,
            query_labels=q_labels,
            answers=index,
        )

    def _answer(self, record: ImageRecord, kind: str, proposals) -> ImageLabels:
        rng = np.random.default_rng(
            [self.seed, zlib.crc32(record.image_id.encode()), LABEL_KINDS.index(kind)]
        )
        boxes, labels = record.boxes.astype(np.float32).reshape(-1, 4), record.labels.copy()
        cost = self.cost_model.cost(record, kind)
        no_boxes = np.zeros((0, 4), np.float32)
        if kind == "box":
            return ImageLabels(record.image_id, kind, boxes.copy(), labels, cost)
        if kind in ("click", "center_click"):
            points = _clicks(boxes, kind, self.center_jitter_px, rng, self.click_region)
            return ImageLabels(record.image_id, kind, no_boxes, labels, cost, points=points)
        if kind == "extreme":
            extreme = _extreme_points(
                boxes, record.width, record.height, self.extreme_jitter_px, rng
            )
            tight = np.concatenate([extreme.min(axis=1), extreme.max(axis=1)], axis=1)
            return ImageLabels(
                record.image_id,
                kind,
                tight.astype(np.float32),
                labels,
                cost,
                extreme_points=extreme,
            )
        if kind == "image_label":
            classes = np.unique(labels).astype(np.int64)
            return ImageLabels(
                record.image_id, kind, no_boxes, np.zeros(0, np.int64), cost, image_classes=classes
            )
        # verify
        found = proposals.get(record.image_id)
        if found is None:
            raise AlrunError(f"oracle.annotate: no proposals for image '{record.image_id}'")
        p_boxes = np.asarray(_numpy(found.boxes), dtype=np.float32).reshape(-1, 4)
        p_labels = np.asarray(_numpy(found.labels), dtype=np.int64).reshape(-1)
        iou = pairwise_iou(p_boxes, boxes)
        same_class = p_labels[:, None] == labels[None, :]
        accepted = (np.where(same_class, iou, 0.0) >= self.verify_iou).any(axis=1)
        return ImageLabels(
            record.image_id,
            kind,
            p_boxes,
            p_labels,
            self.cost_model.verify_cost(len(p_boxes)),
            verified=accepted,
        )


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _clicks(
    boxes: np.ndarray, kind: str, jitter: float, rng: np.random.Generator, region: float = 1.0
) -> np.ndarray:
    x1, y1, x2, y2 = boxes.T
    if kind == "click":
        u = 0.5 + (rng.random((len(boxes), 2)) - 0.5) * region  # central fraction of the box
        points = np.stack([x1 + u[:, 0] * (x2 - x1), y1 + u[:, 1] * (y2 - y1)], axis=1)
    else:
        center = np.stack([(x1 + x2) / 2, (y1 + y2) / 2], axis=1)
        points = center + (rng.normal(0.0, jitter, center.shape) if jitter > 0 else 0.0)
        points = np.clip(points, boxes[:, :2], boxes[:, 2:])
    return points.astype(np.float32).reshape(-1, 2)


def _extreme_points(
    boxes: np.ndarray, width: int, height: int, jitter: float, rng: np.random.Generator
) -> np.ndarray:
    """(N, 4, 2): left, top, right, bottom points, each somewhere along its box side."""
    x1, y1, x2, y2 = boxes.T
    u = rng.random((len(boxes), 4))
    points = np.stack(
        [
            np.stack([x1, y1 + u[:, 0] * (y2 - y1)], axis=1),
            np.stack([x1 + u[:, 1] * (x2 - x1), y1], axis=1),
            np.stack([x2, y1 + u[:, 2] * (y2 - y1)], axis=1),
            np.stack([x1 + u[:, 3] * (x2 - x1), y2], axis=1),
        ],
        axis=1,
    ).reshape(-1, 4, 2)
    if jitter > 0:
        points = points + rng.normal(0.0, jitter, points.shape)
    points[..., 0] = np.clip(points[..., 0], 0, width)
    points[..., 1] = np.clip(points[..., 1], 0, height)
    return points.astype(np.float32)
