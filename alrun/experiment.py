"""Building a run from its composed config: every group instantiated and checked, in an order
that reports a bad value before a dataset is read, a model is built or a file is written."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from alrun import initial_set
from alrun.acquisition.composition import check_composition
from alrun.acquisition.strategies import Strategy
from alrun.budget import Budget, cost_function
from alrun.data.dataset import DatasetSplits
from alrun.detectors.base import Detector, TrainSchedule
from alrun.detectors.capabilities import (
    check_capabilities,
    check_passes,
    detector_config_capabilities,
    detector_label,
)
from alrun.detectors.passes import Ensemble, Predictor, is_member_key
from alrun.engine import StrategyTraining
from alrun.errors import AlrunError
from alrun.metrics import MetricConfig
from alrun.oracle import SimulatedOracle
from alrun.params import check_config
from alrun.supervision.base import LabelRequest, Regime, check_regime
from alrun.supervision.box_level import check_box_level
from alrun.truth import HiddenTruth
from alrun.types import Needs


@dataclass
class Experiment:
    """Everything a run is made of, built from the composed config.

    ``splits`` hold the dataset with its ground truth: the loop hands detectors, strategies and
    regimes only their images (:meth:`DatasetSplits.visible`, the pool's references) and gives
    the truth to the evaluator; ``truth`` (the same records by id) is what the oracle holds.
    ``training``: what the strategy trains with the detector (handed to the regime every
    round); ``predictor``: the detector plus the strategy's backend-independent passes
    (ensemble members, test-time views), which the loop asks for pool predictions.
    """

    splits: DatasetSplits
    detector: Detector
    regime: Regime
    strategy: Strategy
    budget: Budget
    oracle: SimulatedOracle
    schedule: TrainSchedule
    seed: int
    metric: MetricConfig = MetricConfig()
    training: StrategyTraining = StrategyTraining()
    predictor: Predictor | None = None
    initial_ids: tuple[str, ...] | None = None  # budget.initial_ids, resolved against the pool
    truth: HiddenTruth | None = None
    #: images per prediction batch (``detector.predict_batch_size``): sharded prediction on
    #: several devices deals whole batches, so each image is predicted as by one process
    predict_block: int = 1

    def __post_init__(self) -> None:
        if self.predictor is None:
            self.predictor = Predictor(self.detector, self.training.ensemble)
        if self.truth is None:
            self.truth = HiddenTruth.of(self.splits)

    def model_state(self) -> dict[str, Any]:
        """The round's checkpoint: the detector's weights, each ensemble member's beside them
        under ``member<k>.``."""
        state = self.detector.state_dict()
        if self.training.ensemble is not None:
            state.update(self.training.ensemble.state_dict())
        return state

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict({k: v for k, v in state.items() if not is_member_key(k)})
        if self.training.ensemble is not None:
            self.training.ensemble.load_state_dict(state)


def _choice(group: str) -> str | None:
    """The option chosen for ``group`` on the command line (None outside a Hydra app)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def requirements(strategy: Strategy, regime: Regime, regime_name: str | None = None):
    """``(who, capability names)`` of each part of the strategy (``strategy=ppal
    (strategy.selector)``, :meth:`Strategy.requirement_parts`) and of the regime."""
    regime_name = regime_name or _choice("supervision")
    who = f"supervision={regime_name}" if regime_name else f"supervision ({type(regime).__name__})"
    parts = [(f"strategy={strategy.name} ({part})", c) for part, c in strategy.requirement_parts()]
    return [*parts, (who, frozenset(regime.requires))]


def set_up_detector(detector: Detector, needs: Needs) -> None:
    """What the strategy's ``needs`` build into the detector before any training (the model
    trains with them): MC-dropout layers, AL-MDN's mixture head."""
    if needs.head_dropout > 0:
        detector.enable_mc_dropout(needs.head_dropout)
    if needs.mixture_density:
        detector.add_mixture_head(needs.mixture_density, needs.mixture_coupling)


def build_experiment(cfg: DictConfig) -> Experiment:
    """Instantiate every config group (``_target_`` + ``hydra.utils.instantiate``).

    Every declared setting is checked first (:func:`alrun.params.check_config`: types, ranges,
    keys, rules across keys), then the cheap groups are built and what the strategy and the
    regime require is checked against what the detector's config declares
    (:mod:`alrun.detectors.capabilities`), so a bad value is reported before a dataset is read,
    a model is built or a file is written.
    """
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise AlrunError(f"seed: expected a non-negative integer, got {cfg.seed!r}")
    check_composition(cfg.get("strategy"))
    check_config(cfg)
    schedule = instantiate(cfg.trainer)
    budget = instantiate(cfg.budget)
    strategy = instantiate(cfg.strategy)
    oracle = instantiate(cfg.oracle)
    regime = instantiate(cfg.supervision)
    check_regime(regime, oracle)
    check_box_level(strategy, regime, oracle, budget.unit, budget.fill, strategy.name)
    needs = strategy.needs
    check_passes(needs, f"strategy={strategy.name}")
    wanted = requirements(strategy, regime)
    detector_name = detector_label(cfg.detector, _choice("detector"))
    check_capabilities(wanted, detector_config_capabilities(cfg.detector), detector_name)
    metric = instantiate(cfg.metric) if "metric" in cfg else MetricConfig()
    splits = instantiate(cfg.dataset)
    if not isinstance(splits, DatasetSplits):
        raise AlrunError(f"dataset: _target_ must build DatasetSplits, got {type(splits).__name__}")
    truth = HiddenTruth.of(splits)
    oracle.hold_truth(truth)  # the oracle and the evaluator are the only holders of the truth
    visible = splits.visible()
    strategy.check_data(visible)  # class_weights: one per class; scale views: bounded size
    initial_ids = _initial_ids(budget, splits, oracle, regime)
    regime.check_data(visible)  # e.g. uda: the dataset must be its target domain
    oracle.check_data(splits)  # oracle=recorded: file ids, classes, coordinates
    factory = functools.partial(instantiate, cfg.detector, num_classes=len(splits.classes))
    detector = factory()
    check_capabilities(wanted, detector.capabilities, detector_name)  # undeclared configs
    strategy.check_detector(detector.head_type)
    set_up_detector(detector, needs)
    ensemble = Ensemble(factory, needs.ensemble, needs.ensemble_kind) if needs.ensemble else None
    return Experiment(
        splits=splits,
        detector=detector,
        regime=regime,
        strategy=strategy,
        budget=budget,
        oracle=oracle,
        schedule=schedule,
        seed=int(cfg.seed),
        metric=metric,
        training=StrategyTraining(tuple(strategy.training_hooks), ensemble),
        initial_ids=initial_ids,
        truth=truth,
        predict_block=int(cfg.detector.get("predict_batch_size", 1)),
    )


def _initial_ids(
    budget: Budget, splits: DatasetSplits, oracle: SimulatedOracle, regime: Regime
) -> tuple[str, ...] | None:
    """``budget.initial_ids`` read and checked against the pool and ``budget.initial``."""
    if budget.initial_ids is None:
        return None
    path = Path(budget.initial_ids).expanduser()
    ids = initial_set.resolve(path, splits)
    records = splits.pool.visible().by_id()
    kind = regime.label_kind(LabelRequest(0))
    cost_of = cost_function(budget.unit, oracle, records.__getitem__, kind)
    initial_set.check_affordable(path, ids, budget.initial, budget.unit, cost_of)
    return ids
