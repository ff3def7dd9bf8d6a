"""Pascal VOC XML: one XML per image, either listed by ImageSets/Main/<split>.txt or a whole folder.

``image_id`` is the XML stem. Coordinates are kept as written (VOC's 1-based pixel corners are not
shifted). ``difficult`` objects become ignore regions (``ImageRecord.ignore_boxes``: not trained
on, ignored in evaluation), as the VOC devkit and MMDetection treat them; ``use_difficult=True``
keeps them as ordinary boxes. A folder without ``ImageSets/Main`` (e.g. ``annotations/`` +
``images/``) is split into pool and test with ``split_seed``.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alrun.data.dataset import (
    DEFAULT_SPLIT_SEED,
    DatasetSplits,
    DetectionDataset,
    ImageRecord,
    limit_splits,
    seeded_split,
)
from alrun.data.validate import Box, Validator, resolve_root, to_arrays
from alrun.errors import DatasetError
from alrun.params import NonNegativeInt, PositiveInt, StrictFraction

log = logging.getLogger("alrun")

#: ``test_fraction`` of the seeded split used when a folder has no ImageSets/Main split files.
FALLBACK_TEST_FRACTION = 0.2

#: Tried, in this order, after the XML's <filename>, when looking for an image by its XML stem.
IMAGE_SUFFIXES = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG")


@dataclass
class _Parsed:
    """One image as read from its XML, before class names become label indices."""

    image_id: str
    xml: Path
    file: Path
    width: int
    height: int
    objects: list[tuple[str, str, Box, bool]]  # (item description, class name, box, difficult)


def _split_ids(root: Path, split: str, val: Validator) -> list[str]:
    """Ids listed in ImageSets/Main/<split>.txt (first token per line: VOC class lists have two)."""
    split_dir = root / "ImageSets" / "Main"
    split_file = split_dir / f"{split}.txt"
    if not split_file.is_file():
        known = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
        raise DatasetError(f"{split_file}: split file does not exist; available splits: {known}")
    ids: list[str] = []
    seen: set[str] = set()
    for line in split_file.read_text(encoding="utf-8").splitlines():
        tokens = line.split()
        if tokens and val.check_unique(split_file, tokens[0], seen):
            ids.append(tokens[0])
    return ids


def _find_image(images_dir: Path, filename: str | None, stem: str) -> tuple[Path | None, list[str]]:
    """The image path and the names tried (for the error message when none exists)."""
    tried: list[str] = []
    if filename and filename.strip():
        tried.append(filename.strip())
    tried += [stem + suffix for suffix in IMAGE_SUFFIXES if stem + suffix not in tried]
    for name in tried:
        candidate = images_dir / name
        if candidate.is_file():
            return candidate, tried
    return None, tried


def _parse_xml(xml: Path, image_id: str, images_dir: Path, val: Validator) -> _Parsed | None:
    """One annotation file; None (recorded) when the image has to be dropped."""
    if not xml.is_file():
        val.fail(xml, "annotation file does not exist")
        return None
    if xml.stat().st_size == 0:
        val.fail(xml, "empty annotation file")
        return None
    try:
        node = ET.parse(xml).getroot()
    except ET.ParseError as err:
        val.fail(xml, f"invalid XML ({err})")
        return None
    if node.tag != "annotation":
        val.fail(xml, f"root element is <{node.tag}>, expected <annotation>")
        return None
    image, tried = _find_image(images_dir, node.findtext("filename"), image_id)
    if image is None:
        val.fail(xml, f"image file not found in {images_dir} (tried {', '.join(tried)})")
        return None
    size = val.image_size(
        image, node.findtext("size/width"), node.findtext("size/height"), annotation=xml
    )
    if size is None:
        return None
    width, height = size
    objects: list[tuple[str, str, Box]] = []
    for i, obj in enumerate(node.findall("object")):
        name = (obj.findtext("name") or "").strip()
        item = f"object {i} ({name})"
        if not name:
            val.fail(xml, f"object {i} has no <name>")
            continue
        coords = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(c is None for c in coords):
            val.fail(xml, f"{item} has no complete <bndbox> (xmin, ymin, xmax, ymax)")
            continue
        box = val.check_box(xml, item, coords, width, height)  # type: ignore[arg-type]
        if box is not None:
            difficult = (obj.findtext("difficult") or "0").strip() not in ("", "0")
            objects.append((item, name, box, difficult))
    return _Parsed(image_id, xml, image, width, height, objects)


def _parse(
    root: Path,
    split: str | None,
    annotations_dir: str,
    images_dir: str,
    val: Validator,
) -> list[_Parsed]:
    """Every image of one split (or folder), sorted by image id."""
    ann_dir = root / annotations_dir
    img_dir = root / images_dir
    for what, path in (("annotations_dir", ann_dir), ("images_dir", img_dir)):
        if not path.is_dir():
            raise DatasetError(f"dataset.{what}: {path} does not exist")
    if split is not None:
        xmls = [(i, ann_dir / f"{i}.xml") for i in _split_ids(root, split, val)]
    else:
        xmls = [
            (p.stem, p) for p in ann_dir.iterdir() if p.suffix.lower() == ".xml" and p.is_file()
        ]
    parsed = []
    seen: set[str] = set()
    for image_id, xml in sorted(xmls):
        if not val.check_unique(xml, image_id, seen):
            continue
        record = _parse_xml(xml, image_id, img_dir, val)
        if record is not None:
            parsed.append(record)
    return parsed


def _classes_of(parsed: Sequence[_Parsed]) -> tuple[str, ...]:
    return tuple(sorted({name for p in parsed for _, name, _, _ in p.objects}))


def _assemble(
    parsed: Sequence[_Parsed],
    classes: Sequence[str],
    val: Validator,
    name: str,
    use_difficult: bool = False,
) -> DetectionDataset:
    """Map class names to label indices (unknown names fail or are skipped); build the dataset.

    Difficult objects become ignore regions unless ``use_difficult``.
    """
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for p in parsed:
        kept: tuple[list[Box], list[int]] = ([], [])
        ignored: tuple[list[Box], list[int]] = ([], [])
        for item, cls, box, difficult in p.objects:
            label = val.check_class_name(p.xml, item, cls, index)
            if label is not None:
                target = ignored if difficult and not use_difficult else kept
                target[0].append(box)
                target[1].append(label)
        box_arr, label_arr = to_arrays(*kept)
        ignore_arr, ignore_label_arr = to_arrays(*ignored)
        has_ignore = len(ignore_label_arr) > 0
        records.append(
            ImageRecord(
                p.image_id,
                p.file,
                p.width,
                p.height,
                box_arr,
                label_arr,
                ignore_boxes=ignore_arr if has_ignore else None,
                ignore_labels=ignore_label_arr if has_ignore else None,
            )
        )
    return DetectionDataset(name, tuple(classes), tuple(records), tuple(val.skipped))


def _check_classes(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    if classes is None:
        return None
    out = tuple(str(c) for c in classes)
    if len(set(out)) != len(out):
        raise DatasetError(f"dataset.classes: duplicate names in {list(out)}")
    return out


def read_voc(
    root: str | Path,
    split: str | None = None,
    annotations_dir: str = "Annotations",
    images_dir: str = "JPEGImages",
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    name: str | None = None,
    use_difficult: bool = False,
) -> DetectionDataset:
    """Read a VOC split (ImageSets/Main/<split>.txt) or, with ``split=None``, every XML in a folder.

    ``classes=None`` uses the sorted set of names found; a given list makes other names errors.
    """
    path = resolve_root(root)
    checked = _check_classes(classes)
    val = Validator(name or path.name, skip_invalid)
    parsed = _parse(path, split, annotations_dir, images_dir, val)
    label = name or f"{path.name}:{split if split is not None else annotations_dir}"
    names = checked if checked is not None else _classes_of(parsed)
    return _assemble(parsed, names, val, label, use_difficult)


def voc_splits(
    root: str | Path | None = None,
    pool_split: str | None = "trainval",
    test_split: str | None = "test",
    annotations_dir: str = "Annotations",
    images_dir: str = "JPEGImages",
    test_annotations_dir: str | None = None,
    test_images_dir: str | None = None,
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    test_fraction: StrictFraction | None = None,
    split_seed: NonNegativeInt = DEFAULT_SPLIT_SEED,
    use_difficult: bool = False,
    max_pool_images: PositiveInt | None = None,
    max_test_images: PositiveInt | None = None,
) -> DatasetSplits:
    """Pool and test splits sharing one class list (the union of both when ``classes`` is None).

    Where the test set comes from, first match wins: ``test_fraction`` (a split of the pool
    seeded by ``split_seed``); ``test_annotations_dir`` (every XML in it, images in
    ``test_images_dir``, default ``images_dir``); ``ImageSets/Main/<test_split>.txt`` with the
    pool's folders; and when the root has no ``ImageSets/Main`` at all, every XML of
    ``annotations_dir`` split with ``split_seed`` (test fraction 0.2).
    """
    splits = _voc_splits(
        root,
        pool_split,
        test_split,
        annotations_dir,
        images_dir,
        test_annotations_dir,
        test_images_dir,
        classes,
        skip_invalid,
        test_fraction,
        split_seed,
        use_difficult,
    )
    return limit_splits(splits, max_pool_images, max_test_images, split_seed)


def _voc_splits(
    root: str | Path | None,
    pool_split: str | None,
    test_split: str | None,
    annotations_dir: str,
    images_dir: str,
    test_annotations_dir: str | None,
    test_images_dir: str | None,
    classes: Sequence[str] | None,
    skip_invalid: bool,
    test_fraction: float | None,
    split_seed: int,
    use_difficult: bool,
) -> DatasetSplits:
    path = resolve_root(root)
    checked = _check_classes(classes)
    if (
        pool_split is not None
        and test_annotations_dir is None
        and not (path / "ImageSets" / "Main").is_dir()
    ):
        log.info(
            "%s: no ImageSets/Main split files; every XML in %s is split into pool and test "
            "with dataset.split_seed=%s",
            path,
            path / annotations_dir,
            split_seed,
        )
        pool_split = None
        test_fraction = FALLBACK_TEST_FRACTION if test_fraction is None else test_fraction
    pool_val = Validator(path.name, skip_invalid)
    pool_name = f"{path.name}:{pool_split if pool_split is not None else annotations_dir}"
    pool = _parse(path, pool_split, annotations_dir, images_dir, pool_val)
    if test_fraction is not None:
        names = checked if checked is not None else _classes_of(pool)
        dataset = _assemble(pool, names, pool_val, path.name, use_difficult)
        return seeded_split(dataset, test_fraction, split_seed)

    test_val = Validator(path.name, skip_invalid)
    if test_annotations_dir is not None:
        test_images = test_images_dir if test_images_dir is not None else images_dir
        test = _parse(path, None, test_annotations_dir, test_images, test_val)
        test_name = f"{path.name}:{test_annotations_dir}"
    elif test_split is not None:
        test_images = test_images_dir if test_images_dir is not None else images_dir
        test = _parse(path, test_split, annotations_dir, test_images, test_val)
        test_name = f"{path.name}:{test_split}"
    else:
        raise DatasetError(
            "dataset: no test set; set test_split, test_annotations_dir or test_fraction"
        )
    names = checked if checked is not None else _classes_of([*pool, *test])
    return DatasetSplits(
        pool=_assemble(pool, names, pool_val, pool_name, use_difficult),
        test=_assemble(test, names, test_val, test_name, use_difficult),
    )


# --- several VOC folders under one root (VOC07+12) -------------------------------------------
#: the 20 Pascal VOC classes, in the devkit's order
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

#: what every devkit folder must hold
VOC_LAYOUT = ("Annotations", "JPEGImages", "ImageSets/Main")


def check_voc_folder(folder: Path, split: str, key: str = "dataset.root") -> None:
    """A one-line error naming the first missing piece of a devkit folder (e.g. VOC2012
    without Annotations/) before anything is parsed."""
    for part in VOC_LAYOUT:
        if not (folder / part).is_dir():
            raise DatasetError(
                f"{key}: {folder / part} does not exist; a VOC folder needs "
                f"{', '.join(p + '/' for p in VOC_LAYOUT)} (scripts/prepare_voc.py checks and "
                "downloads them)"
            )
    if not (folder / "ImageSets" / "Main" / f"{split}.txt").is_file():
        raise DatasetError(f"{key}: {folder}/ImageSets/Main/{split}.txt does not exist")


def _parse_entries(root: Path, entries: Sequence[str], val: Validator, key: str) -> list[_Parsed]:
    """``<folder>/<split>`` entries under ``root``; ids become ``<folder>_<id>`` so that two
    folders (VOC2007, VOC2012) can never collide."""
    parsed: list[_Parsed] = []
    for entry in entries:
        folder, _, split = str(entry).rpartition("/")
        if not folder or not split:
            raise DatasetError(f"dataset.{key}: '{entry}' is not <folder>/<split>")
        path = root / folder
        check_voc_folder(path, split)
        for p in _parse(path, split, "Annotations", "JPEGImages", val):
            p.image_id = f"{folder.replace('/', '_')}_{p.image_id}"
            parsed.append(p)
    return parsed


def check_class_lists(classes: Sequence[str], parsed: Sequence[_Parsed], where: str) -> None:
    """The configured class list and the data must agree both ways: a name in the data but not
    in the list fails while parsing (``check_class_name``); a listed class that never occurs
    (a typo such as ``tv`` for ``tvmonitor``) fails here."""
    found = set(_classes_of(parsed))
    absent = [c for c in classes if c not in found]
    if absent:
        raise DatasetError(
            f"dataset.classes: {absent} never occur in {where} (classes found: {sorted(found)})"
        )


def voc_union_splits(
    root: str | Path | None = None,
    pool: Sequence[str] = ("VOC2007/trainval", "VOC2012/trainval"),
    test: Sequence[str] = ("VOC2007/test",),
    classes: Sequence[str] | None = VOC_CLASSES,
    skip_invalid: bool = False,
    split_seed: NonNegativeInt = DEFAULT_SPLIT_SEED,
    use_difficult: bool = False,
    max_pool_images: PositiveInt | None = None,
    max_test_images: PositiveInt | None = None,
) -> DatasetSplits:
    """Pool and test made of several devkit folders under one root, e.g. ``VOCdevkit/`` with
    ``VOC2007/`` and ``VOC2012/``: the VOC07+12 trainval pool (16,551 images) and the VOC07
    test set (4,952) that PPAL, MI-AOD and learning-loss report on.

    ``pool`` and ``test`` list ``<folder>/<split>`` (``ImageSets/Main/<split>.txt``). Image ids
    are ``<folder>_<id>``. ``classes`` (default: the 20 VOC classes, in the devkit's order) must
    match the data both ways.
    """
    path = resolve_root(root)
    checked = _check_classes(classes)
    pool_val = Validator(path.name, skip_invalid)
    test_val = Validator(path.name, skip_invalid)
    pool_parsed = _parse_entries(path, pool, pool_val, "pool")
    test_parsed = _parse_entries(path, test, test_val, "test")
    names = checked if checked is not None else _classes_of([*pool_parsed, *test_parsed])
    if checked is not None:
        check_class_lists(checked, [*pool_parsed, *test_parsed], f"{path} ({', '.join(pool)})")
    pool_name, test_name = (f"{path.name}:{'+'.join(entries)}" for entries in (pool, test))
    splits = DatasetSplits(
        pool=_assemble(pool_parsed, names, pool_val, pool_name, use_difficult),
        test=_assemble(test_parsed, names, test_val, test_name, use_difficult),
    )
    return limit_splits(splits, max_pool_images, max_test_images, split_seed)
