"""Budget schedules: an initial set plus a per-round amount, in images, boxes or seconds.

Policy (documented in the README):
* ``initial`` larger than what the whole pool costs -> error before any training;
* zero/negative amounts, an unknown unit, a schedule list whose length is not ``rounds`` -> error;
* a round asking for more than the pool has left takes what fits and the run stops cleanly
  after the next training round ("pool exhausted"), recorded in state.json;
* ``fill``: ``stop`` (default) takes images in ranked order until the first one that does not
  fit; ``skip`` skips it and keeps scanning (spends more, but drifts toward cheap images);
* every image costs something in every unit (:func:`image_cost`): an image with no object is
  one image, one box-equivalent (looking at it is not free) or the cost model's
  ``empty_image_s`` seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from alrun.errors import BudgetError
from alrun.params import NonNegativeInt, PositiveFloat

if TYPE_CHECKING:
    from alrun.data.dataset import ImageRecord, ImageRef
    from alrun.oracle import SimulatedOracle
    from alrun.pool import LabelPool

UNITS = ("images", "boxes", "seconds")
#: how a cost budget is filled in ranked order (see the module docstring)
FILL_POLICIES = ("stop", "skip")


def image_cost(
    unit: str, record: ImageRef | ImageRecord, oracle: SimulatedOracle, kind: str | None = None
) -> float:
    """What labelling ``record`` with label ``kind`` costs in ``unit``; never 0 (see the module
    docstring).

    Box budgets count the ground-truth boxes (the oracle's count: this is a simulation); the
    record is a reference, the oracle looks its truth up.
    """
    if unit == "images":
        return 1.0
    if unit == "boxes":
        return float(max(oracle.objects(record), 1))
    return oracle.cost(record, kind)


def cost_function(
    unit: str,
    oracle: SimulatedOracle,
    record_of: Callable[[str], ImageRef | ImageRecord],
    kind: str | None = None,
) -> Callable[[str], float]:
    """``image id -> cost in unit`` for a pool whose records ``record_of`` looks up."""
    return lambda image_id: image_cost(unit, record_of(image_id), oracle, kind)


@dataclass(frozen=True)
class Budget:
    initial: float
    per_round: float | tuple[float, ...]
    rounds: int
    unit: str = "images"
    fill: str = "stop"
    initial_ids: str | None = None  # a file listing the initial set (alrun.initial_set)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise BudgetError(f"budget.unit: expected one of {'|'.join(UNITS)}, got '{self.unit}'")
        if self.fill not in FILL_POLICIES:
            raise BudgetError(
                f"budget.fill: expected one of {'|'.join(FILL_POLICIES)}, got '{self.fill}'"
            )
        if self.rounds < 0:
            raise BudgetError(f"budget.rounds: expected >= 0, got {self.rounds}")
        if self.initial <= 0:
            raise BudgetError(f"budget.initial: expected > 0 {self.unit}, got {self.initial}")
        amounts = self.schedule()
        for r, amount in enumerate(amounts):
            if amount <= 0:
                raise BudgetError(f"budget.per_round: round {r} amount must be > 0, got {amount}")

    @classmethod
    def from_config(
        cls,
        initial: PositiveFloat,
        per_round: PositiveFloat | Sequence[PositiveFloat],
        rounds: NonNegativeInt,
        unit: Literal[UNITS] = "images",
        fill: Literal[FILL_POLICIES] = "stop",
        initial_ids: str | None = None,
    ) -> Budget:
        if isinstance(per_round, (int, float)):
            schedule: float | tuple[float, ...] = float(per_round)
        else:
            schedule = tuple(float(x) for x in per_round)
            if len(schedule) != rounds:  # extra amounts would be silently dropped
                raise BudgetError(
                    f"budget.per_round: {len(schedule)} amounts listed for {rounds} rounds "
                    f"(budget.rounds); list exactly {rounds}"
                )
        if initial_ids is not None and not str(initial_ids).strip():
            raise BudgetError("budget.initial_ids: expected a file path or null, got ''")
        return cls(float(initial), schedule, int(rounds), unit, fill, initial_ids)

    def schedule(self) -> list[float]:
        if isinstance(self.per_round, tuple):
            return list(self.per_round[: self.rounds])
        return [self.per_round] * self.rounds

    def amount(self, round_index: int) -> float:
        """What the selection made after training round ``round_index`` may spend."""
        return self.schedule()[round_index]


def check_initial_affordable(
    budget: Budget, cost_of: Callable[[str], float], pool: LabelPool
) -> None:
    """``budget.initial`` larger than the whole unlabelled pool costs is an error up front."""
    total = math.fsum(cost_of(i) for i in pool.unlabelled_ids)
    if budget.initial > total:
        raise BudgetError(
            f"budget.initial: {budget.initial:g} {budget.unit} requested but the pool "
            f"'{pool.dataset.name}' only holds {total:g} {budget.unit} ({len(pool)} images)"
        )
