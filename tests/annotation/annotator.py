"""The test plays the annotator: it reads what alrun exported and writes an export the way
Label Studio (JSON export, https://labelstud.io/guide/task_format) and CVAT (COCO 1.0) write
them, from the dataset's hidden truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def truth_labels(record, kind: str, classes, proposals=None):
    """(boxes, points, choices) a careful annotator gives for ``kind`` (names, pixels)."""
    boxes = [tuple(map(float, b)) for b in np.asarray(record.boxes).reshape(-1, 4)]
    names = [classes[int(c)] for c in record.labels]
    if kind in ("box", "verify"):  # verify: the test edits which proposals stay
        return list(zip(boxes, names)), [], []
    if kind in ("click", "center_click"):
        centers = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
        return [], list(zip(centers, names)), []
    if kind == "image_label":
        return [], [], sorted(set(names), key=list(classes).index)
    raise ValueError(kind)


def labelstudio_export(folder: Path, records, classes, seconds=7.5, skip=()) -> list[dict]:
    """Label Studio's JSON export of the tasks in ``folder``: each task annotated from the
    truth with ``lead_time`` = ``seconds`` (a number or a function of the record)."""
    tasks = json.loads((folder / "labelstudio_tasks.json").read_text())
    kind = json.loads((folder / "manifest.json").read_text())["kind"]
    out = []
    for number, task in enumerate(tasks, start=1):
        record = records[task["data"]["image_id"]]
        exported = {
            "id": number,
            "data": task["data"],
            "annotations": [],
            "predictions": task.get("predictions", []),
            "drafts": [],
            "meta": {},
            "created_at": "2026-12-04T10:00:00.000000Z",
            "updated_at": "2026-12-04T10:05:00.000000Z",
            "inner_id": number,
            "total_annotations": 1,
            "cancelled_annotations": 0,
            "total_predictions": len(task.get("predictions", [])),
            "project": 3,
            "file_upload": None,
        }
        if record.image_id not in skip:
            lead = seconds(record) if callable(seconds) else seconds
            result = ls_result(record, kind, classes)
            exported["annotations"].append(
                {
                    "id": 100 + number,
                    "completed_by": 1,
                    "result": result,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "created_at": "2026-12-04T10:05:00.000000Z",
                    "updated_at": "2026-12-04T10:05:00.000000Z",
                    "lead_time": lead,
                    "prediction": {},
                    "result_count": len(result),
                    "task": number,
                    "project": 3,
                    "parent_prediction": None,
                    "parent_annotation": None,
                }
            )
        out.append(exported)
    return out


def ls_result(record, kind, classes) -> list[dict]:
    w, h = record.width, record.height
    common = {
        "from_name": "label",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "origin": "manual",
    }
    boxes, points, choices = truth_labels(record, kind, classes)
    result = []
    for n, ((x1, y1, x2, y2), name) in enumerate(boxes):
        value = {
            "x": 100 * x1 / w,
            "y": 100 * y1 / h,
            "width": 100 * (x2 - x1) / w,
            "height": 100 * (y2 - y1) / h,
            "rotation": 0,
            "rectanglelabels": [name],
        }
        result.append({**common, "id": f"m{n}", "type": "rectanglelabels", "value": value})
    for n, ((x, y), name) in enumerate(points):
        value = {"x": 100 * x / w, "y": 100 * y / h, "width": 0.5, "keypointlabels": [name]}
        result.append({**common, "id": f"k{n}", "type": "keypointlabels", "value": value})
    if choices:
        result.append({**common, "id": "c0", "type": "choices", "value": {"choices": choices}})
    return result


def cvat_coco(folder: Path, records, classes, skip=()) -> dict:
    """CVAT's COCO 1.0 export of the batch: its own ids and info, file names only, no alrun
    fields; boxes from the truth."""
    coco = json.loads((folder / "coco_prelabels.json").read_text())
    images, annotations = [], []
    for number, image in enumerate(coco["images"], start=1):
        record = records[image["alrun_id"]]
        if record.image_id in skip:
            continue
        images.append(
            {
                "id": number,
                "width": image["width"],
                "height": image["height"],
                "file_name": Path(image["file_name"]).name,
                "license": 0,
                "flickr_url": "",
                "coco_url": "",
                "date_captured": 0,
            }
        )
        boxes, _, _ = truth_labels(record, "box", classes)
        for (x1, y1, x2, y2), name in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": number,
                    "category_id": list(classes).index(name) + 1,
                    "segmentation": [],
                    "area": (x2 - x1) * (y2 - y1),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                    "attributes": {"occluded": False, "rotation": 0.0},
                }
            )
    return {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {
            "contributor": "",
            "date_created": "",
            "description": "",
            "url": "",
            "version": "",
            "year": "",
        },
        "categories": [
            {"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(classes)
        ],
        "images": images,
        "annotations": annotations,
    }
