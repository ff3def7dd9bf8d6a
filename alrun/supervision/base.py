"""The Regime protocol: which labels a supervision regime asks for, and how it trains on them.

The loop asks the regime, once per round, for the label kind of the images it is about to buy
(:meth:`Regime.label_kind`, used to price them against the budget), then hands it the selected
images to label (:meth:`Regime.annotate`, usually one ``oracle.annotate`` call) and, next round,
the pool to train on (:meth:`Regime.train`, through :mod:`alrun.engine`). ``state_dict`` is saved
in ``state.json`` under ``regime`` after every round and restored on resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from alrun.data.dataset import ImageRef, VisibleSplits
from alrun.detectors.base import Detector, Progress, TrainSchedule
from alrun.engine import NO_STRATEGY_TRAINING, StrategyTraining
from alrun.errors import AlrunError
from alrun.pool import LabelPool
from alrun.types import ImageLabels

if TYPE_CHECKING:
    from alrun.oracle import SimulatedOracle


@dataclass(frozen=True)
class LabelRequest:
    """The situation a label request is made in.

    ``round_index``: the round that will first train on these labels (0 = the initial set).
    ``history``: one mapping per round evaluated so far, oldest first, with at least ``round``,
    the pool totals before that round's selection (``images``, ``boxes``, ``clicks``,
    ``cost_s``, ...) and its test metrics (``mAP``, ``mAP50``, ``mAR``, ...); empty for the
    initial set. ``detector``: the model of the last evaluated round (None for the initial set),
    e.g. to propose boxes for verification or to measure per-image confidence.
    ``queries``: the regions a box-query strategy chose, image id -> (boxes, labels) in rank
    order (``partial`` labels, :mod:`alrun.regions`); None for image-level selections.
    ``answered``: image id -> boxes answered in earlier rounds, for images asked again.
    """

    round_index: int
    history: tuple[Mapping[str, Any], ...] = ()
    detector: Detector | None = None
    queries: Mapping[str, tuple[Any, Any]] | None = None
    answered: Mapping[str, Any] | None = None


@runtime_checkable
class Regime(Protocol):
    """A supervision regime (``supervision=<name>``)."""

    #: every label kind this regime may ask for; checked against the oracle at start-up
    label_kinds: tuple[str, ...]
    #: capability names (``alrun.detectors.base``) it needs of the detector; checked against
    #: the detector's at start-up (``alrun.detectors.capabilities``)
    requires: frozenset[str]

    def label_kind(self, request: LabelRequest) -> str:
        """The kind asked for in this request (prices the selection). Called once or more per
        round with the same request: decide from ``request`` and the regime's state only."""

    def annotate(
        self, oracle: SimulatedOracle, records: Sequence[ImageRef], request: LabelRequest
    ) -> list[ImageLabels]:
        """Have ``records`` labelled (a regime may mix kinds per image, e.g. a soft switch)."""

    def train(
        self,
        detector: Detector,
        pool: LabelPool,
        schedule: TrainSchedule,
        seed: int,
        round_index: int,
        progress: Progress | None = None,
        strategy: StrategyTraining = NO_STRATEGY_TRAINING,
    ) -> dict[str, float]:
        """Train ``detector`` for one round (``alrun.engine.train_round``, handing it
        ``strategy``: what the strategy trains with the detector); returns numbers recorded in
        metrics.json."""

    def check_data(self, splits: VisibleSplits) -> None:
        """Start-up check against the dataset's images (no ground truth), before any training."""

    def round_record(self, round_index: int) -> dict[str, Any] | None:
        """What the regime did this round (``round_XX/supervision.json``); None: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (kept small: it is rewritten into state.json every round)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class BaseRegime:
    """Defaults for a regime that asks for one kind every round and keeps no state."""

    label_kinds: tuple[str, ...] = ("box",)
    requires: frozenset[str] = frozenset()

    def label_kind(self, request: LabelRequest) -> str:
        return self.label_kinds[0]

    def annotate(
        self, oracle: SimulatedOracle, records: Sequence[ImageRef], request: LabelRequest
    ) -> list[ImageLabels]:
        return oracle.annotate(records, self.label_kind(request))

    def check_data(self, splits: VisibleSplits) -> None:
        """Start-up check against the dataset's images, before any training (e.g. uda: domain)."""

    def round_record(self, round_index: int) -> dict[str, Any] | None:
        """What the regime did this round (``round_XX/supervision.json``); None: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise AlrunError(
                f"state.json: regime state {sorted(state)} does not fit "
                f"{type(self).__name__}, which keeps none"
            )


def check_regime(regime: Any, oracle: SimulatedOracle) -> None:
    """Start-up check: ``regime`` is a Regime and the oracle can produce every kind it asks for."""
    if not isinstance(regime, Regime):
        raise AlrunError(
            f"supervision: _target_ must build a Regime (label_kinds, requires, label_kind, "
            f"annotate, train, check_data, round_record, state_dict, load_state_dict; "
            f"BaseRegime has defaults), got {type(regime).__name__}"
        )
    oracle.require(regime.label_kinds, f"supervision ({type(regime).__name__})")
