"""Test-time views: the scale view is bounded, so a typo cannot ask for a 196 GB tensor."""

from __future__ import annotations

import pytest
import torch

from alrun.detectors.views import (
    MAX_VIEW_PIXELS,
    MAX_VIEW_SCALE,
    apply_view,
    check_view_size,
    parse_view,
)
from alrun.errors import AlrunError


@pytest.mark.parametrize("spec", ["scale:1000", "scale:inf", "scale:nan", "scale:0"])
def test_scale_beyond_its_bound_is_a_one_line_error(spec):
    with pytest.raises(AlrunError, match=rf"strategy.scorer.views: view '{spec}' out of range"):
        parse_view(spec)


def test_scale_within_its_bound_still_works():
    view = parse_view(f"scale:{MAX_VIEW_SCALE}")
    image = torch.rand(3, 8, 6)
    out = apply_view(image, view)
    assert out.shape == image.shape


def test_the_scaled_size_of_the_largest_image_is_bounded():
    check_view_size(("hflip", "scale:2"), 1000, 1000)  # 4 M pixels: fine
    side = int((MAX_VIEW_PIXELS / 4) ** 0.5) + 1
    with pytest.raises(AlrunError, match=r"strategy.scorer.views: 'scale:2' .* pixels") as err:
        check_view_size(("hflip", "scale:2"), side, side)
    assert "\n" not in str(err.value)
