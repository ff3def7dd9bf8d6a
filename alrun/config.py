"""Compose alrun's Hydra config from Python (tests, notebooks, benchmarks)."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from alrun.rundir import RUN_CONTROL_KEYS, RunOptions

__all__ = ["RUN_CONTROL_KEYS", "RunOptions", "compose_config"]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config ``alrun <overrides>`` would run, without starting a Hydra app."""
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides or []))
