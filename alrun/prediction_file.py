"""``round_XX/preds.npz`` written shard by shard, for a pool too large to hold predicted.

The file is the one :func:`alrun.round_files.save_predictions` writes (``image_ids``,
``image_scores``, ``offsets`` and the flat per-box ``boxes``/``scores``/``labels``/``probs``),
so every reader of it (``alrun-report``'s gallery, ``np.load``) reads it unchanged. Each
shard's per-box arrays are appended to raw files beside it; :meth:`PredictionWriter.finish`
streams them into the compressed ``.npz`` once the image scores are known, then removes them.
Memory: O(pool) ids and offsets, never the boxes.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from alrun.acquisition.context import PredictionBatch

#: the per-box arrays preds.npz holds (round_files.save_predictions)
SAVED_FIELDS = ("boxes", "scores", "labels", "probs")
_COPY_BYTES = 1 << 22


class PredictionWriter:
    """Appends shards of pool predictions; :meth:`finish` writes ``path`` (atomically)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.parts = self.path.parent / f".{self.path.name}.parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.ids: list[str] = []
        self.offsets = np.zeros(1, dtype=np.int64)
        self.layout: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}  # dtype, row shape, rows
        self.first = True

    def add(self, batch: PredictionBatch) -> None:
        self.ids.extend(batch.image_ids)
        self.offsets = np.concatenate([self.offsets, batch.offsets[1:].numpy() + self.offsets[-1]])
        for name in SAVED_FIELDS:
            value = getattr(batch, name)
            if self.first and value is not None:
                array = value.numpy()
                self.layout[name] = (array.dtype, array.shape[1:], 0)
            if name not in self.layout:
                continue
            if value is None:  # a field only some shards have is not saved (as for one batch)
                del self.layout[name]
                (self.parts / name).unlink(missing_ok=True)
                continue
            array = np.ascontiguousarray(value.numpy())
            dtype, shape, rows = self.layout[name]
            if array.dtype != dtype or array.shape[1:] != shape:
                array = array.astype(dtype).reshape((-1, *shape))
            with open(self.parts / name, "ab") as f:
                f.write(array.tobytes())
            self.layout[name] = (dtype, shape, rows + len(array))
        self.first = False

    def finish(self, scores: Mapping[str, float] | None) -> None:
        scores = scores or {}
        small = {
            "image_ids": np.asarray(self.ids, dtype=str),
            "image_scores": np.asarray([scores.get(i, np.nan) for i in self.ids], np.float64),
            "offsets": self.offsets,
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for name, array in small.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
            for name, (dtype, shape, rows) in self.layout.items():
                header = {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": (rows, *shape),
                }
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, header)
                    with open(self.parts / name, "rb") as src:
                        shutil.copyfileobj(src, f, _COPY_BYTES)
        os.replace(tmp, self.path)
        self.discard()

    def discard(self) -> None:
        """Remove the raw shard files (also when the step fails)."""
        shutil.rmtree(self.parts, ignore_errors=True)
