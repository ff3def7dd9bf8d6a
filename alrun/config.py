"""Compose alrun's Hydra config from Python, and the typed run-control options of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from alrun.errors import AlrunError

#: config keys that only steer how a run is executed: they may change when a run is resumed
RUN_CONTROL_KEYS = ("resume", "quiet", "keep_checkpoints", "save_predictions")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config ``alrun <overrides>`` would run, without starting a Hydra app."""
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides or []))


@dataclass(frozen=True)
class RunOptions:
    """Run control, checked once before any work starts (``alrun resume=... quiet=...``).

    ``resume``: ``"auto"`` continues a run found in the output dir, ``True`` requires one,
    ``False`` refuses one. ``quiet``: ``None`` means quiet inside sweeps only.
    """

    resume: str | bool = "auto"
    quiet: bool | None = None
    keep_checkpoints: str = "last"
    save_predictions: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise AlrunError(f"resume: expected auto|true|false, got {self.resume!r}")
        if self.quiet is not None and not isinstance(self.quiet, bool):
            raise AlrunError(f"quiet: expected true|false|null, got {self.quiet!r}")
        if self.keep_checkpoints not in ("last", "all"):
            raise AlrunError(f"keep_checkpoints: expected last|all, got {self.keep_checkpoints!r}")
        if not isinstance(self.save_predictions, bool):
            raise AlrunError(
                f"save_predictions: expected true|false, got {self.save_predictions!r}"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any]) -> RunOptions:
        return cls(
            resume=cfg.get("resume", "auto"),
            quiet=cfg.get("quiet", None),
            keep_checkpoints=cfg.get("keep_checkpoints", "last"),
            save_predictions=cfg.get("save_predictions", False),
        )
