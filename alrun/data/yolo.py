"""YOLO txt labels, laid out as Ultralytics describes them.

Where a split's images are, first match wins:

* ``data.yaml`` (in ``root``, or ``root`` is the yaml file itself) names the split: ``path`` (the
  dataset dir; relative to the yaml's folder, default that folder), and ``train`` / ``val`` /
  ``test``, each a directory of images (searched recursively), a txt file listing image paths
  (relative ones are relative to the txt's folder), or a list of those. As in Ultralytics, an
  entry ``../x`` that does not exist is also tried as ``x`` (Roboflow exports write ``../train``).
* otherwise ``root/images/<split>`` or ``root/<split>/images`` (what most exporters write).

A label file is the image path with its last ``images`` component replaced by ``labels`` and the
suffix by ``.txt`` (``images/train/a.jpg`` -> ``labels/train/a.txt``, ``train/images/a.jpg`` ->
``train/labels/a.txt``). Each label line is ``class cx cy w h`` normalised to [0, 1]. As in YOLO
itself, a missing or empty label file means an image without objects (a background image), not an
error; a split in which *every* label file is missing or empty is logged as a warning, since it is
almost always a wrong labels folder. A malformed line makes the whole label file unusable, so
under ``skip_invalid`` the image is dropped rather than kept with some of its objects missing.
``image_id`` is the image file's stem. Image sizes come from the image headers (EXIF orientation
applied). An optional root/domains.csv (columns ``file`` and ``domain``) fills
``ImageRecord.domain``. A split named null (``test_split: null``), is a seeded split of the pool
(``test_fraction``, ``split_seed``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alrun.data.dataset import (
    DEFAULT_SPLIT_SEED,
    DatasetSplits,
    DetectionDataset,
    ImageRecord,
    limit_splits,
    seeded_split,
)
from alrun.data.validate import Box, Validator, format_classes, resolve_root, to_arrays
from alrun.errors import DatasetError
from alrun.params import NonNegativeInt, PositiveInt, StrictFraction

log = logging.getLogger("alrun")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DATA_YAML_NAMES = ("data.yaml", "data.yml")


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


@dataclass(frozen=True)
class YoloLayout:
    """Where a YOLO dataset lives: its folder and, when it has one, its parsed data.yaml."""

    root: Path  # the dataset folder (data.yaml's ``path``, or the folder given)
    data_yaml: Path | None
    data: dict[str, Any]


def find_layout(root: str | Path | None) -> YoloLayout:
    """The dataset folder and data.yaml of ``dataset.root`` (a folder or the yaml file)."""
    given = resolve_root(root)
    if given.is_file():
        data_yaml: Path | None = given
        folder = given.parent
    else:
        data_yaml = next((given / n for n in DATA_YAML_NAMES if (given / n).is_file()), None)
        folder = given
    if data_yaml is None:
        return YoloLayout(folder, None, {})
    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DatasetError(f"{data_yaml}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{data_yaml}: expected a mapping with 'names' and split keys")
    base = data.get("path")
    if base not in (None, ""):
        base_path = Path(str(base)).expanduser()
        folder = (base_path if base_path.is_absolute() else data_yaml.parent / base_path).resolve()
        if not folder.is_dir():
            raise DatasetError(f"{data_yaml}: 'path' names {folder}, which does not exist")
    return YoloLayout(folder, data_yaml, data)


def load_yolo_classes(root: str | Path | YoloLayout) -> tuple[str, ...]:
    """Class names from data.yaml ``names``; failing that, labels/classes.txt (one per line)."""
    layout = root if isinstance(root, YoloLayout) else find_layout(root)
    root = layout.root
    if layout.data_yaml is not None:
        if "names" not in layout.data:
            raise DatasetError(f"{layout.data_yaml}: no 'names' list of classes")
        classes = _classes_from_names(layout.data["names"], layout.data_yaml)
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


def label_path(image: Path) -> Path:
    """The label file of an image: the last ``images`` path component becomes ``labels``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _images_in(source: Path, data_yaml: Path, key: str) -> list[Path]:
    """Image paths of one data.yaml entry: a folder (recursive) or a txt list of paths."""
    if source.is_dir():
        return [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if source.suffix.lower() == ".txt":
        lines = source.read_text(encoding="utf-8").splitlines()
        paths = [Path(line.strip()).expanduser() for line in lines if line.strip()]
        return [(p if p.is_absolute() else source.parent / p).resolve() for p in paths]
    raise DatasetError(
        f"{data_yaml}: '{key}' names {source}, which is neither a folder nor a .txt list of images"
    )


def _resolve_entry(layout: YoloLayout, entry: object, key: str) -> Path:
    assert layout.data_yaml is not None
    text = str(entry).strip()
    candidate = Path(text).expanduser()
    path = candidate if candidate.is_absolute() else layout.root / candidate
    if not path.exists() and text.startswith("../"):
        fallback = layout.root / text[3:]  # Ultralytics' fallback for Roboflow-style exports
        path = fallback if fallback.exists() else path
    path = path.resolve()
    if not path.exists():
        raise DatasetError(f"{layout.data_yaml}: '{key}' names {path}, which does not exist")
    return path


def split_images(layout: YoloLayout, split: str) -> tuple[list[Path], str]:
    """The image paths of a split and a description of where they came from (for messages)."""
    if layout.data_yaml is not None and layout.data.get(split) not in (None, "", []):
        entries = layout.data[split]
        entries = entries if isinstance(entries, list) else [entries]
        images: list[Path] = []
        for entry in entries:
            images += _images_in(_resolve_entry(layout, entry, split), layout.data_yaml, split)
        return images, f"{layout.data_yaml} '{split}'"
    if layout.data_yaml is not None and any(k in layout.data for k in ("train", "val", "test")):
        known = [k for k in ("train", "val", "test") if layout.data.get(k) not in (None, "", [])]
        raise DatasetError(
            f"{layout.data_yaml}: no '{split}' split (it names {known}); set dataset.pool_split / "
            "dataset.test_split to one of them, or dataset.test_split=null to split the pool "
            "with dataset.split_seed"
        )
    for image_dir in (layout.root / "images" / split, layout.root / split / "images"):
        if image_dir.is_dir():
            images = [
                p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            ]
            return images, str(image_dir)
    known = sorted(
        {p.name for p in (layout.root / "images").iterdir() if p.is_dir()}
        if (layout.root / "images").is_dir()
        else set()
    )
    known += sorted(p.name for p in layout.root.iterdir() if p.is_dir() and (p / "images").is_dir())
    raise DatasetError(
        f"dataset.split: neither {layout.root / 'images' / split} nor "
        f"{layout.root / split / 'images'} exists; available splits: {sorted(set(known))}"
    )


def _read_split(
    layout: YoloLayout,
    split: str,
    names: tuple[str, ...],
    skip_invalid: bool,
    name: str,
) -> DetectionDataset:
    images, where = split_images(layout, split)
    domains = load_domains(layout.root) or {}
    val = Validator(name, skip_invalid)
    records = []
    seen: set[str] = set()
    for image_id, image in sorted((p.stem, p) for p in images):
        if not val.check_image_file(image):
            continue
        if not val.check_unique(image, image_id, seen):
            continue
        size = val.image_size(image)
        if size is None:
            continue
        parsed = _parse_labels(label_path(image), size[0], size[1], names, val)
        if parsed is None:
            continue
        box_arr, label_arr = to_arrays(*parsed)
        records.append(
            ImageRecord(
                image_id, image, size[0], size[1], box_arr, label_arr, domains.get(image.name, "")
            )
        )
    if records and all(rec.num_boxes == 0 for rec in records):
        log.warning(
            "%s: every label file of its %d images is missing or empty (the first is looked "
            "for at %s); is the labels folder where YOLO expects it?",
            where,
            len(records),
            label_path(records[0].file),
        )
    return DetectionDataset(name, names, tuple(records), tuple(val.skipped))


def _names(layout: YoloLayout, classes: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(str(c) for c in classes) if classes is not None else load_yolo_classes(layout)
    if len(set(names)) != len(names):
        raise DatasetError(f"dataset.classes: duplicate names in {list(names)}")
    return names


def read_yolo(
    root: str | Path,
    split: str = "train",
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    name: str | None = None,
) -> DetectionDataset:
    """Read one YOLO split; classes from data.yaml unless given (they must cover every id used)."""
    layout = find_layout(root)
    names = _names(layout, classes)
    return _read_split(layout, split, names, skip_invalid, name or f"{layout.root.name}:{split}")


def _keep_domains(dataset: DetectionDataset, domains: set[str]) -> DetectionDataset:
    images = tuple(rec for rec in dataset.images if rec.domain in domains)
    return DetectionDataset(dataset.name, dataset.classes, images, dataset.skipped)


def yolo_splits(
    root: str | Path | None = None,
    pool_split: str = "train",
    test_split: str | None = "test",
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    domains: Sequence[str] | None = None,
    test_fraction: StrictFraction = 0.2,
    split_seed: NonNegativeInt = DEFAULT_SPLIT_SEED,
    max_pool_images: PositiveInt | None = None,
    max_test_images: PositiveInt | None = None,
) -> DatasetSplits:
    """Pool and test splits, optionally only images of ``domains`` (per domains.csv) in both.

    ``test_split=None`` splits the pool split itself (``test_fraction``, ``split_seed``).
    """
    layout = find_layout(root)
    names = _names(layout, classes)
    label = layout.root.name
    pool = _read_split(layout, pool_split, names, skip_invalid, f"{label}:{pool_split}")
    if test_split is not None:
        test = _read_split(layout, test_split, names, skip_invalid, f"{label}:{test_split}")
    if domains is not None:
        known_map = load_domains(layout.root)
        if known_map is None:
            raise DatasetError(f"dataset.domains: {layout.root / 'domains.csv'} does not exist")
        known = sorted(set(known_map.values()))
        unknown = [d for d in domains if d not in known]
        if unknown:
            raise DatasetError(
                f"dataset.domains: unknown domains {unknown}; "
                f"known domains: {format_classes(known)}"
            )
        pool = _keep_domains(pool, set(domains))
        if test_split is not None:
            test = _keep_domains(test, set(domains))
    if test_split is None:
        splits = seeded_split(pool, test_fraction, split_seed)
    else:
        splits = DatasetSplits(pool=pool, test=test)
    return limit_splits(splits, max_pool_images, max_test_images, split_seed)
