"""Which optional capabilities (:mod:`alrun.detectors.base`) each torchvision model family has,
readable from a builder's return annotation without building the model."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

from alrun.detectors import base

#: the optional capabilities (``alrun.detectors.base``) of each supported model family
_DENSE = frozenset(
    {
        base.MC_DROPOUT,
        base.MIXTURE_HEAD,
        base.BOX_FEATURES,
        base.EMBEDDINGS,
        base.FEATURE_MAPS,
        base.FPN_FEATURES,
        base.TEACHER,
        base.FLIP_VIEWS,
        base.IMAGE_VIEWS,
        base.REBUILD,
        base.ANCHOR_QUALITY,
        base.HEAD_FEATURES,
        base.DENSE_HEAD,
    }
)
_TWO_STAGE = (
    _DENSE - {base.MIXTURE_HEAD, base.ANCHOR_QUALITY, base.HEAD_FEATURES, base.DENSE_HEAD}
) | {base.PROPOSALS}
#: SSD: levels of different widths (no box feature, no one-width feature maps), no dropout site
_SSD = frozenset({base.EMBEDDINGS, base.FEATURE_MAPS, base.TEACHER, base.IMAGE_VIEWS, base.REBUILD})


def family_capabilities(family: type) -> frozenset[str]:
    """What alrun implements for a torchvision model class (FCOS, RetinaNet, FasterRCNN, SSD)."""
    if issubclass(family, (FCOS, RetinaNet)):
        return _DENSE
    if issubclass(family, FasterRCNN):
        return _TWO_STAGE
    if issubclass(family, SSD):
        return _SSD
    return frozenset()


def annotated_family(builder: Any) -> type | None:
    """The model class a builder config's ``_target_`` says it returns (its annotation)."""
    from hydra.utils import get_method

    target = builder.get("_target_") if isinstance(builder, Mapping) else None
    if not isinstance(target, str):
        return None
    try:
        returned = typing.get_type_hints(get_method(target)).get("return")
    except Exception:  # noqa: BLE001 - an unknown target is reported when the model is built
        return None
    return returned if isinstance(returned, type) else None
