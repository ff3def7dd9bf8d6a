"""Health checks on a round's model, so a collapsed model is never carried on silently.

A model that collapsed (e.g. training from scratch that diverged or whose box regression died)
still "selects" images in the next round - with a dead model - which silently wrecks every
paired comparison of that seed. The loop records the verdict in metrics.json and results.csv
and warns in the log.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def collapse_reason(
    map50: float,
    train_stats: Mapping[str, float],
    min_map50: float = 0.01,
    min_loss_drop: float = 0.05,
) -> str | None:
    """Why this round's model looks collapsed, or None when it looks healthy.

    Collapsed means either the test mAP50 is below ``min_map50`` (no better than detecting
    nothing), or the training loss ended less than ``min_loss_drop`` (relative) below where it
    started - checked only for training from random init, where the loss must fall.
    """
    reasons = []
    if map50 < min_map50:
        reasons.append(f"test mAP50 {map50:.3f} < {min_map50:g}")
    first, final = train_stats.get("first_loss"), train_stats.get("final_loss")
    if train_stats.get("from_scratch") and first is not None and final is not None:
        if not final < first * (1.0 - min_loss_drop):
            reasons.append(f"training loss did not decrease ({first:.3f} -> {final:.3f})")
    return "; ".join(reasons) or None


#: Below this test mAP50 a round's model is "at the floor": it detects almost nothing, so its
#: selections are close to arbitrary and a difference between two such models is noise, however
#: small its interval (``collapse_reason`` flags the even lower 0.01 in the loop's log).
FLOOR_MAP50 = 0.05


@dataclass(frozen=True)
class RunHealth:
    """Which rounds of one run had a collapsed (loop's flag) or floor-level (mAP50) model."""

    rounds: int
    collapsed: tuple[int, ...]
    floor: tuple[int, ...]

    @property
    def flagged(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.collapsed) | set(self.floor)))

    @property
    def healthy(self) -> bool:
        return not self.flagged


def run_health(rows: Sequence[Mapping[str, float]], floor_map50: float = FLOOR_MAP50) -> RunHealth:
    """The health of a run from its results.csv rows (older files without ``collapsed`` or
    ``mAP50`` columns count as healthy on that criterion)."""
    collapsed = tuple(r for r, row in enumerate(rows) if float(row.get("collapsed", 0) or 0) > 0)
    floor = tuple(
        r for r, row in enumerate(rows) if "mAP50" in row and float(row["mAP50"]) < floor_map50
    )
    return RunHealth(len(rows), collapsed, floor)


def read_health(results_csv: Path, floor_map50: float = FLOOR_MAP50) -> RunHealth | None:
    """:func:`run_health` of a results.csv, or None when it is absent or unreadable."""
    try:
        with results_csv.open(newline="", encoding="utf-8", errors="replace") as handle:
            rows = [
                {k: float(v) for k, v in row.items() if k and v not in (None, "")}
                for row in csv.DictReader(handle)
            ]
    except (OSError, ValueError):
        return None
    return run_health(rows, floor_map50)


def rounds_text(rounds: Sequence[int], total: int) -> str:
    """``0, 2`` / ``all`` / ``–`` for a list of round indices out of ``total`` rounds."""
    if not rounds:
        return "–"
    if len(rounds) == total:
        return "all"
    return ", ".join(map(str, rounds))
