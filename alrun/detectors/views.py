"""Test-time augmentation views: transform an image, and map the boxes found back.

A view is named by a string (what ``strategy.scorer.views`` lists):

* ``hflip``: horizontal flip;
* ``scale:<s>``: resize by ``s``; the canvas keeps the original size (``s < 1``: padded right
  and bottom with grey 0.5, ``s > 1``: cropped to the top-left), so detectors that resize every
  input to a fixed size still see the objects at another scale;
* ``jitter:<s>``: colour jitter, brightness x (1 + s) then contrast x (1 - s) (deterministic);
* ``noise:<sigma>``: additive Gaussian pixel noise of std ``sigma`` (images in [0, 1]), drawn
  from a generator seeded by the image id, so a view is the same whatever the batch.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from alrun.errors import AlrunError

VIEW_KINDS = ("hflip", "scale", "jitter", "noise")
#: the scale view resizes the whole image before cropping: bounded, so that a typo
#: (``scale:1000``) is a one-line error, not a 196 GB allocation
MAX_VIEW_SCALE = 4.0
#: the most pixels a scaled view may have (64 M: a 768 MB float32 RGB tensor), checked against
#: the dataset's largest pool image at start-up (:func:`check_view_size`)
MAX_VIEW_PIXELS = 64 * 2**20
_EXPECTED = (
    f"hflip | scale:<factor in (0, {MAX_VIEW_SCALE:g}]> | jitter:<strength in [0, 1)> | "
    "noise:<sigma > 0>"
)


@dataclass(frozen=True)
class View:
    kind: str
    value: float = 0.0


def parse_view(spec: str, key: str = "strategy.scorer.views") -> View:
    """``"scale:0.8"`` -> ``View("scale", 0.8)``; a bad spec is a one-line error."""
    kind, _, value = str(spec).partition(":")
    if kind not in VIEW_KINDS:
        raise AlrunError(f"{key}: unknown view '{spec}' (expected {_EXPECTED})")
    if kind == "hflip":
        if value:
            raise AlrunError(f"{key}: 'hflip' takes no value, got '{spec}'")
        return View("hflip")
    try:
        number = float(value)
    except ValueError:
        raise AlrunError(f"{key}: view '{spec}' needs a number (expected {_EXPECTED})") from None
    ok = (
        math.isfinite(number)
        and {
            "scale": 0 < number <= MAX_VIEW_SCALE,
            "jitter": 0 <= number < 1,
            "noise": number > 0,
        }[kind]
    )
    if not ok:
        raise AlrunError(f"{key}: view '{spec}' out of range (expected {_EXPECTED})")
    return View(kind, number)


def check_view_size(
    views: tuple[str, ...], width: int, height: int, key: str = "strategy.scorer.views"
) -> None:
    """Start-up check: every scale view of a ``width`` x ``height`` image (the dataset's
    largest) stays within :data:`MAX_VIEW_PIXELS`."""
    for spec in views:
        view = parse_view(spec, key)
        if view.kind != "scale":
            continue
        w, h = round(width * view.value), round(height * view.value)
        if w * h > MAX_VIEW_PIXELS:
            raise AlrunError(
                f"{key}: '{spec}' makes the dataset's largest image ({width}x{height}) "
                f"{w}x{h} = {w * h:,} pixels; expected at most {MAX_VIEW_PIXELS:,}: use a "
                "smaller scale"
            )


def apply_view(image: Tensor, view: View, image_id: str = "") -> Tensor:
    """The view of ``image`` (3, H, W) in [0, 1], same size."""
    if view.kind == "hflip":
        return image.flip(-1)
    if view.kind == "scale":
        h, w = image.shape[-2:]
        size = (max(1, round(h * view.value)), max(1, round(w * view.value)))
        resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        canvas = torch.full_like(image, 0.5)
        hh, ww = min(h, size[0]), min(w, size[1])
        canvas[:, :hh, :ww] = resized[:, :hh, :ww]
        return canvas
    if view.kind == "jitter":
        out = TF.adjust_brightness(image, 1.0 + view.value)
        return TF.adjust_contrast(out, 1.0 - view.value).clamp(0.0, 1.0)
    if view.kind == "noise":
        seed = zlib.crc32(f"{image_id}|{view.value}".encode())
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(image.shape, generator=gen).to(image.device)
        return (image + view.value * noise).clamp(0.0, 1.0)
    raise ValueError(f"unknown view {view}")


def boxes_to_original(boxes: Tensor, view: View, size: tuple[int, int]) -> Tensor:
    """Map xyxy ``boxes`` found in the view back to the original image of ``size`` (H, W)."""
    h, w = size
    if view.kind == "hflip":
        return torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if view.kind == "scale":
        out = boxes / view.value
        out[:, 0::2] = out[:, 0::2].clamp(0, w)
        out[:, 1::2] = out[:, 1::2].clamp(0, h)
        return out
    return boxes
