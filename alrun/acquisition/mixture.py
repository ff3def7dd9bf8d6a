"""AL-MDN's image score (Choi et al. ICCV 2021) from the mixture-density head's uncertainties.

Each kept box carries four uncertainties (``Detections.mdn``, see
:mod:`alrun.detectors.mdn`): localisation aleatoric / epistemic and classification aleatoric /
epistemic. They live on different scales, so the paper z-scores each one with the mean and
standard deviation over every box of the pool, reduces per image (max in the paper) and takes
the maximum of the four normalised values as the image's score. ``uncertainty`` picks one of
the four instead (each on its own, normalised the same way), ``combine: sum`` adds the four.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from alrun.acquisition.aggregate import check_class_weights, class_weighted
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.reduction import (
    Aggregator,
    ClassWeights,
    CountSources,
    EmptyPolicy,
    box_confidence,
    check_reduction,
    kept_rows,
    reduce_per_image,
    reduction_record,
    with_empty,
)
from alrun.acquisition.strategies import score_pool
from alrun.detectors.mdn import COUPLINGS, UNCERTAINTIES
from alrun.errors import AlrunError
from alrun.params import PositiveInt, ScoreThreshold
from alrun.types import Needs

#: ``uncertainty`` choices: all four combined, or one of them
CHOICES = ("all", *UNCERTAINTIES)
COMBINE = ("max", "sum")


def zscore(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Column-wise z-scores of (B, U) with the population std (the paper's ``pstdev``); a
    column with no spread gets std 1 so it contributes 0, not NaN."""
    mean = values.mean(dim=0)
    std = values.std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (values - mean) / std, mean, std


class MixtureUncertainty:
    """Score = combination of the z-scored, per-image reduced AL-MDN uncertainties.

    ``score_threshold`` (0.5 in the paper) keeps only confident boxes; each anchor is counted
    once (:func:`~alrun.acquisition.strategies.unique_sources`); ``aggregator`` (max in the
    paper) reduces an image's boxes; ``empty`` decides images left without a box.
    ``coupling`` asks for the head beside the detector (``side``: its training untouched) or
    training the towers through it (``coupled``: the paper), see :mod:`alrun.detectors.mdn`.
    """

    def __init__(
        self,
        components: PositiveInt = 4,
        uncertainty: Literal[CHOICES] = "all",
        combine: Literal[COMBINE] = "max",
        aggregator: Aggregator = "max",
        score_threshold: ScoreThreshold = 0.5,
        empty: EmptyPolicy = "min",
        class_weights: ClassWeights = None,
        count_sources: CountSources = "once",
        coupling: Literal[COUPLINGS] = "side",
    ):
        if coupling not in COUPLINGS:
            raise AlrunError(
                f"strategy.scorer.coupling: expected one of {'|'.join(COUPLINGS)}, got '{coupling}'"
            )
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise AlrunError(
                f"strategy.scorer.components: expected an integer >= 1, got {components!r}"
            )
        if uncertainty not in CHOICES:
            raise AlrunError(
                f"strategy.scorer.uncertainty: expected one of {'|'.join(CHOICES)}, "
                f"got '{uncertainty}'"
            )
        if combine not in COMBINE:
            raise AlrunError(
                f"strategy.scorer.combine: expected one of {'|'.join(COMBINE)}, got '{combine}'"
            )
        check_reduction(aggregator, empty, score_threshold, count_sources)
        self.count_sources = count_sources
        self.components = components
        self.uncertainty = uncertainty
        self.combine = combine
        self.aggregator = aggregator
        self.score_threshold = float(score_threshold)
        self.empty = empty
        self.class_weights = check_class_weights(class_weights)
        self.coupling = coupling
        self.needs = Needs(mixture_density=components, mixture_coupling=coupling)
        self._stats: dict[str, list[float]] = {}

    def batch_scores(self, batch: PredictionBatch) -> list[float | None]:
        self._stats = {"boxes": 0}  # this call's normalisation only (describe())
        if len(batch) == 0:
            return []
        if batch.mdn is None:
            raise AlrunError(
                "strategy: the detector returned no mixture-density uncertainties (AL-MDN "
                "needs a detector with a mixture head: FCOS or RetinaNet)"
            )
        keep = kept_rows(batch, self.score_threshold, self.count_sources)
        values = batch.mdn[keep].double()
        columns = (
            list(range(len(UNCERTAINTIES)))
            if self.uncertainty == "all"
            else [UNCERTAINTIES.index(self.uncertainty)]
        )
        values = values[:, columns]
        labels, segment = batch.labels[keep], batch.segment[keep]
        if self.class_weights is not None:  # on the raw values, before normalising
            weight = class_weighted(torch.ones(len(labels)), labels, self.class_weights)
            values = values * weight.double()[:, None]
        self._stats = {"boxes": int(len(values))}
        normalised = values
        if len(values):
            normalised, mean, std = zscore(values)
            self._stats.update(mean=mean.tolist(), std=std.tolist())
        per_image = torch.stack(
            [
                reduce_per_image(
                    self.aggregator,
                    normalised[:, j],
                    segment,
                    len(batch),
                    box_confidence(batch, keep),
                )
                for j in range(len(columns))
            ],
            dim=1,
        )
        if self.combine == "max":
            combined = per_image.amax(dim=1)
        else:
            combined = per_image.sum(dim=1)
        return with_empty(combined, self.empty)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        return score_pool(self, context)

    def describe(self) -> dict[str, Any]:
        columns = UNCERTAINTIES if self.uncertainty == "all" else (self.uncertainty,)
        return {
            "scorer": "mixture_uncertainty",
            "components": self.components,
            "uncertainty": self.uncertainty,
            "combine": self.combine,
            "coupling": self.coupling,
            **reduction_record(self),
            "normalisation": {"columns": list(columns), **self._stats},
        }
