"""Core value types shared by detectors, strategies and the loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Needs:
    """What a strategy asks the detector to compute, so the loop computes only that.

    ``passes`` > 1 asks for stochastic passes (MC dropout / ensemble members) stored in
    ``Detections.passes``; ``augment`` names test-time views (e.g. ``("hflip",)``).
    ``labelled_embeddings`` asks the loop to also embed the labelled set (diversity selectors
    that start from it, e.g. k-center greedy).
    """

    detections: bool = True
    probs: bool = False
    feats: bool = False
    embedding: bool = False
    passes: int = 1
    augment: tuple[str, ...] = ()
    grads: bool = False
    labelled_embeddings: bool = False
    labelled_detections: bool = False  # predictions on the labelled set + its boxes (PPAL, FN)
    # MC dropout: > 0 asks for ``passes`` stochastic passes with dropout of this p in the heads
    # (the detector is built, and trained, with it); ensembles: ``ensemble`` members (>= 2),
    # ``independent`` inits or ``snapshot`` checkpoints of one run; ``proposals``: the
    # pre-regression boxes (two-stage detectors only)
    head_dropout: float = 0.0
    ensemble: int = 0
    ensemble_kind: str = "independent"
    proposals: bool = False
    # AL-MDN: > 0 asks for a mixture-density head of this many components beside the dense
    # head (built at start-up, trained with the detector) and ``Detections.mdn`` per box;
    # ``mixture_coupling``: side (its gradient stops at the head towers) | coupled (reaches them)
    mixture_density: int = 0
    mixture_coupling: str = "side"
    # PPAL's CCMS: ``feats`` are the classification tower's output at each box's centre, not
    # the FPN feature at its anchor (capability ``head_features``)
    head_feats: bool = False

    def merge(self, other: Needs) -> Needs:
        return Needs(
            detections=self.detections or other.detections,
            probs=self.probs or other.probs,
            feats=self.feats or other.feats,
            embedding=self.embedding or other.embedding,
            passes=max(self.passes, other.passes),
            augment=tuple(dict.fromkeys(self.augment + other.augment)),
            grads=self.grads or other.grads,
            labelled_embeddings=self.labelled_embeddings or other.labelled_embeddings,
            labelled_detections=self.labelled_detections or other.labelled_detections,
            head_dropout=max(self.head_dropout, other.head_dropout),
            ensemble=max(self.ensemble, other.ensemble),
            ensemble_kind=self.ensemble_kind if self.ensemble else other.ensemble_kind,
            proposals=self.proposals or other.proposals,
            mixture_density=max(self.mixture_density, other.mixture_density),
            mixture_coupling=(
                self.mixture_coupling if self.mixture_density else other.mixture_coupling
            ),
            head_feats=self.head_feats or other.head_feats,
        )


NOTHING = Needs()

#: every per-box field of ``Detections`` (and of ``PredictionBatch``), filtered together
PER_BOX_FIELDS = (
    "boxes",
    "scores",
    "labels",
    "probs",
    "class_probs",
    "feats",
    "proposals",
    "sources",
    "mdn",
)

#: ``Detections.head`` values: how the detector's classification head produced probabilities.
HEAD_TYPES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Detections:
    """One image, one forward pass, after the detector's own NMS.

    Per-box fields are filtered together by :meth:`select` (cf. detectron2 ``Instances``).
    What the probability fields mean depends on ``head``, the kind of classification head:

    ``head="softmax"`` (Faster R-CNN, SSD): the head predicts one distribution over C classes +
      background.
      * ``probs`` (N, C+1): that softmax, background moved to the last column. Rows sum to 1.
      * ``class_probs`` (N, C): its first C columns (``probs[:, :-1]``), not renormalised.
    ``head="sigmoid"`` (FCOS, RetinaNet, the tiny FCOS): the head predicts C independent
      "object of class c here" probabilities and has no background class.
      * ``class_probs`` (N, C): those independent sigmoids ``sigmoid(logit_c)``: the head's own
        probabilities. Rows do not sum to 1.
      * ``probs`` (N, C+1): a *constructed* distribution ``softmax([logits, 0])`` (a background
        logit fixed at 0) so class-distribution scores can be computed; for one class it equals
        ``(sigmoid, 1 - sigmoid)``. It is not something the head was trained to predict.
    ``scores`` is the detector's ranking confidence (softmax: ``p_label``; RetinaNet:
    ``sigmoid``; FCOS: ``sqrt(sigmoid(cls) * sigmoid(centerness))``).
    ``sources`` (N,) is the anchor / proposal index each box was decoded from: per-class NMS can
    keep several boxes (one per class) from one source, and those rows share their
    probabilities and features, so scorers count each source once.
    """

    image_id: str
    boxes: Tensor  # (N, 4) xyxy absolute pixels
    scores: Tensor  # (N,) detector confidence
    labels: Tensor  # (N,) class index into the dataset classes
    probs: Tensor | None = None  # (N, C+1), background last (see above)
    feats: Tensor | None = None  # (N, D)
    embedding: Tensor | None = None  # (D,)
    proposals: Tensor | None = None  # (N, 4)
    passes: tuple[Detections, ...] = field(default=())
    class_probs: Tensor | None = None  # (N, C)
    sources: Tensor | None = None  # (N,) int64
    head: str = "softmax"  # softmax | sigmoid
    # (N, 4) AL-MDN uncertainties: localisation aleatoric, epistemic, classification aleatoric,
    # epistemic (alrun.detectors.mdn); only when ``needs.mixture_density`` asks
    mdn: Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, index: Tensor) -> Detections:
        """Keep the boxes at ``index`` (bool mask or int indices) in every per-box field."""
        kept = {
            name: getattr(self, name)[index]
            for name in PER_BOX_FIELDS
            if getattr(self, name) is not None
        }
        return replace(self, **kept)

    def to(self, device: torch.device | str) -> Detections:
        moved = {
            name: getattr(self, name).to(device)
            for name in (*PER_BOX_FIELDS, "embedding")
            if getattr(self, name) is not None
        }
        return replace(self, passes=tuple(p.to(device) for p in self.passes), **moved)

    @staticmethod
    def empty(image_id: str, num_probs: int | None = None) -> Detections:
        return Detections(
            image_id=image_id,
            boxes=torch.zeros((0, 4)),
            scores=torch.zeros(0),
            labels=torch.zeros(0, dtype=torch.int64),
            probs=None if num_probs is None else torch.zeros((0, num_probs)),
        )


@dataclass(frozen=True)
class Selection:
    """What a strategy picked in one round, in selection order."""

    image_ids: tuple[str, ...]
    scores: tuple[float, ...]
    costs: tuple[float, ...]
    method: dict = field(default_factory=dict)  # Strategy.describe(): how the pick was made

    @property
    def total_cost(self) -> float:
        return math.fsum(self.costs)  # exactly rounded: independent of the order


@dataclass(frozen=True)
class RoundResult:
    """One row of results.csv."""

    round: int
    images: int
    boxes: int
    clicks: int
    cost_s: float
    mAP: float
    mAP50: float
    mAR: float
    fp: int
    missed: int
    wrong_class: int
    poor_loc: int
    both: int  # wrong class and poor localisation (TIDE); see alrun.metrics
    dupe: int  # duplicate of an already matched object
    collapsed: int  # 1: the round's model looks collapsed (alrun.diagnostics)
    train_s: float
    predict_s: float
    score_s: float
    select_s: float


#: every label kind the simulated oracle can produce (costs in ``oracle.CostModel``)
LABEL_KINDS = ("box", "extreme", "click", "center_click", "verify", "image_label", "partial")

_OPTIONAL_LABEL_FIELDS = {
    # name: (dtype, shape of one object's entry)
    "points": (np.float32, (2,)),
    "extreme_points": (np.float32, (4, 2)),
    "verified": (np.bool_, ()),
    "image_classes": (np.int64, ()),
    "queries": (np.float32, (4,)),
    "query_labels": (np.int64, ()),
    "answers": (np.int64, ()),
    "query_rounds": (np.int64, ()),
}


@dataclass(frozen=True, eq=False)
class ImageLabels:
    """What the oracle returned for one image: one label kind, priced in annotation seconds.

    ``labels[i]`` is the class of the i-th annotated object. Per ``kind`` the objects are:

    * ``box``: ``boxes[i]`` (xyxy pixels) drawn by the annotator;
    * ``extreme``: ``extreme_points[i]`` (left, top, right, bottom; each x, y) and the tight box
      they define in ``boxes[i]``;
    * ``click`` / ``center_click``: ``points[i]`` (x, y), one click per object; ``boxes`` is empty;
    * ``verify``: proposed ``boxes[i]``; ``verified[i]`` is True when the annotator accepted it;
    * ``image_label``: no objects; ``image_classes`` lists the classes present in the image;
    * ``partial`` (box-level queries, :mod:`alrun.regions`): the annotator was asked about the
      regions ``queries[q]`` (predicted boxes, class ``query_labels[q]``) and answered with the
      true boxes ``boxes[i]`` found there; ``answers[q]`` is the index into ``boxes`` of query
      ``q``'s answer, -1 when there was no (new) object. The rest of the image is unlabelled.
      ``query_rounds[q]`` is the round whose labels first held query ``q`` (set by the pool): an
      image asked again in a later round keeps one label, the merge of its answers
      (:func:`alrun.regions.merge_partial`).
    """

    image_id: str
    kind: str
    boxes: np.ndarray  # (N, 4), or (0, 4) for kinds without boxes
    labels: np.ndarray  # (N,)
    cost_s: float
    points: np.ndarray | None = None  # (N, 2)
    extreme_points: np.ndarray | None = None  # (N, 4, 2)
    verified: np.ndarray | None = None  # (N,) bool
    image_classes: np.ndarray | None = None  # (K,)
    queries: np.ndarray | None = None  # (Q, 4) partial: the regions asked about
    query_labels: np.ndarray | None = None  # (Q,) partial: their predicted classes
    answers: np.ndarray | None = None  # (Q,) partial: index into boxes, -1 none
    query_rounds: np.ndarray | None = None  # (Q,) partial: the round each query was asked for

    def box_targets(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(boxes, labels) a detector can train on as they are, or None when the kind has none.

        Boxes come from ``box`` and ``extreme`` labels and from accepted verifications; clicks and
        image-level labels need a regime to turn them into boxes first.
        """
        if self.kind in ("box", "extreme"):
            return self.boxes, self.labels
        if self.kind == "verify" and self.verified is not None:
            return self.boxes[self.verified], self.labels[self.verified]
        return None

    def to_json(self) -> dict[str, Any]:
        """Plain lists (state.json, labelled.json); only the fields this kind fills."""
        data: dict[str, Any] = {
            "image_id": self.image_id,
            "kind": self.kind,
            "boxes": self.boxes.tolist(),
            "labels": self.labels.tolist(),
            "cost_s": self.cost_s,
        }
        for name in _OPTIONAL_LABEL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = value.tolist()
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> ImageLabels:
        optional = {
            name: np.asarray(data[name], dtype=dtype).reshape(-1, *shape)
            for name, (dtype, shape) in _OPTIONAL_LABEL_FIELDS.items()
            if data.get(name) is not None
        }
        return ImageLabels(
            str(data["image_id"]),
            str(data["kind"]),
            np.asarray(data["boxes"], dtype=np.float32).reshape(-1, 4),
            np.asarray(data["labels"], dtype=np.int64),
            float(data["cost_s"]),
            **optional,
        )
