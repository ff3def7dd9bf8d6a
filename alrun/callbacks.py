"""Hydra callbacks: the one-line summary that ends every sweep (``alrun -m ...``).

Each failed job of a sweep leaves ``error.json`` in its directory (see :mod:`alrun.cli`); the
summary counts them, says where they are, and lets ``alrun`` exit 1 when every job failed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


@dataclass
class SweepOutcome:
    jobs: int = 0
    failed: list[Path] = field(default_factory=list)

    @property
    def all_failed(self) -> bool:
        return self.jobs > 0 and len(self.failed) == self.jobs


#: outcome of the last sweep run in this process (read by ``alrun.cli.main`` for its exit code)
LAST_SWEEP: SweepOutcome | None = None


class SweepSummary(Callback):
    """Counts failed jobs (``error.json``) and prints one line when the sweep ends."""

    def __init__(self) -> None:
        self.outcome = SweepOutcome()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.outcome = SweepOutcome()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.outcome.jobs += 1
        value = job_return._return_value
        if job_return.status == JobStatus.FAILED or (isinstance(value, dict) and "error" in value):
            self.outcome.failed.append(Path(config.hydra.runtime.output_dir) / "error.json")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SWEEP
        sweep_dir = Path(config.hydra.sweep.dir)
        outcome = self.outcome
        if outcome.jobs == 0:  # jobs ran in other processes (e.g. a cluster launcher)
            errors = sorted(sweep_dir.glob("**/error.json"))
            outcome = SweepOutcome(jobs=0, failed=errors)  # total unknown here
        LAST_SWEEP = outcome
        where = f"; errors in {sweep_dir}/*/error.json" if outcome.failed else ""
        total = f" of {outcome.jobs}" if outcome.jobs else ""
        print(
            f"alrun: sweep finished: {len(outcome.failed)}{total} jobs failed{where}",
            file=sys.stderr,
        )
