"""The one internal dataset type every reader produces."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alrun.errors import DatasetError


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its ground truth: xyxy boxes in absolute pixels, labels index ``classes``.

    ``boxes``/``labels`` are the objects a detector is trained on and evaluated against.
    ``ignore_boxes``/``ignore_labels`` are *ignore regions*: COCO ``iscrowd=1`` annotations and
    VOC ``difficult`` objects (unless ``dataset.use_difficult``). They are never training targets
    and never labelled by the oracle; evaluation passes them to COCOeval as crowd (a detection
    on them is neither a true nor a false positive). ``areas`` is the annotation's own ``area``
    field per box (COCO segmentation area) when the file has one, else None (box area is used).
    """

    image_id: str
    file: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32
    labels: np.ndarray  # (N,) int64
    domain: str = ""
    ignore_boxes: np.ndarray | None = None  # (M, 4) float32, or None for none
    ignore_labels: np.ndarray | None = None  # (M,) int64
    areas: np.ndarray | None = None  # (N,) float32 annotation areas, or None

    @property
    def num_boxes(self) -> int:
        return int(len(self.labels))


@dataclass(frozen=True, eq=False)
class DetectionDataset:
    """An ordered, immutable collection of images with a class list.

    ``skipped`` records items dropped by a reader under ``skip_invalid: true`` as
    ``"<file>: <reason>"`` so a run can report how many were skipped and why.
    """

    name: str
    classes: tuple[str, ...]
    images: tuple[ImageRecord, ...]
    skipped: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rec in self.images:
            if rec.image_id in seen:
                raise DatasetError(f"{self.name}: duplicate image id '{rec.image_id}' ({rec.file})")
            seen.add(rec.image_id)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        return [rec.image_id for rec in self.images]

    @property
    def num_boxes(self) -> int:
        return sum(rec.num_boxes for rec in self.images)

    def by_id(self) -> dict[str, ImageRecord]:
        return {rec.image_id: rec for rec in self.images}

    def subset(self, ids: Iterable[str], name: str | None = None) -> DetectionDataset:
        """The images with these ids, in the order given."""
        index = self.by_id()
        missing = [i for i in ids if i not in index]
        if missing:
            raise DatasetError(f"{self.name}: unknown image ids {missing[:5]}")
        return DetectionDataset(name or self.name, self.classes, tuple(index[i] for i in ids))


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """What a dataset config builds: the unlabelled pool (train) and the held-out test split."""

    pool: DetectionDataset
    test: DetectionDataset

    def __post_init__(self) -> None:
        if self.pool.classes != self.test.classes:
            raise DatasetError(
                "pool and test splits disagree on classes: "
                f"{self.pool.classes} vs {self.test.classes}"
            )
        overlap = set(self.pool.ids) & set(self.test.ids)
        if overlap:
            raise DatasetError(
                f"{len(overlap)} image ids are in both pool and test, e.g. {sorted(overlap)[:3]}"
            )
        if len(self.pool) == 0:
            raise DatasetError(f"{self.pool.name}: the unlabelled pool is empty")
        if len(self.test) == 0:
            raise DatasetError(f"{self.test.name}: the test split is empty")

    @property
    def classes(self) -> tuple[str, ...]:
        return self.pool.classes


def seeded_split(dataset: DetectionDataset, test_fraction: float, seed: int) -> DatasetSplits:
    """Split one dataset into pool/test with a seeded permutation (same seed, same split).

    The reader's record of skipped items stays on the pool, so the run can report it.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"dataset.test_fraction must be in (0, 1), got {test_fraction}")
    ids = sorted(dataset.ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = max(1, int(round(test_fraction * len(ids))))
    test_ids = sorted(ids[i] for i in order[:n_test])
    pool_ids = sorted(ids[i] for i in order[n_test:])
    pool = dataset.subset(pool_ids, f"{dataset.name}:pool")
    return DatasetSplits(
        pool=DetectionDataset(pool.name, pool.classes, pool.images, dataset.skipped),
        test=dataset.subset(test_ids, f"{dataset.name}:test"),
    )
