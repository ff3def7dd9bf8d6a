"""Budget schedules: an initial set plus a per-round amount, in images, boxes or seconds.

Policy (documented in the README):
* ``initial`` larger than what the whole pool costs -> error before any training;
* zero/negative amounts, an unknown unit, a schedule list whose length is not ``rounds`` -> error;
* a round asking for more than the pool has left takes what fits and the run stops cleanly
  after the next training round ("pool exhausted"), recorded in state.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alrun.errors import BudgetError

if TYPE_CHECKING:
    from alrun.oracle import SimulatedOracle
    from alrun.pool import LabelPool

UNITS = ("images", "boxes", "seconds")


@dataclass(frozen=True)
class Budget:
    initial: float
    per_round: float | tuple[float, ...]
    rounds: int
    unit: str = "images"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise BudgetError(f"budget.unit: expected one of {'|'.join(UNITS)}, got '{self.unit}'")
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
        initial: float,
        per_round: float | Sequence[float],
        rounds: int,
        unit: str = "images",
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
        return cls(float(initial), schedule, int(rounds), unit)

    def schedule(self) -> list[float]:
        if isinstance(self.per_round, tuple):
            return list(self.per_round[: self.rounds])
        return [self.per_round] * self.rounds

    def amount(self, round_index: int) -> float:
        """What the selection made after training round ``round_index`` may spend."""
        return self.schedule()[round_index]


def unit_cost(unit: str, oracle: SimulatedOracle, pool: LabelPool) -> Callable[[str], float]:
    """What labelling one pool image costs in the budget's ``unit`` (the oracle's prices)."""
    if unit == "images":
        return lambda image_id: 1.0
    if unit == "boxes":
        return lambda image_id: float(pool.record(image_id).num_boxes)
    return lambda image_id: oracle.cost(pool.record(image_id))


def check_initial_affordable(
    budget: Budget, cost_of: Callable[[str], float], pool: LabelPool
) -> None:
    """``budget.initial`` larger than the whole unlabelled pool costs is an error up front."""
    total = sum(cost_of(i) for i in pool.unlabelled_ids)
    if budget.initial > total:
        raise BudgetError(
            f"budget.initial: {budget.initial:g} {budget.unit} requested but the pool "
            f"'{pool.dataset.name}' only holds {total:g} {budget.unit} ({len(pool)} images)"
        )
