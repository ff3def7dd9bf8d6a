"""Read a tool's export back and check it against the batch alrun asked for.

Everything is checked before anything is imported: an image that was not selected, a
selected image missing (unless ``partial``), an unknown class, a box outside the image, the
same image or box twice, and a label of another kind than the batch asked for (a point where
a box was asked). Each problem is one line naming the file, the item and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alrun.annotation.batch import Batch, BatchImage, Drawn, Prelabels
from alrun.annotation.coco_export import read_coco
from alrun.annotation.labelstudio import read_export
from alrun.errors import AlrunError
from alrun.oracle import CostModel, pairwise_iou
from alrun.types import ImageLabels

#: a tool's rounding (percent coordinates) may put an edge this many pixels past the image
EDGE_TOLERANCE_PX = 0.5
#: a kept box of a verification batch is the proposal it overlaps this much (COCO keeps no ids)
SAME_BOX_IOU = 0.9


@dataclass(frozen=True)
class Imported:
    """One image's labels and its seconds: the annotator's (``real_s``, when the export has
    them) beside the cost model's price of what was drawn (``model_s``)."""

    labels: ImageLabels
    real_s: float | None
    model_s: float
    counts: dict[str, int]

    def record(self) -> dict:
        return {
            "image_id": self.labels.image_id,
            "kind": self.labels.kind,
            "real_s": self.real_s,
            "model_s": self.model_s,
            **self.counts,
        }


def read_labels_file(path: Path, batch: Batch) -> list[Drawn]:
    """Label Studio JSON export (a list) or COCO (an object), told apart by their shape."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AlrunError(
            f"oracle.labels: {path}: not JSON ({err}); expected Label Studio's JSON "
            "export or a COCO file"
        ) from None
    if isinstance(data, list):
        return read_export(data, path, batch)
    return read_coco(data, path, batch)


def check_export(
    path: Path,
    drawn: Sequence[Drawn],
    batch: Batch,
    wanted: Sequence[str],
    cost_model: CostModel,
    proposals: Mapping[str, Prelabels],
) -> dict[str, Imported]:
    """The labels of the images in ``wanted`` (ids of the batch still awaiting) found in the
    export, checked; raises on the first problem."""
    images = batch.by_id()
    seen: dict[str, str] = {}
    out: dict[str, Imported] = {}
    for entry in drawn:
        where = f"oracle.labels: {path} {entry.item}"
        if entry.image_id not in images:
            raise AlrunError(
                f"{where}: image '{entry.image_id}' was not selected in {batch.name}; "
                f"expected one of its {len(images)} images"
            )
        if entry.image_id in seen:
            raise AlrunError(
                f"{where}: image '{entry.image_id}' again (first in {seen[entry.image_id]});"
                " expected each image once"
            )
        seen[entry.image_id] = entry.item
        if entry.image_id not in wanted:
            continue  # imported from an earlier partial export
        image = images[entry.image_id]
        where = f"{where} (image '{entry.image_id}', {image.width}x{image.height})"
        out[entry.image_id] = _labels(
            entry, image, batch, where, cost_model, proposals.get(entry.image_id)
        )
    return out


def _labels(
    entry: Drawn,
    image: BatchImage,
    batch: Batch,
    where: str,
    cost_model: CostModel,
    proposal: Prelabels | None,
) -> Imported:
    kind, classes = batch.kind, batch.classes
    asked = {
        "box": "a box",
        "verify": "a box",
        "click": "a click",
        "center_click": "a click",
        "image_label": "image-level choices",
    }[kind]
    if entry.points and kind not in ("click", "center_click"):
        raise AlrunError(f"{where}: a point where {asked} was asked; expected {kind} labels")
    if entry.boxes and kind in ("click", "center_click", "image_label"):
        raise AlrunError(f"{where}: a box where {asked} was asked; expected {kind} labels")
    if entry.choices and kind != "image_label":
        raise AlrunError(
            f"{where}: image-level choices where {asked} was asked; expected {kind} labels"
        )
    no_boxes = np.zeros((0, 4), np.float32)
    if kind == "image_label":
        present = np.unique(_indices([c for c in entry.choices], classes, where))
        answer = ImageLabels(
            image.image_id, kind, no_boxes, np.zeros(0, np.int64), 0.0, image_classes=present
        )
        n_classes = len(present)
        counts = {"objects": 0, "classes": n_classes}
    elif kind in ("click", "center_click"):
        labels = _indices([name for _, name in entry.points], classes, where)
        points = np.asarray([p for p, _ in entry.points], np.float32).reshape(-1, 2)
        points = _inside(points, image, "click", where)
        answer = ImageLabels(image.image_id, kind, no_boxes, labels, 0.0, points=points)
        counts = {"objects": len(labels), "classes": len(set(labels.tolist()))}
    else:
        labels = _indices([name for _, name, _ in entry.boxes], classes, where)
        boxes = np.asarray([b for b, _, _ in entry.boxes], np.float32).reshape(-1, 4)
        boxes = _boxes(boxes, labels, image, where)
        if kind == "box":
            answer = ImageLabels(image.image_id, kind, boxes, labels, 0.0)
            counts = {"objects": len(labels), "classes": len(set(labels.tolist()))}
        else:
            answer = _verified(entry, boxes, labels, proposal, image, where)
            counts = {"objects": len(answer.labels), "classes": len(set(answer.labels.tolist()))}
    model_s = _price(answer, cost_model)
    real_s = entry.seconds
    cost = real_s if real_s is not None else model_s
    return Imported(_with_cost(answer, cost), real_s, model_s, counts)


def _verified(entry: Drawn, boxes, labels, proposal: Prelabels | None, image, where) -> ImageLabels:
    """Proposals the annotator kept are accepted; a box that is no proposal is refused."""
    p_boxes = np.asarray(proposal.boxes if proposal else (), np.float32).reshape(-1, 4)
    p_labels = np.asarray(proposal.labels if proposal else (), np.int64)
    accepted = np.zeros(len(p_boxes), bool)
    iou = pairwise_iou(boxes, p_boxes) if len(p_boxes) else np.zeros((len(boxes), 0))
    for n, (_, _, region) in enumerate(entry.boxes):
        by_id = region is not None and region.startswith("p") and region[1:].isdigit()
        index = int(region[1:]) if by_id and int(region[1:]) < len(p_boxes) else None
        if index is None:
            same = np.where(p_labels == labels[n], iou[n], 0.0)
            index = int(np.argmax(same)) if len(same) and same.max() >= SAME_BOX_IOU else None
        if index is None:
            raise AlrunError(
                f"{where}: box {_fmt(boxes[n])} is not one of the "
                f"{len(p_boxes)} proposed boxes; expected proposals kept (accepted) "
                "or deleted (rejected), nothing drawn"
            )
        accepted[index] = True
    return ImageLabels(image.image_id, "verify", p_boxes, p_labels, 0.0, verified=accepted)


def _indices(names: Sequence[str], classes: Sequence[str], where: str) -> np.ndarray:
    for name in names:
        if name not in classes:
            raise AlrunError(
                f"{where}: unknown class '{name}'; expected one of {', '.join(classes)}"
            )
    return np.asarray([classes.index(n) for n in names], np.int64)


def _inside(points: np.ndarray, image: BatchImage, what: str, where: str) -> np.ndarray:
    limit = np.asarray([image.width, image.height], np.float32)
    bad = ((points < -EDGE_TOLERANCE_PX) | (points > limit + EDGE_TOLERANCE_PX)).any(axis=1)
    if bad.any():
        x, y = points[int(np.argmax(bad))].tolist()
        raise AlrunError(
            f"{where}: {what} ({x:g}, {y:g}) is outside the image; expected "
            f"0 <= x <= {image.width} and 0 <= y <= {image.height}"
        )
    return np.clip(points, 0, limit).astype(np.float32)


def _boxes(boxes: np.ndarray, labels: np.ndarray, image: BatchImage, where: str) -> np.ndarray:
    limit = np.asarray([image.width, image.height] * 2, np.float32)
    for box in boxes:
        if (box < -EDGE_TOLERANCE_PX).any() or (box > limit + EDGE_TOLERANCE_PX).any():
            raise AlrunError(
                f"{where}: box {_fmt(box)} is outside the image; expected "
                f"0 <= x <= {image.width} and 0 <= y <= {image.height}"
            )
    boxes = np.clip(boxes, 0, limit).astype(np.float32)
    for n, box in enumerate(boxes):
        if box[2] <= box[0] or box[3] <= box[1]:
            raise AlrunError(f"{where}: box {_fmt(box)} has no area; expected x1 < x2, y1 < y2")
        for m in range(n):
            if labels[m] == labels[n] and np.abs(boxes[m] - box).max() < 0.5:
                raise AlrunError(
                    f"{where}: box {_fmt(box)} of class {labels[n]} twice; "
                    "expected each object once"
                )
    return boxes


def _price(answer: ImageLabels, cost_model: CostModel) -> float:
    """The cost model's price of what was drawn (not of the hidden ground truth)."""
    n = len(answer.labels)
    if answer.kind == "verify":
        return float(cost_model.verify_cost(n))
    if answer.kind == "image_label":
        return max(len(answer.image_classes), 1) * cost_model.image_label_per_class_s
    if answer.kind == "click":
        k = len(set(answer.labels.tolist()))
        if not k:
            return cost_model.empty_image_s
        return cost_model.click_first_class_s + (k - 1) * cost_model.click_extra_class_s
    per = {"box": cost_model.box_s, "center_click": cost_model.center_click_s}[answer.kind]
    return n * per if n else cost_model.empty_image_s


def _with_cost(answer: ImageLabels, cost: float) -> ImageLabels:
    return ImageLabels(
        answer.image_id,
        answer.kind,
        answer.boxes,
        answer.labels,
        float(cost),
        points=answer.points,
        extreme_points=answer.extreme_points,
        verified=answer.verified,
        image_classes=answer.image_classes,
    )


def _fmt(box) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"
