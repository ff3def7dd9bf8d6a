"""Label Studio: the label config, the import (tasks with ``predictions``) and its JSON export.

Label Studio stores regions in percent of the image (``value.x``, ``value.y``,
``value.width``, ``value.height`` in 0..100) and the seconds an annotator spent on a task in
each annotation's ``lead_time`` (https://labelstud.io/guide/task_format). alrun's ids
(``alrun_run``, ``alrun_batch``, ``alrun_part``, ``image_id``) travel in each task's ``data``,
which Label Studio keeps in its export, so an export for another round or run is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from alrun.annotation.batch import Batch, Drawn, Prelabels
from alrun.errors import AlrunError

#: per kind: the control tag, the result ``type`` it produces, and its extra attributes
CONTROLS = {
    "box": ("RectangleLabels", "rectanglelabels", ""),
    "verify": ("RectangleLabels", "rectanglelabels", ""),
    "click": ("KeyPointLabels", "keypointlabels", ""),
    "center_click": ("KeyPointLabels", "keypointlabels", ""),
    "image_label": ("Choices", "choices", ' choice="multiple"'),
}
FROM_NAME, TO_NAME = "label", "image"


def label_config(kind: str, classes: Sequence[str]) -> str:
    """The labeling interface XML for ``kind`` (paste into the project's Labeling Setup)."""
    tag, _, extra = CONTROLS[kind]
    child = "Choice" if tag == "Choices" else "Label"
    items = "\n".join(f"    <{child} value={quoteattr(name)}/>" for name in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <{tag} name="{FROM_NAME}" toName="{TO_NAME}"{extra}>\n{items}\n  </{tag}>\n'
        "</View>\n"
    )


def tasks(
    batch: Batch, prelabels: Mapping[str, Prelabels], image_url: str, model_version: str
) -> list[dict[str, Any]]:
    """One task per image; the model's boxes as a ``predictions`` entry (box and verify
    batches; a click or image-label batch gets the predicted classes as points / choices)."""
    out = []
    for image in batch.images:
        data = {
            "image": image_url.format(file=image.file, image_id=image.image_id),
            "image_id": image.image_id,
            "alrun_run": batch.run_id,
            "alrun_batch": batch.batch,
            "alrun_part": batch.part,
        }
        task: dict[str, Any] = {"data": data}
        pre = prelabels.get(image.image_id)
        if pre is not None:
            result = _prediction(batch, image.width, image.height, pre)
            score = max(pre.scores, default=0.0)
            task["predictions"] = [
                {"model_version": model_version, "score": score, "result": result}
            ]
        out.append(task)
    return out


def _prediction(batch: Batch, width: int, height: int, pre: Prelabels) -> list[dict[str, Any]]:
    tag, kind_type, _ = CONTROLS[batch.kind]
    common = {
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": kind_type,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
    }
    if batch.kind == "image_label":
        names = sorted({batch.classes[c] for c in pre.labels}, key=batch.classes.index)
        return [{**common, "id": "p0", "value": {"choices": names}}] if names else []
    result = []
    for n, (box, label, score) in enumerate(zip(pre.boxes, pre.labels, pre.scores)):
        x1, y1, x2, y2 = box
        name = batch.classes[label]
        if tag == "RectangleLabels":
            value = {
                "x": 100 * x1 / width,
                "y": 100 * y1 / height,
                "width": 100 * (x2 - x1) / width,
                "height": 100 * (y2 - y1) / height,
                "rotation": 0,
                "rectanglelabels": [name],
            }
        else:  # a click at the predicted box's center
            value = {
                "x": 50 * (x1 + x2) / width,
                "y": 50 * (y1 + y2) / height,
                "width": 0.5,
                "keypointlabels": [name],
            }
        result.append({**common, "id": f"p{n}", "value": value, "score": score})
    return result


def read_export(data: Any, path: Path, batch: Batch) -> list[Drawn]:
    """Label Studio's JSON export (a list of tasks) -> what each task's annotation holds."""
    if not isinstance(data, list):
        raise AlrunError(
            f"oracle.labels: {path}: expected Label Studio's JSON export (a list of tasks)"
        )
    drawn = []
    for number, task in enumerate(data, start=1):
        item = f"task {task.get('id', number) if isinstance(task, dict) else number}"
        where = f"oracle.labels: {path} {item}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise AlrunError(f"{where}: expected a task object with 'data'")
        _check_ids(task["data"], batch, where)
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not done:
            continue  # not annotated yet: the image is missing from this export
        if len(done) > 1:
            raise AlrunError(
                f"{where}: {len(done)} annotations of image '{task['data']['image_id']}'; "
                "expected one (keep the reviewed one in Label Studio, then export again)"
            )
        drawn.append(_drawn(task["data"]["image_id"], done[0], item, where, batch))
    return drawn


def _check_ids(data: Mapping[str, Any], batch: Batch, where: str) -> None:
    if "image_id" not in data or "alrun_run" not in data:
        raise AlrunError(
            f"{where}: no alrun ids in the task data; expected tasks imported from alrun's "
            "labelstudio_tasks.json"
        )
    if data["alrun_run"] != batch.run_id:
        raise AlrunError(
            f"{where}: exported for run {data['alrun_run']}, not this run ({batch.run_id}); "
            "expected the export of this run's batch"
        )
    if (data.get("alrun_batch"), data.get("alrun_part")) != (batch.batch, batch.part):
        raise AlrunError(
            f"{where}: exported for batch {data.get('alrun_batch')} part {data.get('alrun_part')}, "
            f"expected batch {batch.batch} part {batch.part} ({batch.name})"
        )


def _drawn(
    image_id: str, annotation: Mapping[str, Any], item: str, where: str, batch: Batch
) -> Drawn:
    image = batch.by_id().get(image_id)
    if image is None:  # not in this batch: refused by the import with the batch's ids at hand
        return Drawn(image_id, item)
    boxes, points, choices = [], [], []
    for region in annotation.get("result") or []:
        kind_type, value = region.get("type"), region.get("value") or {}
        width, height = image.width, image.height
        if kind_type in ("rectanglelabels", "keypointlabels"):
            width = region.get("original_width", image.width)
            height = region.get("original_height", image.height)
            if (width, height) != (image.width, image.height):
                raise AlrunError(
                    f"{where}: image '{image_id}' annotated at {width}x{height}; expected "
                    f"{image.width}x{image.height}"
                )
        try:
            if kind_type == "rectanglelabels":
                if value.get("rotation", 0):
                    raise AlrunError(
                        f"{where}: rotated box in image '{image_id}'; expected rotation 0"
                    )
                x, y = value["x"] * width / 100, value["y"] * height / 100
                w, h = value["width"] * width / 100, value["height"] * height / 100
                for name in value["rectanglelabels"]:
                    boxes.append(((x, y, x + w, y + h), name, region.get("id")))
            elif kind_type == "keypointlabels":
                point = (value["x"] * width / 100, value["y"] * height / 100)
                for name in value["keypointlabels"]:
                    points.append((point, name))
            elif kind_type == "choices":
                choices.extend(value["choices"])
            else:
                raise AlrunError(
                    f"{where}: region type {kind_type!r} in image '{image_id}'; expected "
                    "rectanglelabels, keypointlabels or choices"
                )
        except (KeyError, TypeError) as err:
            raise AlrunError(
                f"{where}: {kind_type} region without {err}; expected Label Studio's export format"
            ) from None
    seconds = annotation.get("lead_time")
    if seconds is not None and (
        not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0
    ):
        raise AlrunError(f"{where}: lead_time {seconds!r}; expected seconds >= 0")
    return Drawn(
        image_id,
        item,
        tuple(boxes),
        tuple(points),
        tuple(choices),
        None if seconds is None else float(seconds),
    )
