"""Experiment loggers: ``logger=none`` (default) and ``logger=wandb`` (optional extra).

A logger sees the composed config at start, each completed round, and the end of the run.
It can never break a run: a missing ``wandb`` package, a missing API key, or any error while
logging is reported once as a warning and the logger turns itself off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from alrun.params import NonNegativeInt

log = logging.getLogger("alrun")


class NullLogger:
    """``logger=none``: logs nothing (run directories already hold every number)."""

    def start(self, config: dict[str, Any], run_dir: Path, name: str) -> None:
        pass

    def log_round(self, row: dict[str, Any], metrics: dict[str, Any], images: list[Path]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """``logger=wandb``: per-round metrics, the learning curve and the selected images.

    ``mode``: ``online`` | ``offline`` | ``disabled`` | null (null: wandb's own default,
    e.g. the ``WANDB_MODE`` environment variable). Files go under ``<run dir>/wandb``.
    """

    def __init__(
        self,
        project: str = "alrun",
        entity: str | None = None,
        mode: Literal["online", "offline", "disabled"] | None = None,
        tags: Sequence[str] = (),
        max_images: NonNegativeInt = 8,
    ):
        self.project, self.entity, self.mode = project, entity, mode
        self.tags, self.max_images = list(tags), max_images
        self._wandb: Any = None
        self._run: Any = None

    def _disable(self, what: str, err: BaseException) -> None:
        log.warning(
            "logger=wandb: %s failed (%s: %s); continuing without wandb",
            what,
            type(err).__name__,
            err,
        )
        self._run = None

    def start(self, config: dict[str, Any], run_dir: Path, name: str) -> None:
        try:
            import wandb
        except ImportError:
            log.warning(
                "logger=wandb: wandb is not installed (pip install 'alrun[wandb]'); not logging"
            )
            return
        try:
            self._wandb = wandb
            self._run = wandb.init(
                project=self.project,
                entity=self.entity,
                mode=self.mode,
                name=name,
                tags=self.tags,
                config=config,
                dir=str(run_dir),
                reinit="finish_previous",
            )
            for axis in ("images", "boxes", "cost_s"):
                self._run.define_metric(f"by_{axis}/*", step_metric=axis)
        except Exception as err:  # noqa: BLE001 - no API key, no network, bad entity...
            self._disable("wandb.init", err)

    def log_round(self, row: dict[str, Any], metrics: dict[str, Any], images: list[Path]) -> None:
        if self._run is None:
            return
        try:
            data: dict[str, Any] = dict(row)
            for key in ("mAP", "mAP50", "mAR"):
                for axis in ("images", "boxes", "cost_s"):
                    data[f"by_{axis}/{key}"] = row[key]
            per_class = metrics.get("per_class") or {}
            for name, values in per_class.items():
                for kind, value in (values or {}).items():
                    if value is not None:
                        data[f"per_class/{kind}/{name}"] = value
            impact = metrics.get("error_impact_AP50") or {}
            data.update({f"error_impact/{k}": v for k, v in impact.items()})
            shown = [p for p in images if Path(p).is_file()][: self.max_images]
            if shown:
                data["selected_images"] = [self._wandb.Image(str(p)) for p in shown]
            self._run.log(data, step=int(row["round"]), commit=True)
        except Exception as err:  # noqa: BLE001
            self._disable("logging a round", err)

    def finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as err:  # noqa: BLE001
            self._disable("wandb.finish", err)
        self._run = None
