"""The one start-up check between what a strategy and a regime require and what the detector
declares (capability names of :mod:`alrun.detectors.base`), and the detector set-up it implies.

``build_experiment`` calls :func:`check_capabilities` on the configs, before any dataset is read
or model built: the detector's capabilities come from its class and config
(``declared_capabilities``), so the refusal is one line naming the strategy or regime, the
capability and the shipped detector configs that have it. The matrix of
``docs/reference/capabilities.md`` is computed by the same functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from alrun.detectors import base
from alrun.errors import AlrunError
from alrun.types import Needs

DETECTOR_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detector"


@runtime_checkable
class DeclaresCapabilities(Protocol):
    """A detector class that can say, from its config alone, which capabilities it has."""

    @staticmethod
    def declared_capabilities(config: Any) -> frozenset[str] | None:
        """None: known only once the model is built."""


def needs_capabilities(needs: Needs) -> frozenset[str]:
    """What the detector itself must output for ``needs`` (ensembles are backend-independent:
    :class:`alrun.detectors.passes.Ensemble` builds fresh members of any detector)."""
    wanted = {
        base.MC_DROPOUT: needs.head_dropout > 0,
        base.MIXTURE_HEAD: needs.mixture_density > 0,
        base.PROPOSALS: needs.proposals,
        base.BOX_FEATURES: needs.feats,
        base.HEAD_FEATURES: needs.head_feats,
        base.EMBEDDINGS: needs.embedding or needs.labelled_embeddings,
        base.IMAGE_VIEWS: bool(needs.augment),
        base.GRADIENTS: needs.grads,
    }
    return frozenset(name for name, asked in wanted.items() if asked)


def check_passes(needs: Needs, who: str) -> None:
    """One kind of extra passes at a time: their results share ``Detections.passes``."""
    kinds = [needs.head_dropout > 0, needs.ensemble > 0, bool(needs.augment)]
    if sum(kinds) > 1:
        raise AlrunError(
            f"{who}: one kind of extra passes at a time (MC dropout, ensemble or test-time views)"
        )
    if needs.head_dropout > 0 and needs.passes < 1:
        raise AlrunError(f"{who}: strategy.scorer.passes: expected >= 1, got {needs.passes}")


def detector_config_capabilities(config: Mapping[str, Any] | DictConfig) -> frozenset[str] | None:
    """The capabilities a detector config declares, without building it (None: unknown)."""
    target = config.get("_target_")
    try:
        cls = get_class(target) if isinstance(target, str) else None
    except Exception:  # noqa: BLE001 - a bad _target_ is reported when the detector is built
        return None
    if not isinstance(cls, type) or not issubclass(cls, DeclaresCapabilities):
        return None
    return cls.declared_capabilities(config)


def _detector_file(path: Path) -> DictConfig:
    """A shipped detector config with its ``defaults`` (``base/...@_here_``) merged in."""
    cfg = OmegaConf.load(path)
    merged = OmegaConf.create()
    for item in cfg.pop("defaults", []):
        if isinstance(item, str) and item != "_self_":
            merged = OmegaConf.merge(
                merged, _detector_file(path.parent / f"{item.split('@')[0]}.yaml")
            )
    return OmegaConf.merge(merged, cfg)


@functools.lru_cache(maxsize=1)
def shipped_detectors() -> dict[str, frozenset[str]]:
    """``detector=<name>`` -> declared capabilities, for every shipped detector config."""
    found = {}
    for path in sorted(DETECTOR_CONFIGS.glob("*.yaml")):
        declared = detector_config_capabilities(_detector_file(path))
        if declared is not None:
            found[path.stem] = declared
    return found


def detectors_with(capability: str) -> list[str]:
    return [name for name, caps in shipped_detectors().items() if capability in caps]


def refusal(who: str, missing: Iterable[str], detector: str) -> str:
    """The one line for a missing capability (the first missing one; they are all listed)."""
    missing = sorted(missing)
    first = missing[0]
    having = detectors_with(first)
    others = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
    return (
        f"{who}: needs {first} ({base.CAPABILITIES.get(first, first)}), which {detector} "
        f"does not have{others}; detectors that have it: "
        f"{', '.join(f'detector={n}' for n in having) or 'none yet'}"
    )


def missing_capabilities(
    requires: Iterable[str], declared: frozenset[str] | None
) -> frozenset[str]:
    return frozenset() if declared is None else frozenset(requires) - declared


def first_refusal(
    requirements: Iterable[tuple[str, frozenset[str]]],
    declared: frozenset[str] | None,
    detector: str,
) -> str | None:
    """The refusal of the first ``(who, requires)`` the ``declared`` capabilities miss."""
    for who, requires in requirements:
        missing = missing_capabilities(requires, declared)
        if missing:
            return refusal(who, missing, detector)
    return None


def check_capabilities(
    requirements: Iterable[tuple[str, frozenset[str]]],
    declared: frozenset[str] | None,
    detector: str,
) -> None:
    """Refuse the first ``(who, requires)`` the detector's ``declared`` capabilities miss
    (``who``: the strategy's part, e.g. ``strategy=ppal (strategy.selector)``, or the regime)."""
    message = first_refusal(requirements, declared, detector)
    if message is not None:
        raise AlrunError(message)


def _identity(config: Mapping[str, Any] | DictConfig) -> tuple:
    builder = config.get("builder") or {}
    return (config.get("_target_"), builder.get("_target_"), builder.get("config"))


@functools.lru_cache(maxsize=1)
def _shipped_identities() -> dict[tuple, list[str]]:
    found: dict[tuple, list[str]] = {}
    for path in sorted(DETECTOR_CONFIGS.glob("*.yaml")):
        found.setdefault(_identity(_detector_file(path)), []).append(path.stem)
    return found


def detector_label(config: Mapping[str, Any] | DictConfig, choice: str | None = None) -> str:
    """``detector=<option>``: the option chosen on the command line, else the one shipped
    config with the same model (class, builder, mmdet config), else the detector's class."""
    names = [choice] if choice else _shipped_identities().get(_identity(config), [])
    if len(names) == 1:
        return f"detector={names[0]}"
    return f"detector {str(config.get('_target_', '?')).rsplit('.', 1)[-1]}"
