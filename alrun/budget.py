"""Budget schedules: an initial set plus a per-round amount, in images, boxes or seconds.

Policy (documented in the README):
* ``initial`` larger than what the whole pool costs -> error before any training;
* zero/negative amounts, an unknown unit, a schedule list shorter than ``rounds`` -> error;
* a round asking for more than the pool has left takes what fits and the run stops cleanly
  after the next training round ("pool exhausted"), recorded in state.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alrun.errors import BudgetError

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
            if len(schedule) < rounds:
                raise BudgetError(
                    f"budget.per_round: {len(schedule)} amounts listed for {rounds} rounds"
                )
        return cls(float(initial), schedule, int(rounds), unit)

    def schedule(self) -> list[float]:
        if isinstance(self.per_round, tuple):
            return list(self.per_round[: self.rounds])
        return [self.per_round] * self.rounds

    def amount(self, round_index: int) -> float:
        """What the selection made after training round ``round_index`` may spend."""
        return self.schedule()[round_index]
