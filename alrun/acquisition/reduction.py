"""The one per-box -> per-image pipeline every box scorer uses.

threshold -> box validity -> sources -> (the scorer's per-box score) -> class weights ->
aggregator -> empty-image policy. :func:`kept_rows` does the first three, :func:`image_scores`
the rest; :func:`reduction_record` is what ``selection.json`` says about it. The ``weighted``
aggregator weights a box by its *max class probability* (:func:`box_confidence`) in every
scorer - not by the detector's ranking score, which on FCOS also carries the centerness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from alrun.acquisition.aggregate import AGGREGATORS, aggregate_segments, class_weighted
from alrun.acquisition.context import PredictionBatch
from alrun.errors import AlrunError
from alrun.params import NonNegativeFloat

EMPTY_POLICIES = ("min", "max", "skip")
#: ``strategy.scorer.count_sources``: ``once`` scores one row per (image, anchor/proposal) -
#: alrun's rule, per-class NMS may keep a source once per class -, ``per_class`` every row NMS
#: keeps (what reference implementations that score post-NMS detections do, e.g. PPAL)
COUNT_SOURCES = ("once", "per_class")

#: a named aggregator (``AGGREGATORS``) or a callable with :func:`aggregate_segments`'s
#: signature after ``name``: ``fn(scores, segment, num_segments, confidences) -> (I,)``
Aggregator = Literal[AGGREGATORS] | Callable[[Tensor, Tensor, int, Tensor | None], Tensor]
#: images without a box: ``min`` | ``max`` | ``skip`` | a score (see :func:`empty_image_score`)
EmptyPolicy = Literal[EMPTY_POLICIES] | float
#: null, or one weight >= 0 per class
ClassWeights = Sequence[NonNegativeFloat] | None
CountSources = Literal[COUNT_SOURCES]


def _name_of(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial from Hydra's _partial_
    return getattr(fn, "__name__", type(fn).__name__)


def check_reduction(
    aggregator: Aggregator, empty: str | float, score_threshold: float, count_sources: str = "once"
) -> None:
    """Start-up checks shared by every per-box scorer: aggregator, empty-image policy,
    threshold, source counting."""
    if isinstance(aggregator, str) and aggregator not in AGGREGATORS:
        raise AlrunError(
            f"strategy.scorer.aggregator: expected one of {'|'.join(AGGREGATORS)} or a "
            f"callable, got '{aggregator}'"
        )
    if isinstance(empty, str) and empty not in EMPTY_POLICIES:
        raise AlrunError(
            f"strategy.scorer.empty: expected one of {'|'.join(EMPTY_POLICIES)} or a number, "
            f"got '{empty}'"
        )
    if not 0.0 <= score_threshold < 1.0:
        raise AlrunError(
            f"strategy.scorer.score_threshold: expected a number in [0, 1), got {score_threshold}"
        )
    if count_sources not in COUNT_SOURCES:
        raise AlrunError(
            f"strategy.scorer.count_sources: expected one of {'|'.join(COUNT_SOURCES)}, "
            f"got '{count_sources}'"
        )


def empty_image_score(empty: str | float) -> float | None:
    """The score of an image without boxes under the ``empty`` policy (None: leave it out)."""
    if empty == "min":
        return -math.inf
    if empty == "max":
        return math.inf
    if empty == "skip":
        return None
    return float(empty)


def unique_sources(batch: PredictionBatch, keep: Tensor) -> Tensor:
    """Restrict ``keep`` (bool mask over boxes) to one row per (image, source).

    Per-class NMS may keep one box per class from the same anchor/proposal; those rows share
    probabilities and features, so counting each would weight exactly the ambiguous sources
    k times. Of such rows the one with the highest detector score is kept.
    """
    if batch.sources is None or not bool(keep.any()):
        return keep
    idx = torch.nonzero(keep).flatten()
    seg = batch.segment[idx]
    key = seg * (int(batch.sources.max()) + 1) + batch.sources[idx]
    by_score = torch.argsort(batch.scores[idx], descending=True, stable=True)
    by_key = by_score[torch.argsort(key[by_score], stable=True)]
    first = torch.ones(len(by_key), dtype=torch.bool)
    first[1:] = key[by_key][1:] != key[by_key][:-1]
    out = torch.zeros_like(keep)
    out[idx[by_key[first]]] = True
    return out


def valid_boxes(boxes: Tensor, min_size: float, max_aspect_ratio: float) -> Tensor:
    """PPAL's box-validity rule (``BaseALSampler.is_box_valid``): a box counts when
    ``sqrt(w h) > min_size`` and both ``w / h`` and ``h / w`` are ``< max_aspect_ratio``
    (strict, as there; a tiny epsilon keeps degenerate boxes finite)."""
    w = (boxes[:, 2] - boxes[:, 0]).double()
    h = (boxes[:, 3] - boxes[:, 1]).double()
    eps = 1e-10
    return (
        ((w * h).clamp_min(0).sqrt() > min_size)
        & (w / (h + eps) < max_aspect_ratio)
        & (h / (w + eps) < max_aspect_ratio)
    )


def kept_rows(
    batch: PredictionBatch,
    score_threshold: float,
    count_sources: str = "once",
    validity: tuple[float, float] | None = None,
    max_boxes: int | None = None,
) -> Tensor:
    """Rows (int64, image order) a scorer scores: detector score >= ``score_threshold``, valid
    boxes only when ``validity = (min_size, max_aspect_ratio)`` is given, one row per source
    unless ``count_sources = per_class``, and at most ``max_boxes`` per image (those of the
    highest max class probability, :func:`box_confidence`)."""
    keep = batch.scores >= score_threshold
    if validity is not None and batch.num_boxes:
        keep = keep & valid_boxes(batch.boxes, *validity)
    if count_sources == "once":
        keep = unique_sources(batch, keep)
    rows = torch.nonzero(keep).flatten()
    if max_boxes is not None and len(rows):
        conf = box_confidence(batch, rows).double()
        seg = batch.segment[rows]
        order = torch.argsort(conf, descending=True, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]  # by image, best first
        start = torch.searchsorted(seg[order], seg[order], right=False)
        rank = torch.arange(len(order)) - start
        rows = torch.sort(rows[order[rank < max_boxes]]).values
    return rows


def box_confidence(batch: PredictionBatch, rows: Tensor) -> Tensor:
    """The ``weighted`` aggregator's box weight: the max class probability (the head's own
    class probabilities; the detector score only when the detector gives none)."""
    if batch.class_probs is not None:
        return batch.class_probs[rows].max(dim=1).values
    if batch.probs is not None:
        return batch.probs[rows, :-1].max(dim=1).values
    return batch.scores[rows]


def reduce_per_image(
    aggregator: Aggregator, scores: Tensor, segment: Tensor, num_images: int, confidences: Tensor
) -> Tensor:
    """Per-image reduction of box scores by a named or a callable aggregator (NaN: no box)."""
    if callable(aggregator):
        return aggregator(scores, segment, num_images, confidences)
    return aggregate_segments(scores, segment, num_images, aggregator, confidences)


def with_empty(per_image: Tensor, empty: str | float) -> list[float | None]:
    """Per-image values (NaN: no box) with the ``empty`` policy applied."""
    fill = empty_image_score(empty)
    return [fill if math.isnan(x) else x for x in per_image.tolist()]


def image_scores(
    scorer: Any, batch: PredictionBatch, rows: Tensor, box_scores: Tensor
) -> list[float | None]:
    """``box_scores`` of ``rows`` -> one score per image of ``batch``: the scorer's
    ``class_weights``, ``aggregator`` (``weighted``: by :func:`box_confidence`) and ``empty``."""
    box_scores = class_weighted(box_scores, batch.labels[rows], scorer.class_weights)
    per_image = reduce_per_image(
        scorer.aggregator, box_scores, batch.segment[rows], len(batch), box_confidence(batch, rows)
    )
    return with_empty(per_image, scorer.empty)


def reduction_record(scorer: Any) -> dict[str, Any]:
    """What ``selection.json`` records about a per-box scorer's reduction to one image score."""
    aggregator = scorer.aggregator
    return {
        "aggregator": aggregator if isinstance(aggregator, str) else _name_of(aggregator),
        "aggregator_weights": "max class probability",
        "score_threshold": scorer.score_threshold,
        "empty": scorer.empty,
        "count_sources": getattr(scorer, "count_sources", "once"),
        "class_weights": None if scorer.class_weights is None else list(scorer.class_weights),
    }
