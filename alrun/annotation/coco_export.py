"""COCO: the batch with the model's predictions as pre-annotations, and a COCO file back.

The file alrun writes imports into CVAT ("Upload annotations", COCO 1.0) or any COCO tool; the
one read back is COCO as CVAT exports it: ``images`` (``id``, ``file_name``, ``width``,
``height``), ``categories`` (``id``, ``name``), ``annotations`` (``bbox`` [x, y, w, h] pixels;
points as COCO keypoints ``[x, y, v, ...]``). CVAT drops custom fields, so images are matched by
file name and an ``info.alrun_*`` block, when present, is checked like Label Studio's ids; an
image listed without annotations was looked at and holds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alrun.annotation.batch import Batch, Drawn, Prelabels
from alrun.errors import AlrunError


def coco_file(batch: Batch, prelabels: Mapping[str, Prelabels]) -> dict[str, Any]:
    """The batch as COCO; predicted boxes as annotations carrying their ``score``."""
    images, annotations = [], []
    for number, image in enumerate(batch.images, start=1):
        images.append(
            {
                "id": number,
                "file_name": image.file,
                "width": image.width,
                "height": image.height,
                "alrun_id": image.image_id,
            }
        )
        pre = prelabels.get(image.image_id)
        for box, label, score in zip(*(pre.boxes, pre.labels, pre.scores) if pre else ((), (), ())):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": number,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "score": score,
                }
            )
    return {
        "info": {
            "description": f"alrun {batch.name}",
            "alrun_run": batch.run_id,
            "alrun_batch": batch.batch,
            "alrun_part": batch.part,
            "kind": batch.kind,
        },
        "images": images,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(batch.classes)
        ],
        "annotations": annotations,
    }


def read_coco(data: Any, path: Path, batch: Batch) -> list[Drawn]:
    """A COCO export -> what each listed image holds (ids: the batch's, by file name)."""
    where = f"oracle.labels: {path}"
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise AlrunError(
            f"{where}: expected COCO with 'images', 'annotations' and 'categories' lists"
        )
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    if "alrun_run" in info:
        if info["alrun_run"] != batch.run_id:
            raise AlrunError(
                f"{where}: exported for run {info['alrun_run']}, not this run "
                f"({batch.run_id}); expected the export of this run's batch"
            )
        if (info.get("alrun_batch"), info.get("alrun_part")) != (batch.batch, batch.part):
            raise AlrunError(
                f"{where}: exported for batch {info.get('alrun_batch')} part "
                f"{info.get('alrun_part')}, expected batch {batch.batch} part "
                f"{batch.part} ({batch.name})"
            )
    names = {c.get("id"): c.get("name") for c in data["categories"] if isinstance(c, dict)}
    by_file = {Path(image.file).name: image.image_id for image in batch.images}
    ids: dict[Any, tuple[str, str]] = {}
    for number, image in enumerate(data["images"], start=1):
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise AlrunError(f"{where} image {number}: expected 'id' and 'file_name'")
        name = str(image["file_name"])
        image_id = image.get("alrun_id") or by_file.get(Path(name).name, name)
        ids[image["id"]] = (image_id, f"image '{name}'")
    objects: dict[Any, dict[str, list]] = {key: {"boxes": [], "points": []} for key in ids}
    for number, ann in enumerate(data["annotations"], start=1):
        item = f"{where} annotation {ann.get('id', number) if isinstance(ann, dict) else number}"
        if not isinstance(ann, dict) or ann.get("image_id") not in ids:
            raise AlrunError(f"{item}: expected an 'image_id' of an image in the file")
        name = names.get(ann.get("category_id"), f"category_id {ann.get('category_id')}")
        keypoints = ann.get("keypoints")
        if keypoints:
            for x, y, visible in zip(keypoints[0::3], keypoints[1::3], keypoints[2::3]):
                if visible:
                    objects[ann["image_id"]]["points"].append(((float(x), float(y)), name))
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise AlrunError(f"{item}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        objects[ann["image_id"]]["boxes"].append(((x, y, x + w, y + h), name, None))
    return [
        Drawn(image_id, item, tuple(objects[key]["boxes"]), tuple(objects[key]["points"]))
        for key, (image_id, item) in ids.items()
    ]
