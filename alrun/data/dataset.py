"""The one internal dataset type every reader produces."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from alrun.errors import DatasetError


@dataclass(frozen=True)
class ImageRef:
    """What a detector, strategy or regime may see of an image: no boxes, no labels.

    The pool hands these out; the hidden ground truth of the same id stays with the oracle and
    the evaluator (:class:`alrun.truth.HiddenTruth`), and what the run has bought for the image
    is in ``LabelPool.labels`` (and in the training set built from it).
    """

    image_id: str
    file: Path
    width: int
    height: int
    domain: str = ""


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

    @property
    def ref(self) -> ImageRef:
        """The visible part of this record (what may leave the oracle and the evaluator)."""
        return ImageRef(self.image_id, self.file, self.width, self.height, self.domain)


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
        return DetectionDataset(name or self.name, self.classes, _pick(self, ids))

    def visible(self) -> ImageSet:
        """The same images without their boxes: what detectors, strategies and regimes see."""
        return ImageSet(self.name, self.classes, tuple(rec.ref for rec in self.images))


@dataclass(frozen=True, eq=False)
class ImageSet:
    """An ordered collection of :class:`ImageRef` (images without ground truth) and the class
    list: the unlabelled pool as regimes and strategies see it."""

    name: str
    classes: tuple[str, ...]
    images: tuple[ImageRef, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        return [ref.image_id for ref in self.images]

    def by_id(self) -> dict[str, ImageRef]:
        return {ref.image_id: ref for ref in self.images}

    def subset(self, ids: Iterable[str], name: str | None = None) -> ImageSet:
        """The images with these ids, in the order given."""
        return ImageSet(name or self.name, self.classes, _pick(self, ids))


def _pick(collection: DetectionDataset | ImageSet, ids: Iterable[str]) -> tuple:
    index = collection.by_id()
    ids = list(ids)
    missing = [i for i in ids if i not in index]
    if missing:
        raise DatasetError(f"{collection.name}: unknown image ids {missing[:5]}")
    return tuple(index[i] for i in ids)


#: Default ``dataset.split_seed``: fixed, so every seed of a sweep is tested on the same images.
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """What a dataset config builds: the unlabelled pool (train) and the held-out test split.

    ``split_seed`` is the seed of the seeded split or subset that produced them, or None when
    the dataset's own files fix both (then ``splits.json`` records the ids only).
    ``excluded`` holds the images ``max_pool_images`` / ``max_test_images`` left out: never
    used by a run, but known, so files about the whole dataset (``oracle=recorded``) are
    checked against them rather than refused.
    """

    pool: DetectionDataset
    test: DetectionDataset
    split_seed: int | None = None
    excluded: tuple[ImageRecord, ...] = ()

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

    def visible(self) -> VisibleSplits:
        """Pool and test without ground truth: what start-up checks of strategies and regimes
        get (image sizes, domains, classes)."""
        return VisibleSplits(self.pool.visible(), self.test.visible())


@dataclass(frozen=True)
class VisibleSplits:
    """:class:`DatasetSplits` without ground truth."""

    pool: ImageSet
    test: ImageSet

    @property
    def classes(self) -> tuple[str, ...]:
        return self.pool.classes


def _check_split_seed(split_seed: object) -> int:
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise DatasetError(
            f"dataset.split_seed: expected a non-negative integer, got {split_seed!r}"
        )
    return split_seed


def seeded_split(
    dataset: DetectionDataset, test_fraction: float, split_seed: int = DEFAULT_SPLIT_SEED
) -> DatasetSplits:
    """Split one dataset into pool/test with a seeded permutation (same split_seed, same split).

    The permutation is over the sorted ids, so it depends on the images only, not on file order.
    The reader's record of skipped items stays on the pool, so the run can report it.
    """
    split_seed = _check_split_seed(split_seed)
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not (0.0 < test_fraction < 1.0)
    ):
        raise DatasetError(
            f"dataset.test_fraction: expected a number in (0, 1), got {test_fraction!r}"
        )
    ids = sorted(dataset.ids)
    order = np.random.default_rng(split_seed).permutation(len(ids))
    n_test = max(1, int(round(test_fraction * len(ids))))
    test_ids = sorted(ids[i] for i in order[:n_test])
    pool_ids = sorted(ids[i] for i in order[n_test:])
    pool = dataset.subset(pool_ids, f"{dataset.name}:pool")
    return DatasetSplits(
        pool=DetectionDataset(pool.name, pool.classes, pool.images, dataset.skipped),
        test=dataset.subset(test_ids, f"{dataset.name}:test"),
        split_seed=split_seed,
    )


def seeded_subset(
    dataset: DetectionDataset, max_images: int | None, split_seed: int, key: str
) -> DetectionDataset:
    """At most ``max_images`` images drawn with ``split_seed`` (all when None or enough).

    ``key`` (``max_pool_images`` / ``max_test_images``) names the config key in errors and
    seeds pool and test draws independently. The images keep the dataset's order.
    """
    if max_images is None:
        return dataset
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images <= 0:
        raise DatasetError(
            f"dataset.{key}: expected a positive integer or null, got {max_images!r}"
        )
    if max_images >= len(dataset):
        return dataset
    ids = sorted(dataset.ids)
    purpose = int.from_bytes(key.encode()[:8], "little")
    rng = np.random.default_rng([_check_split_seed(split_seed), purpose])
    chosen = {ids[i] for i in rng.permutation(len(ids))[:max_images]}
    images = tuple(rec for rec in dataset.images if rec.image_id in chosen)
    return DetectionDataset(dataset.name, dataset.classes, images, dataset.skipped)


def limit_splits(
    splits: DatasetSplits,
    max_pool_images: int | None = None,
    max_test_images: int | None = None,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> DatasetSplits:
    """Seeded subsets of pool and test (``dataset.max_pool_images`` / ``max_test_images``).

    Every reader ends with this, so ``experiment=smoke`` can shrink any dataset. The subsets
    depend on ``split_seed`` only, never on the run's ``seed``.
    """
    split_seed = _check_split_seed(split_seed)
    pool = seeded_subset(splits.pool, max_pool_images, split_seed, "max_pool_images")
    test = seeded_subset(splits.test, max_test_images, split_seed, "max_test_images")
    if pool is splits.pool and test is splits.test:
        return splits
    kept = {*pool.ids, *test.ids}
    every = (*splits.pool.images, *splits.test.images)
    dropped = [r for r in every if r.image_id not in kept]
    return DatasetSplits(pool, test, split_seed, (*splits.excluded, *dropped))


def split_record(splits: DatasetSplits) -> dict:
    """What ``splits.json`` in a run directory holds: which images were pool and test.

    Anyone can then audit (or reuse) the exact test set of a run.
    """
    return {
        "split_seed": splits.split_seed,
        "classes": list(splits.classes),
        "pool": {"name": splits.pool.name, "count": len(splits.pool), "ids": splits.pool.ids},
        "test": {"name": splits.test.name, "count": len(splits.test), "ids": splits.test.ids},
    }


def with_fields(record: ImageRecord, **changes: object) -> ImageRecord:
    """A copy of ``record`` with some fields changed (ignore regions and areas kept)."""
    return replace(record, **changes)
