"""Hydra callback: at the end of every ``alrun -m`` sweep, print the comparison table and write
the report into ``<sweep dir>/report``. Nothing here may fail the sweep: problems are logged.

A job that raised a bug (not a one-line user error, which the CLI already records) gets an
``error.json`` from :meth:`SweepReport.on_job_end`, so the report lists it as failed.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from alrun.errors import AlrunError
from alrun.io import write_json

log = logging.getLogger("alrun")


class SweepReport(Callback):
    def __init__(self, enabled: bool = True, group_by: str = "strategy.name", metric: str = "mAP"):
        self.enabled = enabled
        self.group_by = group_by
        self.metric = metric

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            out_dir = Path(config.hydra.runtime.output_dir)
            if not (out_dir / "error.json").exists():
                err = job_return._return_value
                message = "".join(traceback.format_exception_only(type(err), err)).strip()
                write_json(out_dir / "error.json", {"error": message})
        except Exception as err:  # noqa: BLE001 - never fail a sweep from a callback
            log.warning("sweep report: could not record the failed job (%s)", err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from alrun.report.cli import build, print_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            run_set, comparison, files = build(
                [sweep_dir], sweep_dir / "report", self.group_by, self.metric
            )
            print_summary(run_set, comparison, files)
        except AlrunError as err:
            log.warning("alrun-report: %s", err)
        except Exception as err:  # noqa: BLE001 - a report bug must not turn a sweep red
            log.warning("alrun-report failed on %s: %s: %s", sweep_dir, type(err).__name__, err)
