"""The frozen-backbone feature cache: hits equal fresh computation, entries live under the cache
dir, and an entry written by another backbone or transform is detected by its key and rebuilt."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from alrun.data.images import load_image
from alrun.data.synthetic import synthetic_dataset
from alrun.detectors import feature_cache
from alrun.detectors.feature_cache import FeatureCache
from alrun.detectors.lite0 import lite0_fcos
from alrun.detectors.torchvision import TorchvisionDetector


@pytest.fixture(autouse=True)
def empty_memory():
    feature_cache.clear_memory()
    yield
    feature_cache.clear_memory()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    data = synthetic_dataset(3, image_size=64, split="det-test")
    return torch.stack([load_image(r) for r in data.images])


def _backbone(tmp_path, frozen_stages: int = 7, **kw):
    model = lite0_fcos(3, image_size=64, frozen_stages=frozen_stages, cache_dir=str(tmp_path), **kw)
    return model.backbone


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)  # batched vs single


def test_second_fetch_hits_and_equals_fresh_features(tmp_path, batch):
    backbone = _backbone(tmp_path)
    first = backbone.frozen_features(batch)
    cache = backbone.cache
    assert (cache.hits, cache.misses) == (0, 3)
    files = sorted((tmp_path / "lite0").glob("*/*.pt"))
    assert len(files) == 3  # one atomic file per image, under the cache dir only
    feature_cache.clear_memory()  # read back from disk
    again = backbone.frozen_features(batch)
    assert (cache.hits, cache.misses, cache.rebuilt) == (3, 3, 0)
    _same(again, first)
    _same(again, backbone._prefix(batch))  # what the uncached backbone computes
    flipped = backbone.frozen_features(batch.flip(-1))  # another transform: other entries
    assert cache.misses == 6
    _same(flipped, backbone._prefix(batch.flip(-1)))


def test_entry_of_another_backbone_is_rebuilt_not_reused(tmp_path, batch):
    imagenet = _backbone(tmp_path)
    ours = imagenet.frozen_features(batch)
    torch.manual_seed(1)
    random = _backbone(tmp_path, weights_backbone=None)  # same files, other weights
    feature_cache.clear_memory()
    theirs = random.frozen_features(batch)
    assert random.cache.rebuilt == 3 and random.cache.hits == 0
    _same(theirs, random._prefix(batch))
    assert not torch.allclose(theirs["x"], ours["x"])
    feature_cache.clear_memory()
    back = imagenet.frozen_features(batch)  # and the other way round
    assert imagenet.cache.rebuilt == 3
    _same(back, ours)


def test_entry_of_another_transform_is_rebuilt(tmp_path, batch):
    backbone = _backbone(tmp_path)
    backbone.frozen_features(batch)
    root, digest = backbone.cache.root, backbone.cache.backbone
    other = FeatureCache(root, digest, backbone.cache.transform + ";other", backbone.cache.tag)
    feature_cache.clear_memory()
    other.fetch(batch, backbone._prefix)
    assert (other.hits, other.rebuilt) == (0, 3)


def test_loading_a_checkpoint_rehashes_the_frozen_weights(tmp_path, batch):
    backbone = _backbone(tmp_path)
    backbone.frozen_features(batch)
    digest = backbone.cache.backbone
    state = backbone.state_dict()
    state["body._conv_stem.weight"] = state["body._conv_stem.weight"] * 0.5
    backbone.load_state_dict(state)
    feature_cache.clear_memory()
    changed = backbone.frozen_features(batch)
    assert backbone.cache.backbone != digest and backbone.cache.rebuilt == 3
    _same(changed, backbone._prefix(batch))


def test_partly_frozen_backbone_caches_its_prefix_only(tmp_path, batch):
    backbone = _backbone(tmp_path, frozen_stages=3)  # stride-8 tap (stage 2) inside the prefix
    levels = backbone.frozen_features(batch)
    assert set(levels) == {"s8", "x"}
    assert levels["x"].shape[1] == 40


def test_cached_detector_trains_exactly_as_uncached(tmp_path, batch):
    data = synthetic_dataset(3, image_size=64, split="det-test")
    targets = [
        {"boxes": torch.as_tensor(r.boxes), "labels": torch.as_tensor(r.labels)}
        for r in data.images
    ]
    losses = []
    for cached in (False, True, True):  # uncached, cache filling, cache hits
        builder = partial(lite0_fcos, image_size=64, cache_dir=str(tmp_path), feature_cache=cached)
        det = TorchvisionDetector(builder, num_classes=4, device="cpu")
        det.train_mode()
        losses.append({k: float(v.detach()) for k, v in det.losses(list(batch), targets).items()})
    for name in losses[0]:
        assert losses[1][name] == pytest.approx(losses[0][name], rel=1e-5)
        assert losses[2][name] == pytest.approx(losses[0][name], rel=1e-5)


def test_entries_do_not_depend_on_what_missed_with_them(tmp_path, batch):
    """Cold cache (three misses at once) and warm cache (one image first) give bit-identical
    features: a run computes the same whatever the cache held when it started."""
    cold = _backbone(tmp_path / "cold").frozen_features(batch)
    warm_backbone = _backbone(tmp_path / "warm")
    warm_backbone.frozen_features(batch[1:2])
    feature_cache.clear_memory()
    warm = warm_backbone.frozen_features(batch)
    assert warm_backbone.cache.hits == 1
    for name in cold:
        assert torch.equal(cold[name], warm[name])


def test_unwritable_cache_dir_falls_back_to_memory(tmp_path, batch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    backbone = _backbone(blocker)  # the cache root is a file: every write fails
    first = backbone.frozen_features(batch)
    assert backbone.cache.writable is False
    again = backbone.frozen_features(batch)
    assert backbone.cache.hits == 3
    _same(again, first)


def test_damaged_entry_is_rebuilt_not_fatal(tmp_path, batch):
    """A truncated file (a killed writer on a filesystem without atomic rename, a full disk) is a
    miss: recomputed and rewritten, then read back as a hit."""
    backbone = _backbone(tmp_path)
    fresh = backbone.frozen_features(batch)
    entries = sorted((tmp_path / "lite0").rglob("*.pt"))
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    feature_cache.clear_memory()
    again = backbone.frozen_features(batch)
    assert (backbone.cache.rebuilt, backbone.cache.hits) == (1, 2)
    _same(again, fresh)
    feature_cache.clear_memory()
    backbone.frozen_features(batch)
    assert backbone.cache.hits == 5  # the rewritten entry reads back
