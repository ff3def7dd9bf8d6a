"""Tiny fabricated datasets in each on-disk layout the readers accept (COCO, VOC, YOLO)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

#: (stem, [(class id, xyxy box)]) for every fabricated image; sizes are 40x30.
OBJECTS = {f"im{i:02d}": [(i % 2, (2.0 + i, 3.0, 20.0 + i, 25.0))] for i in range(12)}
CLASSES = ("cat", "dog")
SIZE = (40, 30)


def save_image(path: Path, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def make_coco(root: Path, stems: list[str] | None = None) -> Path:
    """root/images/<stem>.png + root/ann.json; returns the annotation file."""
    images, annotations = [], []
    for i, stem in enumerate(stems or list(OBJECTS)):
        save_image(root / "images" / f"{stem}.png")
        images.append({"id": i + 1, "file_name": f"images/{stem}.png", "width": 40, "height": 30})
        for cls, (x1, y1, x2, y2) in OBJECTS.get(stem, []):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    file = root / "ann.json"
    file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return file


def voc_xml(filename: str, objects, size: tuple[int, int] | None = SIZE) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    objs = "".join(
        f"<object><name>{CLASSES[c]}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, b in objects
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def make_voc(
    root: Path,
    annotations_dir: str = "Annotations",
    images_dir: str = "JPEGImages",
    split_files: bool = True,
    stems: list[str] | None = None,
) -> Path:
    """A VOC folder; ``split_files=False`` leaves out ImageSets/ (annotations/ + images/ style)."""
    stems = stems or list(OBJECTS)
    for stem in stems:
        save_image(root / images_dir / f"{stem}.jpg")
        xml = root / annotations_dir / f"{stem}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(voc_xml(f"{stem}.jpg", OBJECTS.get(stem, [])))
    if split_files:
        main = root / "ImageSets" / "Main"
        main.mkdir(parents=True)
        (main / "trainval.txt").write_text("\n".join(stems[:8]) + "\n")
        (main / "test.txt").write_text("\n".join(stems[8:]) + "\n")
    return root


def yolo_line(cls: int, box, size: tuple[int, int] = SIZE) -> str:
    x1, y1, x2, y2 = box
    w, h = size
    return f"{cls} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n"


def write_yolo_image(image_dir: Path, label_dir: Path, stem: str) -> None:
    save_image(image_dir / f"{stem}.png")
    label_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(yolo_line(c, b) for c, b in OBJECTS.get(stem, []))
    (label_dir / f"{stem}.txt").write_text(text)


def make_yolo(root: Path, layout: str = "images/split", data_yaml: str | None = None) -> Path:
    """A YOLO folder: ``images/split`` (images/train, labels/train) or ``split/images``
    (train/images, train/labels, what Roboflow and most exporters write). Train holds the
    first 8 images, val the rest. ``data_yaml``: the text of root/data.yaml (default: names)."""
    stems = list(OBJECTS)
    for split, chunk in (("train", stems[:8]), ("val", stems[8:])):
        if layout == "images/split":
            image_dir, label_dir = root / "images" / split, root / "labels" / split
        else:
            image_dir, label_dir = root / split / "images", root / split / "labels"
        for stem in chunk:
            write_yolo_image(image_dir, label_dir, stem)
    (root / "data.yaml").write_text(data_yaml or f"names: {list(CLASSES)}\n")
    return root
