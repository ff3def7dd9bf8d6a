"""Per-image reductions of per-box scores (cf. baal's ``reduction``)."""

from __future__ import annotations

import torch
from torch import Tensor

from alrun.errors import AlrunError
from alrun.params import NonNegativeInt

AGGREGATORS = ("sum", "mean", "max", "min", "weighted")


def aggregate(scores: Tensor, name: str, confidences: Tensor | None = None) -> float:
    """Reduce ``scores`` (N,) of one image's boxes, N >= 1, to one number (the one-image case of
    :func:`aggregate_segments`).

    ``weighted`` is the confidence-weighted mean ``sum(c_i s_i) / sum(c_i)`` where ``c_i`` is the
    box's max class probability: uncertain boxes the detector barely believes in count less.
    """
    if scores.numel() == 0:
        raise ValueError(
            "aggregate() needs at least one box; empty images are handled by the caller"
        )
    segment = torch.zeros(scores.numel(), dtype=torch.int64)
    return float(aggregate_segments(scores.reshape(-1), segment, 1, name, confidences)[0])


def aggregate_segments(
    scores: Tensor,
    segment: Tensor,
    num_segments: int,
    name: str,
    confidences: Tensor | None = None,
) -> Tensor:
    """:func:`aggregate` for many images at once: ``segment[i]`` is box i's image index.

    Returns ``(num_segments,)``; images without boxes get NaN (the caller applies its policy).
    One pass over all boxes of the pool instead of a Python loop per image.
    """
    scores = scores.double()
    count = torch.zeros(num_segments, dtype=torch.float64).index_add_(
        0, segment, torch.ones_like(scores)
    )
    if name in ("sum", "mean"):
        out = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, segment, scores)
        if name == "mean":
            out = out / count.clamp_min(1)
    elif name in ("max", "min"):
        fill = -torch.inf if name == "max" else torch.inf
        out = torch.full((num_segments,), fill, dtype=torch.float64).scatter_reduce_(
            0, segment, scores, reduce="amax" if name == "max" else "amin"
        )
    elif name == "weighted":
        if confidences is None:
            raise ValueError("the 'weighted' aggregator needs box confidences")
        weights = confidences.double().clamp_min(0)
        num = torch.zeros(num_segments, dtype=torch.float64).index_add_(
            0, segment, weights * scores
        )
        den = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, segment, weights)
        out = num / den.clamp_min(1e-12)
    else:
        raise ValueError(f"strategy.aggregator: expected one of {AGGREGATORS}, got '{name}'")
    return torch.where(count > 0, out, torch.full_like(out, torch.nan))


def kao_localization_stability(
    scores: Tensor, segment: Tensor, num_segments: NonNegativeInt, confidences: Tensor | None
) -> Tensor:
    """Kao et al. 2018's image score with its classification term, as CALD's re-implementation
    (we1pingyu/CALD ``ls_c_train.get_uncertainty``) computes it, sign flipped so that higher
    is more informative: ``U - sum(c_i S_i) / sum(c_i)`` with ``S_i = 1 - scores_i`` a box's
    localization stability, ``c_i`` its max class probability and ``U = max_i (1 - c_i)``.
    A callable aggregator (``aggregator: {_target_: ..., _partial_: true}``); NaN: no box."""
    if confidences is None:
        raise ValueError("kao_localization_stability needs box confidences")
    conf = confidences.double().clamp(0, 1)
    stability = aggregate_segments(1.0 - scores.double(), segment, num_segments, "weighted", conf)
    worst = torch.full((num_segments,), -torch.inf, dtype=torch.float64).scatter_reduce_(
        0, segment, 1.0 - conf, reduce="amax"
    )
    return worst - stability


def check_class_weights(weights, key: str = "strategy.scorer.class_weights") -> tuple | None:
    """Validate a per-class weighting option: null, or a list of numbers >= 0 (one per class)."""
    if weights is None:
        return None
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise AlrunError(f"{key}: expected null or a list of numbers, got {weights!r}") from None
    if not values or any(w < 0 or w != w for w in values):
        raise AlrunError(f"{key}: expected a non-empty list of numbers >= 0, got {list(weights)}")
    return values


def class_weighted(scores: Tensor, labels: Tensor, weights: tuple[float, ...] | None) -> Tensor:
    """Multiply each box score by the weight of its predicted class (e.g. to favour rare
    classes); ``None`` leaves the scores as they are. Applied before any aggregator."""
    if weights is None:
        return scores
    table = torch.tensor(weights, dtype=scores.dtype)
    if labels.numel() and int(labels.max()) >= len(weights):
        raise AlrunError(
            f"strategy.scorer.class_weights: {len(weights)} weights but a box of class "
            f"{int(labels.max())}; give one weight per class"
        )
    return scores * table[labels.long()]
