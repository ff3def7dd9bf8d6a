"""The embedded synthetic default: seeded, cached, in-bounds, imbalanced, with a domain shift."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alrun.data.synthetic import CLASSES, render_image, synthetic_dataset, synthetic_splits
from alrun.errors import DatasetError


def test_same_seed_same_images_and_boxes():
    a = render_image(np.random.default_rng(3), 128, "source")
    b = render_image(np.random.default_rng(3), 128, "source")
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def test_dataset_properties(tmp_path):
    data = synthetic_dataset(200, image_size=96, cache_dir=tmp_path)
    assert len(data) == 200 and data.classes == CLASSES
    counts = np.bincount(np.concatenate([r.labels for r in data.images]), minlength=4)
    # imbalanced 50/25/15/10 %: the order of frequencies is preserved
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0
    sizes = []
    for rec in data.images:
        assert rec.width == rec.height == 96 and 1 <= rec.num_boxes <= 5
        assert (rec.boxes[:, :2] >= 0).all() and (rec.boxes[:, 2:] <= 96).all()
        assert (rec.boxes[:, 2:] > rec.boxes[:, :2]).all()
        sizes.extend(
            np.sqrt((rec.boxes[:, 2] - rec.boxes[:, 0]) * (rec.boxes[:, 3] - rec.boxes[:, 1]))
        )
    assert min(sizes) < 12 and max(sizes) > 36  # small and large objects
    with Image.open(data.images[0].file) as img:
        assert img.size == (96, 96)


def test_materialised_once(tmp_path):
    first = synthetic_dataset(5, image_size=64, cache_dir=tmp_path)
    mtime = first.images[0].file.stat().st_mtime_ns
    again = synthetic_dataset(5, image_size=64, cache_dir=tmp_path)
    assert again.images[0].file == first.images[0].file
    assert again.images[0].file.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "synthetic").glob(".tmp-*"))


def test_domains_share_classes_but_not_style(tmp_path):
    splits = {
        d: synthetic_splits(30, 10, image_size=64, domain=d, cache_dir=tmp_path)
        for d in ("source", "target")
    }
    assert splits["source"].classes == splits["target"].classes
    assert {r.domain for r in splits["target"].pool.images} == {"target"}
    means = {
        d: np.mean([np.asarray(Image.open(r.file)).mean() for r in s.pool.images])
        for d, s in splits.items()
    }
    assert means["source"] - means["target"] > 40  # light vs dark backgrounds
    assert not set(splits["source"].pool.ids) & set(splits["source"].test.ids)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"domain": "night"}, "dataset.domain"),
        ({"num_images": 0}, "> 0"),
        ({"image_size": 8}, "dataset.image_size"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, match):
    params = {"num_images": 4, "cache_dir": tmp_path, **kwargs}
    with pytest.raises(DatasetError, match=match):
        synthetic_dataset(**params)


def test_max_images_caps_to_the_first_images_of_the_same_stream(tmp_path):
    full = synthetic_splits(num_pool=12, num_test=6, image_size=64, cache_dir=tmp_path)
    capped = synthetic_splits(
        num_pool=12,
        num_test=6,
        image_size=64,
        cache_dir=tmp_path,
        max_pool_images=5,
        max_test_images=2,
    )
    assert capped.pool.ids == full.pool.ids[:5] and capped.test.ids == full.test.ids[:2]
    for a, b in zip(capped.pool.images, full.pool.images[:5]):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        with Image.open(a.file) as ia, Image.open(b.file) as ib:
            assert np.array_equal(np.asarray(ia), np.asarray(ib))
    with pytest.raises(DatasetError, match=r"dataset\.max_test_images: expected a positive"):
        synthetic_splits(
            num_pool=4, num_test=2, image_size=64, cache_dir=tmp_path, max_test_images=0
        )
