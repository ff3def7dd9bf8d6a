"""COCO JSON in and out: reading a user's dataset, writing per-round labelled sets and eval files.

Conventions: ``image_id`` is ``str(coco image id)``, except that a file written by ``write_coco``
keeps alrun's own ids (its ``alrun_id`` field) so a write/read round trip is lossless. COCO boxes
are ``[x, y, w, h]``; internally they become xyxy. Crowd annotations (``iscrowd: 1``) are regions,
not instances: they become ``ImageRecord.ignore_boxes`` (never trained on, ignored in evaluation).
An annotation's ``area`` (the segmentation area COCOeval uses for small/medium/large) is kept in
``ImageRecord.areas``; where it is absent the box area stands in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alrun.data.dataset import (
    DEFAULT_SPLIT_SEED,
    DatasetSplits,
    DetectionDataset,
    ImageRecord,
    limit_splits,
    seeded_split,
)
from alrun.data.validate import (
    Validator,
    format_classes,
    resolve_root,
    to_arrays,
)
from alrun.errors import DatasetError
from alrun.io import atomic_write_bytes
from alrun.params import NonNegativeInt, PositiveInt, StrictFraction

#: Image fields ``write_coco`` owns; ``extra_image_fields`` may not replace them.
RESERVED_IMAGE_FIELDS = frozenset(
    {"id", "file_name", "width", "height", "alrun_id", "alrun_domain"}
)


def _load_json(file: Path) -> dict[str, Any]:
    """The parsed annotation file; empty or invalid means unusable as a whole (never skipped)."""
    if not file.is_file():
        raise DatasetError(f"{file}: annotation file does not exist")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{file}: empty annotation file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{file}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{file}: expected a COCO JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{file}: COCO file has no '{key}' list")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{file}: 'annotations' is not a list")
    return data


def _categories(data: Mapping[str, Any], file: Path) -> dict[int, str]:
    """Category id -> name, in category-id order."""
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DatasetError(f"{file}: categories[{i}] needs 'id' and 'name'")
        try:
            cat_id = int(cat["id"])
        except (TypeError, ValueError):
            raise DatasetError(
                f"{file}: categories[{i}] has a non-integer id {cat['id']!r}"
            ) from None
        if cat_id in cats:
            raise DatasetError(f"{file}: duplicate category id {cat_id}")
        cats[cat_id] = str(cat["name"])
    return dict(sorted(cats.items()))


def _class_map(
    cats: Mapping[int, str], classes: Sequence[str] | None, file: Path
) -> tuple[tuple[str, ...], dict[int, int]]:
    """The class list and category id -> label index (categories not kept are absent)."""
    names = list(cats.values())
    dupes = sorted({n for n in names if names.count(n) > 1})
    if classes is None:
        if dupes:
            raise DatasetError(f"{file}: duplicate category names {dupes}")
        return tuple(names), {cat_id: i for i, cat_id in enumerate(cats)}
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
        raise DatasetError(f"dataset.classes: duplicate names in {list(classes)}")
    missing = [c for c in classes if c not in names]
    if missing:
        raise DatasetError(
            f"{file}: classes {missing} are not among the categories {format_classes(names)}"
        )
    ambiguous = [c for c in classes if c in dupes]
    if ambiguous:
        raise DatasetError(f"{file}: category names {ambiguous} are used by more than one id")
    index = {name: i for i, name in enumerate(classes)}
    return classes, {cat_id: index[n] for cat_id, n in cats.items() if n in index}


def _build(
    data: Mapping[str, Any],
    file: Path,
    image_dir: Path,
    classes: Sequence[str] | None,
    skip_invalid: bool,
    name: str,
) -> DetectionDataset:
    """A dataset from parsed COCO data (validation and skipping as in ``alrun.data.validate``)."""
    val = Validator(name, skip_invalid)
    cats = _categories(data, file)
    class_names, cat_to_label = _class_map(cats, classes, file)

    # image entries: coco id -> (image_id, file, width, height, domain)
    entries: dict[Any, tuple[str, Path, int, int, str]] = {}
    dropped: set[Any] = set()
    seen_ids: set[str] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            val.fail(file, f"images[{i}] needs 'id' and 'file_name'")
            continue
        coco_id = img["id"]
        if not isinstance(coco_id, (int, str)):
            val.fail(file, f"images[{i}] has id {coco_id!r}, expected an integer")
            continue
        image_id = str(img.get("alrun_id", coco_id))
        if coco_id in entries or coco_id in dropped:
            val.fail(file, f"images[{i}] ({img['file_name']}): duplicate image id {coco_id!r}")
            continue
        if not val.check_unique(file, image_id, seen_ids):
            dropped.add(coco_id)
            continue
        path = image_dir / str(img["file_name"])
        if not val.check_image_file(path, annotation=f"{file}: image {image_id}"):
            dropped.add(coco_id)
            continue
        size = val.image_size(path, img.get("width"), img.get("height"), annotation=file)
        if size is None:
            dropped.add(coco_id)
            continue
        entries[coco_id] = (image_id, path, size[0], size[1], str(img.get("alrun_domain", "")))

    boxes: dict[Any, list[tuple[float, float, float, float]]] = {k: [] for k in entries}
    labels: dict[Any, list[int]] = {k: [] for k in entries}
    areas: dict[Any, list[float | None]] = {k: [] for k in entries}
    crowd_boxes: dict[Any, list[tuple[float, float, float, float]]] = {k: [] for k in entries}
    crowd_labels: dict[Any, list[int]] = {k: [] for k in entries}
    for j, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            val.fail(file, f"annotations[{j}] is not an object")
            continue
        ann_name = f"annotation {ann.get('id', f'#{j}')}"
        coco_id, cat_id = ann.get("image_id"), ann.get("category_id")
        if not isinstance(coco_id, (int, str)) or not isinstance(cat_id, (int, str)):
            val.fail(file, f"{ann_name} needs an integer 'image_id' and 'category_id'")
            continue
        if coco_id in dropped:
            continue  # its image was already reported
        if coco_id not in entries:
            val.fail(file, f"{ann_name} refers to unknown image id {coco_id!r}")
            continue
        if cat_id not in cats:
            val.fail(
                file,
                f"{ann_name} refers to unknown category id {cat_id!r}; "
                f"known category ids: {sorted(cats)}",
            )
            continue
        if cat_id not in cat_to_label:
            continue  # a category not selected by ``classes``
        crowd = bool(ann.get("iscrowd", 0))
        image_id, _, width, height, _ = entries[coco_id]
        item = f"{ann_name} (image {image_id}, {cats[cat_id]})"
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            val.fail(file, f"{item} has bbox {bbox!r}, expected [x, y, w, h]")
            continue
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            val.fail(file, f"{item} has non-numeric bbox {bbox!r}")
            continue
        box = val.check_box(file, item, (x, y, x + w, y + h), width, height)
        if box is None:
            continue
        if crowd:
            crowd_boxes[coco_id].append(box)
            crowd_labels[coco_id].append(cat_to_label[cat_id])
            continue
        boxes[coco_id].append(box)
        labels[coco_id].append(cat_to_label[cat_id])
        area = ann.get("area")
        usable = isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0
        areas[coco_id].append(float(area) if usable else None)

    any_area = any(a is not None for per_image in areas.values() for a in per_image)
    records = []
    for coco_id, (image_id, path, width, height, domain) in entries.items():
        box_arr, label_arr = to_arrays(boxes[coco_id], labels[coco_id])
        ignore_arr, ignore_label_arr = to_arrays(crowd_boxes[coco_id], crowd_labels[coco_id])
        area_arr = None
        if any_area:
            box_area = (box_arr[:, 2] - box_arr[:, 0]) * (box_arr[:, 3] - box_arr[:, 1])
            given = [a if a is not None else b for a, b in zip(areas[coco_id], box_area.tolist())]
            area_arr = np.asarray(given, dtype=np.float32).reshape(-1)
        records.append(
            ImageRecord(
                image_id,
                path,
                width,
                height,
                box_arr,
                label_arr,
                domain,
                ignore_boxes=ignore_arr if len(ignore_label_arr) else None,
                ignore_labels=ignore_label_arr if len(ignore_label_arr) else None,
                areas=area_arr,
            )
        )
    records.sort(key=lambda r: r.image_id)
    return DetectionDataset(name, class_names, tuple(records), tuple(val.skipped))


def read_coco(
    annotation_file: str | Path,
    image_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    name: str | None = None,
) -> DetectionDataset:
    """Read a COCO detection file; ``file_name`` is relative to ``image_dir`` (default: its dir).

    ``classes=None`` keeps every category (label order = category id order); a list keeps only
    those categories, in that order, and silently drops annotations of the others.
    """
    file = resolve_root(annotation_file, "dataset.annotation_file")
    images = resolve_root(image_dir, "dataset.image_dir") if image_dir is not None else file.parent
    return _build(_load_json(file), file, images, classes, skip_invalid, name or file.stem)


def write_coco(
    dataset: DetectionDataset,
    path: str | Path,
    extra_image_fields: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``dataset`` as COCO JSON atomically (readers never see a half-written file).

    COCO ids are positions + 1 (images and categories); ``alrun_id`` keeps the image id and
    ``file_name`` is the absolute image path. ``extra_image_fields`` maps image_id -> extra keys
    for that image entry (e.g. the round it was labelled in). Ignore regions are written as
    ``iscrowd: 1`` annotations and ``areas`` as ``area``, so a write/read round trip is lossless.
    """
    extra = dict(extra_image_fields or {})
    unknown = sorted(set(extra) - set(dataset.ids))
    if unknown:
        raise DatasetError(f"write_coco: extra_image_fields for unknown image ids {unknown[:5]}")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, rec in enumerate(dataset.images):
        entry: dict[str, Any] = {
            "id": index + 1,
            "file_name": str(rec.file),
            "width": int(rec.width),
            "height": int(rec.height),
            "alrun_id": rec.image_id,
        }
        if rec.domain:
            entry["alrun_domain"] = rec.domain
        fields = dict(extra.get(rec.image_id, {}))
        clash = sorted(RESERVED_IMAGE_FIELDS & set(fields))
        if clash:
            raise DatasetError(f"write_coco: extra_image_fields may not set {clash}")
        entry.update(fields)
        images.append(entry)
        given_areas = rec.areas.tolist() if rec.areas is not None else [None] * rec.num_boxes
        objects = [
            (box, label, area, 0)
            for box, label, area in zip(
                rec.boxes.tolist(), rec.labels.tolist(), given_areas, strict=True
            )
        ]
        if rec.ignore_boxes is not None and rec.ignore_labels is not None:
            objects += [
                (box, label, None, 1)
                for box, label in zip(
                    rec.ignore_boxes.tolist(), rec.ignore_labels.tolist(), strict=True
                )
            ]
        for box, label, area, crowd in objects:
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, w, h],
                    "area": area if area is not None else w * h,
                    "iscrowd": crowd,
                }
            )
    data = {
        "info": {"description": f"alrun export of {dataset.name}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": ""}
            for i, name in enumerate(dataset.classes)
        ],
    }
    target = Path(path).expanduser().resolve()
    atomic_write_bytes(target, json.dumps(data).encode("utf-8"))  # temp + fsync + rename
    return target


def coco_splits(
    annotation_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    test_annotation_file: str | Path | None = None,
    test_image_dir: str | Path | None = None,
    test_fraction: StrictFraction = 0.2,
    split_seed: NonNegativeInt = DEFAULT_SPLIT_SEED,
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    max_pool_images: PositiveInt | None = None,
    max_test_images: PositiveInt | None = None,
) -> DatasetSplits:
    """Pool and test from two COCO files, or a split of one (``test_fraction``, ``split_seed``).

    With two files the test file must use the pool's classes: a test category the pool lacks is
    an error rather than silently dropped boxes. ``max_pool_images`` / ``max_test_images`` take
    seeded subsets (``split_seed``, never the run's ``seed``).
    """
    splits = _coco_splits(
        annotation_file,
        image_dir,
        test_annotation_file,
        test_image_dir,
        test_fraction,
        split_seed,
        classes,
        skip_invalid,
    )
    return limit_splits(splits, max_pool_images, max_test_images, split_seed)


def _coco_splits(
    annotation_file: str | Path | None,
    image_dir: str | Path | None,
    test_annotation_file: str | Path | None,
    test_image_dir: str | Path | None,
    test_fraction: float,
    split_seed: int,
    classes: Sequence[str] | None,
    skip_invalid: bool,
) -> DatasetSplits:
    file = resolve_root(annotation_file, "dataset.annotation_file")
    images = resolve_root(image_dir, "dataset.image_dir") if image_dir is not None else file.parent
    data = _load_json(file)
    if test_annotation_file is None:
        dataset = _build(data, file, images, classes, skip_invalid, file.stem)
        return seeded_split(dataset, test_fraction, split_seed)
    pool = _build(data, file, images, classes, skip_invalid, f"{file.stem}:pool")
    test_file = resolve_root(test_annotation_file, "dataset.test_annotation_file")
    test_images = (
        resolve_root(test_image_dir, "dataset.test_image_dir")
        if test_image_dir is not None
        else test_file.parent
    )
    test_data = _load_json(test_file)
    if classes is None:
        extra = [n for n in _categories(test_data, test_file).values() if n not in pool.classes]
        if extra:
            raise DatasetError(
                f"{test_file}: categories {extra} are not in the pool's classes "
                f"{format_classes(pool.classes)}"
            )
    test = _build(
        test_data, test_file, test_images, pool.classes, skip_invalid, f"{test_file.stem}:test"
    )
    return DatasetSplits(pool=pool, test=test)


def coco_root_splits(
    root: str | Path | None = None,
    pool: str = "train2017",
    test: str = "val2017",
    annotations: str = "annotations/instances_{split}.json",
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    split_seed: NonNegativeInt = DEFAULT_SPLIT_SEED,
    max_pool_images: PositiveInt | None = None,
    max_test_images: PositiveInt | None = None,
) -> DatasetSplits:
    """The official COCO layout under one root: ``<root>/<split>/`` images and
    ``<root>/annotations/instances_<split>.json`` (train2017 pool: 118,287 images, val2017 test:
    5,000). One root key instead of four file keys, so ``dataset.root`` or ``$ALRUN_COCO_ROOT``
    points at a copy."""
    path = resolve_root(root)
    files = {}
    for split in (pool, test):
        for what, file in (
            ("annotation file", path / annotations.format(split=split)),
            ("image folder", path / split),
        ):
            if not file.exists():
                raise DatasetError(
                    f"dataset.root: {file} does not exist (the {split} {what}; "
                    "scripts/prepare_coco.py checks and downloads the official layout)"
                )
        files[split] = path / annotations.format(split=split)
    return coco_splits(
        annotation_file=files[pool],
        image_dir=path / pool,
        test_annotation_file=files[test],
        test_image_dir=path / test,
        classes=classes,
        skip_invalid=skip_invalid,
        split_seed=split_seed,
        max_pool_images=max_pool_images,
        max_test_images=max_test_images,
    )
