"""Hydra callbacks: the one-line summary that ends every sweep (``alrun -m ...``), and a
writable-output-directory check that runs before Hydra creates it.

Each failed job of a sweep leaves ``error.json`` in its directory (see :mod:`alrun.cli`); the
summary counts them, says where they are, and lets ``alrun`` exit 1 when every job failed. It
also counts the runs whose results.csv has a collapsed or floor-level round
(:mod:`alrun.diagnostics`): a sweep of such runs finished, but its comparisons mean nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from alrun.diagnostics import FLOOR_MAP50, RunHealth, read_health
from alrun.errors import AlrunError
from alrun.rundir import RunDir, check_run_names


@dataclass
class SweepOutcome:
    jobs: int = 0
    failed: list[Path] = field(default_factory=list)
    health: list[RunHealth] = field(default_factory=list)  # of the jobs that wrote results

    def health_text(self) -> str:
        """``; k of n runs had collapsed rounds[, m more floor-level ...]`` or ``""``."""
        if not self.health:
            return ""
        collapsed = sum(bool(h.collapsed) for h in self.health)
        floor_only = sum(bool(h.floor) and not h.collapsed for h in self.health)
        text = f"; {collapsed} of {len(self.health)} runs had collapsed rounds"
        if floor_only:
            text += f", {floor_only} more floor-level ones (test mAP50 < {FLOOR_MAP50:g})"
        if collapsed or floor_only:
            text += ": their comparisons are marked 'not comparable' in the report"
        return text

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
            return
        health = read_health(Path(config.hydra.runtime.output_dir) / "results.csv")
        if health is not None and health.rounds:
            self.outcome.health.append(health)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SWEEP
        sweep_dir = Path(config.hydra.sweep.dir)
        outcome = self.outcome
        if outcome.jobs == 0:  # jobs ran in other processes (e.g. a cluster launcher)
            errors = sorted(sweep_dir.glob("**/error.json"))
            health = [read_health(p) for p in sorted(sweep_dir.glob("**/results.csv"))]
            outcome = SweepOutcome(  # total unknown here
                jobs=0, failed=errors, health=[h for h in health if h and h.rounds]
            )
        LAST_SWEEP = outcome
        where = f"; errors in {sweep_dir}/*/error.json" if outcome.failed else ""
        total = f" of {outcome.jobs}" if outcome.jobs else ""
        print(
            f"alrun: sweep finished: {len(outcome.failed)}{total} jobs failed{where}"
            f"{outcome.health_text()}",
            file=sys.stderr,
        )


class OutputDirCheck(Callback):
    """Checks of the output directory before Hydra creates it (alrun's code runs after that),
    each one line and exit 2: names that would put it outside the output root, a folder of
    the user's that is not a run directory (left untouched), one that cannot be written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        _fail_on_error(check_run_names, config)
        _fail_on_error(RunDir(run_dir).check_ours, f"{config.hydra.job.name}.log")
        _check_writable(run_dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _fail_on_error(check_run_names, config)
        _fail_on_error(check_sweep_dir, sweep_dir)
        _check_writable(sweep_dir, "hydra.sweep.dir")


def check_sweep_dir(path: Path) -> None:
    """A sweep goes into a new or empty folder, or one an earlier sweep made (Hydra's sweeper
    writes ``multirun.yaml`` there first); any other folder is the user's and left untouched."""
    if not path.is_dir() or (path / "multirun.yaml").is_file():
        return
    held = sorted(p.name for p in path.iterdir())
    if held:
        shown = ", ".join(held[:5]) + (f", … {len(held) - 5} more" if held[5:] else "")
        raise AlrunError(
            f"{path}: not an alrun sweep directory (holds {shown}); choose another "
            "hydra.sweep.dir or empty it"
        )


def _fail_on_error(check: Callable[..., None], *args: Any) -> None:
    try:
        check(*args)
    except AlrunError as err:
        from alrun.cli import print_error  # cli imports this module

        print_error(str(err))
        sys.exit(2)


def _check_writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
        reason = "not writable"
    except OSError as err:
        writable, reason = False, err.strerror or type(err).__name__
    if not writable:
        from alrun.cli import print_error  # cli imports this module

        print_error(f"{key}: cannot create or write {path.absolute()} ({reason})")
        sys.exit(2)
