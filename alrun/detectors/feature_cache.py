"""A cache of frozen-backbone features, per input image, on disk and in memory.

When the early layers of a backbone are frozen (no gradient, frozen BatchNorm, no stochastic
depth), their output is a pure function of their weights and of the image tensor they see. The
tensor they see is the image after the detector's transform (resize, normalisation) and the
training augmentation (a horizontal flip), so its content digest identifies image *and*
transform exactly; the engine hands ``losses`` bare tensors, and a digest cannot go stale when a
file changes under the same name, which an image id can.

An entry is ``<root>/lite0/<digest of the input>-f<frozen stages>.pt`` holding its full key
(backbone weights hash, transform, input digest and shape) beside the tensors. A lookup whose
stored key differs (another backbone's weights, another transform signature) is a miss: the entry
is recomputed and rewritten, never reused. Files are written atomically (:mod:`alrun.io`); sweep
jobs can share the directory. A process-wide in-memory layer (LRU, bounded in bytes) avoids
re-reading the files every iteration.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from alrun.io import atomic_write_bytes

log = logging.getLogger("alrun")

#: bump when what a cached entry means changes (the backbone's code), so old files are rebuilt
CACHE_VERSION = 1
#: bytes of features the in-memory layer keeps (least recently used dropped first)
MEMORY_BYTES = 1 << 30

_memory: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
_memory_bytes = 0


def weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of named tensors (names, shapes and bytes), e.g. a frozen prefix's weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def input_digest(image: Tensor) -> str:
    value = image.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(value.shape)}:{value.dtype};".encode())
    digest.update(value.numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Features of a frozen backbone prefix per image.

    ``backbone``: a hash of the prefix's weights (and its depth); ``transform``: a signature of
    the detector's image transform (sizes, mean, std). Both are part of every entry's key.
    """

    def __init__(self, root: Path, backbone: str, transform: str, tag: str):
        self.root = Path(root)
        self.backbone = backbone
        self.transform = transform
        self.tag = tag  # file-name suffix: entries of differently deep prefixes do not collide
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self.writable = True

    def key(self, digest: str, shape: tuple[int, ...]) -> dict[str, str]:
        return {
            "version": str(CACHE_VERSION),
            "backbone": self.backbone,
            "transform": self.transform,
            "input": digest,
            "shape": "x".join(map(str, shape)),
        }

    def path(self, digest: str) -> Path:
        return self.root / "lite0" / digest[:2] / f"{digest}-{self.tag}.pt"

    def fetch(
        self, images: Tensor, compute: Callable[[Tensor], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """``compute(images)`` (a dict of batched tensors), served per image from the cache where
        an entry with this exact key exists."""
        if len(images) == 0:
            return compute(images)
        digests = [input_digest(image) for image in images]
        keys = [self.key(d, tuple(images.shape[1:])) for d in digests]
        found = [self._load(d, k) for d, k in zip(digests, keys)]
        for i, entry in enumerate(found):
            if entry is None:
                # one image at a time: a stored entry never depends on which other images
                # happened to miss with it (batched kernels differ in the last bits), so a run
                # computes the same with a cold or a warm cache (same seed, same selections)
                computed = compute(images[i : i + 1])
                entry = {name: value.detach().cpu().clone() for name, value in computed.items()}
                self._store(digests[i], keys[i], entry)
                found[i] = entry
        device = images.device
        return {name: torch.cat([entry[name] for entry in found]).to(device) for name in found[0]}

    def _memory_key(self, key: Mapping[str, str]) -> str:
        return "|".join(f"{k}={v}" for k, v in sorted(key.items())) + f"|{self.tag}"

    def _load(self, digest: str, key: dict[str, str]) -> dict[str, Tensor] | None:
        mem_key = self._memory_key(key)
        if mem_key in _memory:
            _memory.move_to_end(mem_key)
            self.hits += 1
            return _memory[mem_key]
        path = self.path(digest)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged entry is rebuilt, not fatal
            log.debug("feature cache: unreadable %s (%s): rebuilt", path, err)
            stored = None
        if not isinstance(stored, dict) or stored.get("key") != key:
            self.rebuilt += 1  # another backbone or transform wrote it: recompute
            return None
        self.hits += 1
        _remember(mem_key, stored["tensors"])
        return stored["tensors"]

    def _store(self, digest: str, key: dict[str, str], tensors: dict[str, Tensor]) -> None:
        if self.writable:
            buffer = io.BytesIO()
            torch.save({"key": key, "tensors": tensors}, buffer)
            try:
                atomic_write_bytes(self.path(digest), buffer.getvalue())
            except OSError as err:  # a full or read-only cache dir slows runs down, no more
                self.writable = False
                log.warning("feature cache: cannot write %s (%s); memory only", self.root, err)
        _remember(self._memory_key(key), tensors)


def _remember(key: str, tensors: dict[str, Tensor]) -> None:
    global _memory_bytes
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if key in _memory:
        return
    _memory[key] = tensors
    _memory_bytes += size
    while _memory_bytes > MEMORY_BYTES and len(_memory) > 1:
        _, dropped = _memory.popitem(last=False)
        _memory_bytes -= sum(t.numel() * t.element_size() for t in dropped.values())


def clear_memory() -> None:
    """Forget the in-memory layer (tests: force reads from disk)."""
    global _memory_bytes
    _memory.clear()
    _memory_bytes = 0
