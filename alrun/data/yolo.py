"""YOLO txt labels: root/images/<split>/<stem>.<ext> with root/labels/<split>/<stem>.txt.

Each label line is ``class cx cy w h`` normalised to [0, 1]. As in YOLO itself, a missing or empty
label file means an image without objects (a background image), not an error. A malformed line
makes the whole label file unusable, so under ``skip_invalid`` the image is dropped rather than
kept with some of its objects missing. ``image_id`` is the image file's stem. Image sizes come from
the image headers. An optional root/domains.csv (columns ``file`` and ``domain``) fills
``ImageRecord.domain``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import yaml

from alrun.data.dataset import DatasetSplits, DetectionDataset, ImageRecord
from alrun.data.validate import Box, Validator, format_classes, resolve_root, to_arrays
from alrun.errors import DatasetError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def _classes_from_names(names: object, file: Path) -> tuple[str, ...]:
    """``names`` of data.yaml, in list form or ``{id: name}`` form with ids 0..n-1."""
    if isinstance(names, list):
        return tuple(str(n) for n in names)
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(
                f"{file}: 'names' keys must be class ids, got {list(names)}"
            ) from None
        if sorted(by_id) != list(range(len(by_id))):
            raise DatasetError(
                f"{file}: 'names' ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}"
            )
        return tuple(by_id[i] for i in range(len(by_id)))
    raise DatasetError(f"{file}: 'names' must be a list or a mapping of id to name")


def load_yolo_classes(root: Path) -> tuple[str, ...]:
    """Class names from data.yaml ``names``; failing that, labels/classes.txt (one per line)."""
    data_yaml = root / "data.yaml"
    if data_yaml.is_file():
        try:
            data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise DatasetError(f"{data_yaml}: invalid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict) or "names" not in data:
            raise DatasetError(f"{data_yaml}: no 'names' list of classes")
        classes = _classes_from_names(data["names"], data_yaml)
    else:
        classes_txt = root / "labels" / "classes.txt"
        if not classes_txt.is_file():
            raise DatasetError(
                f"{root}: no data.yaml or labels/classes.txt; set dataset.classes explicitly"
            )
        lines = classes_txt.read_text(encoding="utf-8").splitlines()
        classes = tuple(line.strip() for line in lines if line.strip())
    if not classes:
        raise DatasetError(f"{root}: the class list is empty")
    return classes


def load_domains(root: Path) -> dict[str, str] | None:
    """Image file name -> domain from root/domains.csv, or None when there is no such file."""
    path = root / "domains.csv"
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "domain"} <= set(reader.fieldnames):
            raise DatasetError(
                f"{path}: needs columns 'file' and 'domain', has {reader.fieldnames}"
            )
        return {row["file"]: row["domain"] or "" for row in reader}


def _parse_labels(
    label_file: Path,
    width: int,
    height: int,
    classes: Sequence[str],
    val: Validator,
) -> tuple[list[Box], list[int]] | None:
    """Boxes (absolute xyxy) and labels of one label file; None (recorded) drops the image."""
    boxes: list[Box] = []
    labels: list[int] = []
    if not label_file.is_file():
        return boxes, labels
    try:
        text = label_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        val.fail(label_file, f"cannot read label file ({err})")
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            values = []
        if len(tokens) != 5 or len(values) != 5 or not values[0].is_integer():
            val.fail(
                label_file, f"line {lineno}: expected 'class cx cy w h' (5 numbers), got {line!r}"
            )
            return None
        class_id = int(values[0])
        if val.check_class_id(label_file, f"line {lineno}", class_id, classes) is None:
            continue
        cx, cy, w, h = values[1:]
        xyxy = (
            (cx - w / 2) * width,
            (cy - h / 2) * height,
            (cx + w / 2) * width,
            (cy + h / 2) * height,
        )
        item = f"line {lineno} ({classes[class_id]})"
        box = val.check_box(label_file, item, xyxy, width, height)
        if box is not None:
            boxes.append(box)
            labels.append(class_id)
    return boxes, labels


def read_yolo(
    root: str | Path,
    split: str = "train",
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    name: str | None = None,
) -> DetectionDataset:
    """Read one YOLO split; classes from data.yaml unless given (they must cover every id used)."""
    path = resolve_root(root)
    names = tuple(str(c) for c in classes) if classes is not None else load_yolo_classes(path)
    if len(set(names)) != len(names):
        raise DatasetError(f"dataset.classes: duplicate names in {list(names)}")
    image_dir = path / "images" / split
    if not image_dir.is_dir():
        parent = path / "images"
        known = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise DatasetError(f"dataset.split: {image_dir} does not exist; available splits: {known}")
    label_dir = path / "labels" / split
    domains = load_domains(path) or {}
    val = Validator(name or path.name, skip_invalid)
    images = sorted(
        (p.stem, p)
        for p in image_dir.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    records = []
    seen: set[str] = set()
    for image_id, image in images:
        if not val.check_unique(image, image_id, seen):
            continue
        size = val.image_size(image)
        if size is None:
            continue
        parsed = _parse_labels(label_dir / f"{image_id}.txt", size[0], size[1], names, val)
        if parsed is None:
            continue
        box_arr, label_arr = to_arrays(*parsed)
        records.append(
            ImageRecord(
                image_id, image, size[0], size[1], box_arr, label_arr, domains.get(image.name, "")
            )
        )
    return DetectionDataset(
        name or f"{path.name}:{split}", names, tuple(records), tuple(val.skipped)
    )


def _keep_domains(dataset: DetectionDataset, domains: set[str]) -> DetectionDataset:
    images = tuple(rec for rec in dataset.images if rec.domain in domains)
    return DetectionDataset(dataset.name, dataset.classes, images, dataset.skipped)


def yolo_splits(
    root: str | Path,
    pool_split: str = "train",
    test_split: str = "test",
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    domains: Sequence[str] | None = None,
) -> DatasetSplits:
    """Pool and test splits, optionally only images of ``domains`` (per domains.csv) in both."""
    path = resolve_root(root)
    names = tuple(classes) if classes is not None else load_yolo_classes(path)
    pool = read_yolo(path, pool_split, names, skip_invalid)
    test = read_yolo(path, test_split, names, skip_invalid)
    if domains is not None:
        known_map = load_domains(path)
        if known_map is None:
            raise DatasetError(f"dataset.domains: {path / 'domains.csv'} does not exist")
        known = sorted(set(known_map.values()))
        unknown = [d for d in domains if d not in known]
        if unknown:
            raise DatasetError(
                f"dataset.domains: unknown domains {unknown}; "
                f"known domains: {format_classes(known)}"
            )
        pool, test = _keep_domains(pool, set(domains)), _keep_domains(test, set(domains))
    return DatasetSplits(pool=pool, test=test)
