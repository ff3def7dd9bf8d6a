"""Which strategy and which supervision regime runs on which detector, from the declared
capabilities alone (no model is built, mmdet need not be installed).

Every shipped ``strategy=`` and ``supervision=`` config is composed and its strategy or regime
instantiated; what it ``requires`` is compared with what each detector config of
:data:`MATRIX_DETECTORS` declares, by the same functions ``build_experiment`` refuses a run with
(:mod:`alrun.detectors.capabilities`). ``scripts/docs_pages.py`` writes the result to
``docs/reference/capabilities.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from alrun.detectors.capabilities import (
    detector_config_capabilities,
    detector_label,
    first_refusal,
    missing_capabilities,
)
from alrun.resolvers import register_resolvers

CONFIGS = Path(__file__).resolve().parent / "configs"

#: the detectors of the matrix: tiny FCOS, the ImageNet-pretrained Lite0 FCOS of the real-photo
#: presets, torchvision RetinaNet and Faster R-CNN (the CPU-sized mobilenet one), mmdet
#: RetinaNet and Faster R-CNN
MATRIX_DETECTORS = (
    "tiny_fcos",
    "lite0_fcos",
    "retinanet_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "mmdet_retinanet_r50",
    "mmdet_faster_rcnn_r50",
)

#: small sizes for composing (nothing is read or built, but a regime's own source data is)
_SMALL = ("experiment=smoke",)
#: options that only compose inside their experiment (uda: the target domain) or beside
#: their partner (box-level queries)
_EXPERIMENT = {
    "uda": ("experiment=uda_synthetic", "supervision.source.num_pool=20"),
    # box-level queries come as a pair, bought by the box
    "compas": (*_SMALL, "supervision=box_level", "budget.unit=boxes"),
    "box_level": (*_SMALL, "strategy=compas", "budget.unit=boxes"),
}


@dataclass(frozen=True)
class Cell:
    """One (strategy or regime, detector) pair; ``refusal`` is None when it runs."""

    group: str  # strategy | supervision
    option: str
    detector: str
    missing: frozenset[str]
    refusal: str | None

    @property
    def runs(self) -> bool:
        return self.refusal is None


def overrides(group: str, option: str) -> list[str]:
    """The overrides a cell is composed with (``build_experiment`` in the test uses them)."""
    return [*_EXPERIMENT.get(option, _SMALL), f"{group}={option}"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _requires(group: str, option: str) -> list[tuple[str, frozenset[str]]]:
    """``(who, capabilities)`` of a shipped strategy's parts or of a regime (instantiated from
    its config), named as ``build_experiment`` names them."""
    register_resolvers()  # the presets' ${alrun_strategy_name:...}
    cfg = compose(config_name="run", overrides=overrides(group, option))
    if group == "strategy":
        built = instantiate(cfg.strategy)
        return [(f"{group}={option} ({part})", c) for part, c in built.requirement_parts()]
    return [(f"{group}={option}", frozenset(instantiate(cfg.supervision).requires))]


@functools.cache
def detector_capabilities(detectors: tuple[str, ...] = MATRIX_DETECTORS) -> dict:
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        configs = {
            d: compose(config_name="run", overrides=[f"detector={d}"]).detector for d in detectors
        }
    return {d: (detector_config_capabilities(c), detector_label(c, d)) for d, c in configs.items()}


def cells(detectors: Sequence[str] = MATRIX_DETECTORS) -> tuple[Cell, ...]:
    """Every (strategy, detector) and (regime, detector) cell of the matrix."""
    return _cells(tuple(detectors))


@functools.cache
def _cells(detectors: tuple[str, ...]) -> tuple[Cell, ...]:
    declared = detector_capabilities(detectors)
    found = []
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        for group in ("strategy", "supervision"):
            for option in options(group):
                parts = _requires(group, option)
                requires = frozenset().union(*(c for _, c in parts))
                for detector in detectors:
                    capabilities, label = declared[detector]
                    missing = missing_capabilities(requires, capabilities)
                    text = first_refusal(parts, capabilities, label)
                    found.append(Cell(group, option, detector, missing, text))
    return tuple(found)


def counts(found: Sequence[Cell]) -> dict[str, dict[str, int]]:
    """Per detector: how many strategies and regimes run (of how many)."""
    out: dict[str, dict[str, int]] = {}
    for cell in found:
        row = out.setdefault(cell.detector, {"strategy": 0, "supervision": 0, "cells": 0})
        row["cells"] += 1
        row[cell.group] += int(cell.runs)
    return out
