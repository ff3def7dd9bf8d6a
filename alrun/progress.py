"""Progress display: rich bars with round x/N and ETA, and a final results table.

``quiet=True`` (the default inside a Hydra multirun) turns bars and the table off; the loop
still logs one line per round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

log = logging.getLogger("alrun")


class Reporter:
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """Yields a ``progress(done, total)`` callback that drives one bar."""
        if self.quiet or not self.console.is_terminal:
            yield lambda done, total: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as bar:
            task_id = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task_id, completed=done, total=total)

            yield update

    def info(self, message: str) -> None:
        log.info(message)

    def table(self, rows: Sequence[dict[str, Any]], title: str) -> None:
        if self.quiet or not rows:
            return
        columns = ["round", "images", "boxes", "cost_s", "mAP", "mAP50", "mAR", "train_s"]
        table = Table(title=title)
        for name in columns:
            table.add_column(name, justify="right")
        for row in rows:
            table.add_row(*(_fmt(row[c]) for c in columns))
        self.console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
