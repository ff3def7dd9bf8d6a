"""Pretrained weights: local backbone files loaded where torchvision would load its download,
and the offline message that says which file ``pretrained=true`` needs."""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from alrun.errors import AlrunError


def backbone_weights_enum(builder: Callable[..., nn.Module]) -> Any:
    """The torchvision ``WeightsEnum`` class of a builder's ``weights_backbone``, or None."""
    fn = getattr(builder, "func", builder)
    try:
        hint = typing.get_type_hints(fn).get("weights_backbone")
    except Exception:  # noqa: BLE001 - introspection is best effort, for a message only
        return None
    for arg in typing.get_args(hint) or (hint,):
        if isinstance(arg, type) and hasattr(arg, "DEFAULT"):
            return arg
    return None


def offline_message(builder: Callable[..., nn.Module], err: BaseException) -> str:
    """Say which file ``pretrained=true`` needs, where torchvision looks for it, and the
    offline alternative, instead of a bare ``urlopen`` error."""
    enum = backbone_weights_enum(builder)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if enum is None:
        what = "the ImageNet backbone weights"
    else:
        url = enum.DEFAULT.url
        what = f"{url.rsplit('/', 1)[-1]} ({url})"
    return (
        f"detector.pretrained=true: could not download {what}: {err}. Put that file in {cache}/ "
        "or pass a local copy with detector.pretrained_backbone=<path> (and pretrained=false)"
    )


def read_state_dict(path: str, key: str) -> dict[str, Tensor]:
    """A state_dict from a file; unwraps ``{"state_dict"|"model": ...}`` and ``module.``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise AlrunError(f"{key}: cannot read '{path}' as a torch state_dict ({err})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise AlrunError(f"{key}: '{path}' holds {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_error(err: RuntimeError) -> str:
    """The gist of a ``load_state_dict`` error: its first two lines, shortened."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]


def build_with_local_backbone(
    builder: Callable[..., nn.Module], kwargs: dict[str, Any], path: str
) -> nn.Module:
    """Build as ``weights_backbone="DEFAULT"`` would, but read the weights from ``path``.

    torchvision's builders call ``WeightsEnum.get_state_dict`` to download; patching that one
    call for the duration of the build makes torchvision load the local file with its own
    strict ``load_state_dict`` and build the pretrained variant (frozen BatchNorm, trainable
    layers) exactly as online. Builders without published backbones (tiny_fcos) get the file
    loaded strictly into ``model.backbone``.
    """
    from torchvision.models._api import WeightsEnum

    state = read_state_dict(path, "detector.pretrained_backbone")
    if backbone_weights_enum(builder) is None:
        model = builder(**kwargs)
        target = model.backbone
    else:
        with mock.patch.object(WeightsEnum, "get_state_dict", lambda *_a, **_k: state):
            try:
                return builder(**{**kwargs, "weights_backbone": "DEFAULT"})
            except RuntimeError as err:
                raise AlrunError(
                    f"detector.pretrained_backbone: {path} does not fit this backbone "
                    f"({_load_error(err)})"
                ) from None
    try:
        target.load_state_dict(state)
    except RuntimeError as err:
        raise AlrunError(
            f"detector.pretrained_backbone: {path} does not fit this backbone ({_load_error(err)})"
        ) from None
    return model


def build_with_weights(
    builder: Callable[..., nn.Module],
    kwargs: dict[str, Any],
    pretrained: bool | str,
    pretrained_backbone: str | None,
) -> nn.Module:
    """The model with the weights asked for: ImageNet backbone downloaded (``pretrained=true``)
    or from a local file, then a whole-model checkpoint when ``pretrained`` is a path."""
    if pretrained is True:
        try:
            model = builder(**{**kwargs, "weights_backbone": "DEFAULT"})
        except OSError as err:  # urllib's URLError is an OSError
            raise AlrunError(offline_message(builder, err)) from None
    elif pretrained_backbone is not None:
        model = build_with_local_backbone(builder, kwargs, pretrained_backbone)
    else:
        model = builder(**kwargs)
    if isinstance(pretrained, str):
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise AlrunError(
                f"detector.pretrained: {pretrained} does not fit this model ({first})"
            ) from None
    return model
