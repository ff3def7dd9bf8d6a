"""Per-image values of a pool held as one numpy array, not as a dict keyed by image id.

A streamed acquisition step (:mod:`alrun.streaming`) keeps a score and a miss count for every
pool image until the end of the step. As dicts those are ~0.2 KB of Python objects an image
(a float or tuple, a dict slot), allocated shard by shard between the shard's own short-lived
objects, which then pins freed memory too; at 10^5 images that is most of what the step grows
by. :class:`PoolValues` is a read-only mapping (``image id -> value``) over an array indexed by
the pool's own positions (``LabelPool.index``, built before the step), so it costs 9 bytes an
image for a float64 score and 9 for a pair of int32 counts (a flag each), whatever the
pool holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np


class PoolValues(Mapping):
    """``image id -> value`` for the ids set so far (:meth:`update`), in pool order.

    ``ids``: the pool's image ids by position; ``index``: id -> position. ``width`` 0: one
    float an image (``__getitem__`` gives a float); ``width`` k: k values an image (a tuple).
    """

    def __init__(
        self, ids: Sequence[str], index: Mapping[str, int], width: int = 0, dtype=np.float64
    ):
        self.ids = ids
        self.index = index
        self.values = np.zeros((len(ids), width) if width else len(ids), dtype=dtype)
        self.present = np.zeros(len(ids), dtype=bool)

    def update(self, values: Mapping[str, object]) -> None:
        """Set the values of ``values``' ids (a shard's scores or counts)."""
        if not values:
            return
        at = self.positions(values)
        self.values[at] = np.asarray(list(values.values()), dtype=self.values.dtype)
        self.present[at] = True

    def positions(self, image_ids: Sequence[str] | Mapping[str, object]) -> np.ndarray:
        """The pool positions of ``image_ids`` (KeyError for an id not in the pool)."""
        return np.fromiter((self.index[i] for i in image_ids), np.int64, len(image_ids))

    def set_positions(self) -> np.ndarray:
        """Positions holding a value, in pool order."""
        return np.flatnonzero(self.present)

    def __getitem__(self, image_id: str):
        at = self.index[image_id]
        if not self.present[at]:
            raise KeyError(image_id)
        value = self.values[at]
        return float(value) if self.values.ndim == 1 else tuple(value.tolist())

    def __contains__(self, image_id: object) -> bool:
        at = self.index.get(image_id) if isinstance(image_id, str) else None
        return at is not None and bool(self.present[at])

    def __iter__(self) -> Iterator[str]:
        return (self.ids[at] for at in self.set_positions())

    def __len__(self) -> int:
        return int(self.present.sum())
