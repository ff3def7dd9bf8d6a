"""Tiny fabricated copies of the official VOC07+12 and COCO 2017 layouts (for the dataset
configs voc0712/coco2017, the paper presets and scripts/prepare_{voc,coco}.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.data.builders import OBJECTS, make_coco, make_voc

STEMS = list(OBJECTS)


def make_vocdevkit(root: Path) -> Path:
    """root/VOC2007 (trainval 8, test 4 images) and root/VOC2012 (trainval 6); classes cat, dog."""
    make_voc(root / "VOC2007", stems=STEMS)
    make_voc(root / "VOC2012", stems=STEMS[:6])
    (root / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(STEMS[:6]))
    (root / "VOC2012" / "ImageSets" / "Main" / "test.txt").unlink()
    return root


def make_coco_root(root: Path) -> Path:
    """root/{train2017,val2017}/images/*.png and root/annotations/instances_{split}.json."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for offset, split, stems in ((0, "train2017", STEMS[:8]), (1000, "val2017", STEMS[8:])):
        data = json.loads(make_coco(root / split, stems).read_text())
        for item in (*data["images"], *data["annotations"]):  # COCO ids are unique across splits
            key = "id" if "file_name" in item else "image_id"
            item[key] += offset
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split / "ann.json").unlink()
    return root
