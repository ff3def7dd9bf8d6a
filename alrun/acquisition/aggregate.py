"""Per-image reductions of per-box scores (cf. baal's ``reduction``)."""

from __future__ import annotations

from torch import Tensor

AGGREGATORS = ("sum", "mean", "max", "min", "weighted")


def aggregate(scores: Tensor, name: str, confidences: Tensor | None = None) -> float:
    """Reduce ``scores`` (N,) of one image's boxes, N >= 1, to one number.

    ``weighted`` is the confidence-weighted mean ``sum(c_i s_i) / sum(c_i)`` where ``c_i`` is the
    box's max class probability: uncertain boxes the detector barely believes in count less.
    """
    if scores.numel() == 0:
        raise ValueError(
            "aggregate() needs at least one box; empty images are handled by the caller"
        )
    if name == "sum":
        return float(scores.sum())
    if name == "mean":
        return float(scores.mean())
    if name == "max":
        return float(scores.max())
    if name == "min":
        return float(scores.min())
    if name == "weighted":
        if confidences is None:
            raise ValueError("the 'weighted' aggregator needs box confidences")
        weights = confidences.clamp_min(0)
        return float((weights * scores).sum() / weights.sum().clamp_min(1e-12))
    raise ValueError(f"strategy.aggregator: expected one of {AGGREGATORS}, got '{name}'")
