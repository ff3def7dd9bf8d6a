"""Fixtures of the detector tests (the MMDetection ones share ``tests/detectors/mmdet_helpers``)."""

from __future__ import annotations

import pytest

from alrun.data.synthetic import synthetic_dataset


@pytest.fixture(scope="module")
def data():
    """Six synthetic images at 96 px: what the MMDetection tests predict and train on (a module
    with other needs defines its own ``data``)."""
    return synthetic_dataset(6, image_size=96, split="mmdet-test")
