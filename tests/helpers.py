"""Test helpers: config composition and locating the shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("ALRUN_SHARED", REPO.parent / "shared")) / "datasets"


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        return compose(config_name="run", overrides=overrides or [], return_hydra_config=False)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not available")
    return path
