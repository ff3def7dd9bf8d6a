"""Combinations of scorers: a weighted sum of normalised scores with round-dependent weights.

Scores of different scorers live on different scales (entropy in nats, squared feature
distances, counts), so each is normalised over the pool first: ``rank`` (average rank mapped to
[0, 1], robust to outliers and infinities) or ``zscore`` ((s - mean) / std, keeping how far
apart images are; +-inf are clipped to the finite range first).

Weights follow a small schedule per scorer: a number (every round), or a list of
``[from_round, weight]`` steps, the last step with ``from_round <= round`` applying, e.g.
uncertainty early and diversity later::

    weights:
      uncertainty: [[0, 1.0], [3, 0.3]]
      diversity:   [[0, 0.0], [3, 0.7]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision.ops import box_iou

from alrun.acquisition.context import AcquisitionContext, PredictionBatch, Scorer
from alrun.errors import AlrunError
from alrun.params import NonNegativeFloat, NonNegativeInt, ScoreThreshold
from alrun.types import Needs

NORMALISATIONS = ("rank", "zscore")
#: a weight, or steps ``[[from_round, weight], ...]`` (the last step <= round applies)
WeightSchedule = NonNegativeFloat | Sequence[tuple[NonNegativeInt, NonNegativeFloat]]


def rank_normalise(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share their mean rank) scaled to [0, 1]; one value -> 1.0."""
    n = len(values)
    if n == 0:
        return []
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    start = 0
    while start < n:
        stop = start
        while stop + 1 < n and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        mean_rank = (start + stop) / 2.0
        for pos in range(start, stop + 1):
            ranks[order[pos]] = mean_rank / (n - 1)
        start = stop + 1
    return ranks


def zscore_normalise(values: Sequence[float]) -> list[float]:
    """(v - mean) / std over the pool; infinities clipped to the finite min/max; a constant
    score (std 0) contributes 0 everywhere."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    lo, hi = min(finite), max(finite)
    t = torch.tensor([min(max(v, lo), hi) for v in values], dtype=torch.float64)
    std = float(t.std(unbiased=False))
    if std == 0.0:
        return [0.0] * len(values)
    return ((t - t.mean()) / std).tolist()


def normalise(values: Sequence[float], how: str) -> list[float]:
    if how == "rank":
        return rank_normalise(values)
    if how == "zscore":
        return zscore_normalise(values)
    raise AlrunError(f"strategy.scorer.normalise: expected one of {NORMALISATIONS}, got '{how}'")


def check_schedule(
    schedule: float | Sequence[Sequence[float]], key: str
) -> float | list[tuple[int, float]]:
    """A weight schedule checked at start-up: a finite number, or ``[from_round, weight]`` steps
    with whole rounds >= 0 and finite weights, the first covering round 0 (round 0's selection
    uses it: a gap would stop the run after round 0 trained). Steps come back sorted."""
    where = f"strategy.scorer.weights.{key}"
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        if not math.isfinite(schedule):
            raise AlrunError(f"{where}: expected a finite weight, got {schedule}")
        return float(schedule)
    try:
        steps = [tuple(step) for step in schedule]
    except TypeError:
        steps = []
    if not steps or any(len(s) != 2 for s in steps):
        raise AlrunError(f"{where}: expected a number or a list of [from_round, weight]")
    for from_round, weight in steps:
        whole = isinstance(from_round, int) and not isinstance(from_round, bool)
        if not whole or from_round < 0:
            raise AlrunError(
                f"{where}: expected whole rounds >= 0 in [from_round, weight], got {from_round}"
            )
        finite = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not finite or not math.isfinite(weight):
            raise AlrunError(f"{where}: expected a finite weight in each step, got {weight}")
    steps.sort(key=lambda s: s[0])
    if steps[0][0] > 0:
        raise AlrunError(
            f"{where}: no step covers round 0 (the first starts at round {steps[0][0]}); "
            "expected a [0, weight] step"
        )
    return [(int(r), float(w)) for r, w in steps]


def weight_at(schedule: float | Sequence[Sequence[float]], round_index: int, key: str) -> float:
    """The weight a schedule gives in ``round_index`` (see the module docstring)."""
    checked = check_schedule(schedule, key)
    if isinstance(checked, float):
        return checked
    weight = checked[0][1]
    for from_round, value in checked:
        if from_round <= round_index:
            weight = value
    return weight


class WeightedSum:
    """``sum_k w_k(round) * normalise(score_k)`` over the images every scorer scored.

    Images a scorer leaves out are left out of the sum (never picked): a scorer that skips
    empty images excludes them from the combination too. A NaN from any scorer is an error
    naming it. The weights used are recorded in ``describe()`` (so in each selection.json).
    """

    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        weights: Mapping[str, WeightSchedule],
        normalise: Literal[NORMALISATIONS] = "rank",
    ):
        if not scorers:
            raise AlrunError("strategy.scorer.scorers: expected at least one scorer")
        unknown = set(weights) - set(scorers)
        missing = set(scorers) - set(weights)
        if unknown or missing:
            raise AlrunError(
                f"strategy.scorer.weights: expected one weight per scorer {sorted(scorers)}, "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        if normalise not in NORMALISATIONS:
            raise AlrunError(
                f"strategy.scorer.normalise: expected one of {NORMALISATIONS}, got '{normalise}'"
            )
        for key, schedule in weights.items():
            check_schedule(schedule, key)  # at start-up, not when a round first uses it
        self.scorers = dict(scorers)
        self.weights = dict(weights)
        self.normalise = normalise
        self.last_weights: dict[str, float] = {}
        needs = Needs(detections=False)
        for scorer in self.scorers.values():
            needs = needs.merge(scorer.needs)
        self.needs = needs

    @property
    def training_hooks(self) -> tuple:
        return tuple(h for s in self.scorers.values() for h in getattr(s, "training_hooks", ()))

    def check_detector(self, head_type: str) -> None:
        for scorer in self.scorers.values():
            check = getattr(scorer, "check_detector", None)
            if check is not None:
                check(head_type)

    def round_weights(self, context: AcquisitionContext) -> dict[str, float]:
        return {k: weight_at(s, context.round, k) for k, s in self.weights.items()}

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        weights = self.round_weights(context)
        self.last_weights = weights
        return self.combine({k: s(context) for k, s in self.scorers.items()}, weights)

    def combine(
        self, parts: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]
    ) -> dict[str, float]:
        for key, scores in parts.items():
            for image_id, value in scores.items():
                if math.isnan(value):
                    raise AlrunError(
                        f"strategy.scorer.scorers.{key}: score of image '{image_id}' is NaN"
                    )
        common = set.intersection(*(set(s) for s in parts.values()))
        ids = sorted(common)
        total = [0.0] * len(ids)
        for key, scores in parts.items():
            weight = weights[key]
            if weight == 0.0:
                continue
            for n, value in enumerate(normalise([scores[i] for i in ids], self.normalise)):
                total[n] += weight * value
        return dict(zip(ids, total))

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "weighted_sum",
            "normalise": self.normalise,
            "weights_this_round": self.last_weights,
            "parts": {k: s.describe() for k, s in self.scorers.items()},
        }


#: what :func:`labelled_failure_modes` counts; ``none``: the weights when nothing is wrong
FAILURE_MODES = ("missed", "poor_loc", "wrong_class")


def labelled_failure_modes(
    preds: PredictionBatch | None,
    targets: Mapping[str, tuple[Tensor, Tensor]] | None,
    score_threshold: float = 0.5,
    near_iou: float = 0.1,
) -> dict[str, int]:
    """Why each labelled box is not found by a detection >= ``score_threshold`` (ground-truth
    centred, each box on its own): found (same class, IoU >= 0.5) is no error; else
    ``wrong_class`` (another class at IoU >= 0.5), ``poor_loc`` (same class at IoU in
    [``near_iou``, 0.5)), ``missed`` (nothing near)."""
    counts = dict.fromkeys(FAILURE_MODES, 0)
    if preds is None or not targets:
        return counts
    row = {i: n for n, i in enumerate(preds.image_ids)}
    for image_id, (gt_boxes, gt_labels) in targets.items():
        if len(gt_labels) == 0:
            continue
        n = row.get(image_id)
        lo, hi = (0, 0) if n is None else (int(preds.offsets[n]), int(preds.offsets[n + 1]))
        keep = preds.scores[lo:hi] >= score_threshold
        boxes, labels = preds.boxes[lo:hi][keep], preds.labels[lo:hi][keep]
        if len(boxes) == 0:
            counts["missed"] += len(gt_labels)
            continue
        iou = box_iou(gt_boxes.float(), boxes.float())
        same = gt_labels[:, None] == labels[None, :]
        best_same = torch.where(same, iou, torch.zeros_like(iou)).amax(dim=1)
        best_any = iou.amax(dim=1)
        wrong = (best_same < 0.5) & (best_any >= 0.5)
        poor = (best_same < 0.5) & ~wrong & (best_same >= near_iou)
        missed = (best_same < near_iou) & ~wrong
        counts["wrong_class"] += int(wrong.sum())
        counts["poor_loc"] += int(poor.sum())
        counts["missed"] += int(missed.sum())
    return counts


class FailureModeWeighted(WeightedSum):
    """A weighted sum whose weights follow the current model's dominant failure mode on the
    labelled set (:func:`labelled_failure_modes`): ``mode_weights[mode]`` gives one weight per
    scorer for each of ``missed``, ``poor_loc``, ``wrong_class`` and ``none`` (no error). The
    counts, the dominant mode and the weights used are recorded per round in selection.json.
    """

    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        mode_weights: Mapping[Literal[(*FAILURE_MODES, "none")], Mapping[str, NonNegativeFloat]],
        normalise: Literal[NORMALISATIONS] = "rank",
        score_threshold: ScoreThreshold = 0.5,
    ):
        modes = (*FAILURE_MODES, "none")
        if set(mode_weights) != set(modes):
            raise AlrunError(
                f"strategy.scorer.mode_weights: expected exactly the keys {list(modes)}, got "
                f"{sorted(mode_weights)}"
            )
        for mode, weights in mode_weights.items():
            if set(weights) != set(scorers):
                raise AlrunError(
                    f"strategy.scorer.mode_weights.{mode}: expected one weight per scorer "
                    f"{sorted(scorers)}, got {sorted(weights)}"
                )
            for key, weight in weights.items():
                number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
                if not number or not math.isfinite(weight):
                    raise AlrunError(
                        f"strategy.scorer.mode_weights.{mode}.{key}: expected a finite number, "
                        f"got {weight!r}"
                    )
        first = mode_weights["none"]
        super().__init__(scorers, {k: float(first[k]) for k in scorers}, normalise)
        self.mode_weights = {
            m: {k: float(v) for k, v in w.items()} for m, w in mode_weights.items()
        }
        self.score_threshold = float(score_threshold)
        self.needs = self.needs.merge(Needs(labelled_detections=True))
        self.last_modes: dict[str, int] = {}
        self.last_dominant = "none"

    def round_weights(self, context: AcquisitionContext) -> dict[str, float]:
        counts = labelled_failure_modes(
            context.labelled_preds, context.labelled_targets, self.score_threshold
        )
        dominant = max(FAILURE_MODES, key=lambda m: counts[m])  # ties: the order above
        if counts[dominant] == 0:
            dominant = "none"
        self.last_modes, self.last_dominant = counts, dominant
        return dict(self.mode_weights[dominant])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "scorer": "failure_mode_weighted",
            "failure_modes_labelled": self.last_modes,
            "dominant_failure_mode": self.last_dominant,
        }
