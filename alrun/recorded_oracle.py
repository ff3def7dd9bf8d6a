"""Imported labels (``oracle=recorded``): an oracle that answers from a file, not ground truth.

Users who collected real clicks, boxes or image-level labels (with measured annotation times)
replay them through the loop. The file is JSON Lines, one object per image, in the shape of
:meth:`ImageLabels.to_json` (class names allowed besides indices)::

    {"image_id": "BloodImage_00001", "kind": "center_click", "labels": ["RBC", 0],
     "points": [[120.5, 88.0], [30, 41]], "cost_s": 3.2}

``kind`` is one of ``box`` (``boxes``: xyxy pixels), ``extreme`` (``extreme_points``: per object
left, top, right, bottom as x, y; the box is their tight box), ``click`` / ``center_click``
(``points``: one x, y per object) or ``image_label`` (``image_classes``: the classes present).
``verify`` cannot be replayed: its answers judge the run's own predicted boxes. A run's own
``round_XX/labelled.json`` (COCO with the label kind and its fields on each image entry) is
accepted too, so a run's labels can be replayed.

Cost: the file's ``cost_s`` when the entry has one, else the cost model's price for that kind,
computed on the *recorded* objects (their count and classes), not on the hidden ground truth.

The file is checked when the oracle is built (JSON, kinds, duplicate ids, costs) and against the
dataset at start-up (:meth:`RecordedOracle.check_data`: ids, classes, counts, coordinates inside
the image), before any training; each problem is one line naming the file, the line and what
was expected.

An image the loop asks for that the file does not have (or has with another kind) follows
``missing``: ``error`` stops the run with one line; ``simulate`` answers it with the simulated
oracle (``fallback``) and logs one line per request naming how many images were simulated.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alrun.data.dataset import DatasetSplits, ImageRecord, ImageRef
from alrun.errors import AlrunError
from alrun.oracle import SimulatedOracle
from alrun.types import LABEL_KINDS, ImageLabels

log = logging.getLogger(__name__)

#: kinds a file may hold (``verify`` answers depend on the run's own predictions)
RECORDED_KINDS = ("box", "extreme", "click", "center_click", "image_label")
MISSING_POLICIES = ("error", "simulate")


@dataclass(frozen=True)
class _Entry:
    """One image's recorded answer as read from the file, before the dataset is known."""

    line: int  # 1-based line (JSON Lines) or image entry (labelled.json)
    image_id: str
    kind: str
    data: Mapping[str, Any]
    cost_s: float | None


class RecordedOracle:
    """Answers ``annotate(records, kind)`` from a recorded file; same interface as
    :class:`~alrun.oracle.SimulatedOracle` (``kinds``, ``require``, ``cost``), which it wraps as
    ``fallback`` for the cost model, the kinds it may be asked for and ``missing=simulate``."""

    def __init__(
        self,
        path: str | Path,
        fallback: SimulatedOracle,
        missing: Literal[MISSING_POLICIES] = "error",
    ):
        if missing not in MISSING_POLICIES:
            raise AlrunError(
                f"oracle.missing: expected one of {'|'.join(MISSING_POLICIES)}, got '{missing}'"
            )
        if not isinstance(fallback, SimulatedOracle):
            raise AlrunError(
                f"oracle.fallback: _target_ must build a SimulatedOracle, got "
                f"{type(fallback).__name__}"
            )
        if path is None or str(path).strip() in ("", "???"):
            raise AlrunError("oracle.path: required; set oracle.path=<labels .jsonl file>")
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            given = "" if Path(path).is_absolute() else f" (given as '{path}')"
            raise AlrunError(f"oracle.path: {self.path} is not a file{given}")
        self.fallback = fallback
        self.missing = missing
        self._entries = _read_entries(self.path)
        self._answers: dict[str, ImageLabels] | None = None  # built by check_data

    # -- the SimulatedOracle interface -------------------------------------------------------

    @property
    def kind(self) -> str | None:
        return self.fallback.kind

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.fallback.kinds

    @property
    def cost_model(self):
        return self.fallback.cost_model

    @property
    def verify_iou(self) -> float:
        return self.fallback.verify_iou

    @property
    def extreme_jitter_px(self) -> float:
        return self.fallback.extreme_jitter_px

    def require(self, kinds: Sequence[str], who: str) -> None:
        self.fallback.require(kinds, who)

    def hold_truth(self, truth: Mapping[str, ImageRecord]) -> None:
        """The hidden truth goes to the fallback (simulated answers, prices, box counts)."""
        self.fallback.hold_truth(truth)

    @property
    def audit(self):
        return self.fallback.audit

    def objects(self, image: ImageRef | ImageRecord) -> int:
        return self.fallback.objects(image)

    def cost(self, record: ImageRef | ImageRecord, kind: str | None = None) -> float:
        """The recorded answer's cost when the file answers ``kind`` for ``record``, else the
        simulated oracle's price (an image the file cannot answer is priced as simulated)."""
        kind = kind or self.kind or "box"
        found = self._recorded(record.image_id, kind)
        return found.cost_s if found is not None else self.fallback.cost(record, kind)

    def annotate(
        self,
        records: Sequence[ImageRef | ImageRecord],
        kind: str | None = None,
        proposals: Mapping[str, Any] | None = None,
    ) -> list[ImageLabels]:
        kind = kind or self.kind or "box"
        self.require([kind], "oracle.annotate")
        answers: list[ImageLabels | None] = [self._recorded(r.image_id, kind) for r in records]
        unanswered = [r for r, a in zip(records, answers, strict=True) if a is None]
        if unanswered and self.missing == "error":
            first = unanswered[0]
            held = self._held_kind(first.image_id)
            has = f" (it holds a '{held}' one)" if held else ""
            raise AlrunError(
                f"oracle.path: {self.path} has no '{kind}' label for image '{first.image_id}'"
                f"{has}; {len(unanswered)} of the {len(records)} images asked for are not "
                "answered; add them to the file or set oracle.missing=simulate"
            )
        if unanswered:
            simulated = iter(self.fallback.annotate(unanswered, kind, proposals))
            answers = [a if a is not None else next(simulated) for a in answers]
            log.info(
                "oracle: %d of %d '%s' labels simulated (%s has none for them)",
                len(unanswered),
                len(records),
                kind,
                self.path.name,
            )
        return answers  # type: ignore[return-value]

    # -- start-up check against the dataset --------------------------------------------------

    def check_data(self, splits: DatasetSplits) -> None:
        """Validate every entry against the dataset (ids, classes, sizes) and build the answers.

        Called by the loop at start-up, before any training.
        """
        records = {**splits.test.by_id(), **splits.pool.by_id()}
        # images dataset.max_pool_images / max_test_images left out: checked, never asked for
        outside = {r.image_id: r for r in splits.excluded if r.image_id not in records}
        classes = tuple(splits.classes)
        answers = {}
        for entry in self._entries:
            where = f"oracle.path: {self.path} line {entry.line}"
            record = records.get(entry.image_id, outside.get(entry.image_id))
            if record is None:
                raise AlrunError(
                    f"{where}: image id '{entry.image_id}' is not in the dataset "
                    f"({len(records) + len(outside)} images in its pool and test splits, e.g. "
                    f"{', '.join(sorted(records)[:3])})"
                )
            answers[entry.image_id] = _build_answer(entry, record, classes, where, self.cost_model)
        self._answers = answers
        unused = sum(1 for i in answers if i in outside)
        if unused:
            log.info(
                "oracle: %s: %d entries are for images the dataset's max_pool_images / "
                "max_test_images subset left out (checked, unused)",
                self.path.name,
                unused,
            )
        pool_ids = set(splits.pool.ids)
        covered = sum(1 for i in answers if i in pool_ids)
        log.info(
            "oracle: %s answers %d of %d pool images (%s); others: missing=%s",
            self.path.name,
            covered,
            len(pool_ids),
            ", ".join(f"{k} {n}" for k, n in _count_kinds(answers.values()).items()) or "none",
            self.missing,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _recorded(self, image_id: str, kind: str) -> ImageLabels | None:
        if self._answers is None:
            raise AlrunError(
                "oracle: the recorded labels were not checked against the dataset; call "
                "RecordedOracle.check_data(splits) first"
            )
        found = self._answers.get(image_id)
        return found if found is not None and found.kind == kind else None

    def _held_kind(self, image_id: str) -> str | None:
        found = (self._answers or {}).get(image_id)
        return None if found is None else found.kind


# -- reading the file (no dataset needed) -----------------------------------------------------


def _read_entries(path: Path) -> list[_Entry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AlrunError(f"oracle.path: {path}: cannot read ({err})") from err
    coco = _as_coco(text)
    raw = _coco_entries(coco, path) if coco is not None else _jsonl_entries(text, path)
    entries: list[_Entry] = []
    seen: dict[str, int] = {}
    for line, data in raw:
        entry = _entry(line, data, path)
        if entry.image_id in seen:
            raise AlrunError(
                f"oracle.path: {path} line {line}: duplicate image id '{entry.image_id}' "
                f"(first on line {seen[entry.image_id]}); expected one entry per image"
            )
        seen[entry.image_id] = line
        entries.append(entry)
    if not entries:
        raise AlrunError(f"oracle.path: {path}: no labels; expected one JSON object per line")
    return entries


def _as_coco(text: str) -> dict[str, Any] | None:
    """The parsed file when it is one COCO JSON document (a run's labelled.json), else None."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return None
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        return None  # several objects (JSON Lines) or malformed: the line reader says which
    return data if isinstance(data, dict) and "images" in data and "annotations" in data else None


def _jsonl_entries(text: str, path: Path) -> list[tuple[int, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise AlrunError(
                f"oracle.path: {path} line {number}: malformed JSON ({err.msg} at column "
                f"{err.colno}); expected one JSON object per line"
            ) from err
    return entries


def _coco_entries(coco: Mapping[str, Any], path: Path) -> list[tuple[int, Any]]:
    """labelled.json -> entries in the JSON Lines shape (classes as names, boxes as xyxy)."""
    names = {c.get("id"): c.get("name") for c in coco.get("categories", [])}
    objects: dict[Any, list[tuple[list[float], Any]]] = {}
    for number, ann in enumerate(coco["annotations"], start=1):
        where = f"oracle.path: {path} annotation {number}"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise AlrunError(f"{where}: expected 'image_id' and 'category_id' in each annotation")
        if ann.get("iscrowd", 0):
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
            raise AlrunError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = bbox
        name = names.get(ann["category_id"], ann["category_id"])
        objects.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], name))
    entries = []
    for number, image in enumerate(coco["images"], start=1):
        if not isinstance(image, dict) or "label_kind" not in image:
            raise AlrunError(
                f"oracle.path: {path} line {number}: COCO image entry without 'label_kind'; "
                "expected a run's round_XX/labelled.json or JSON Lines"
            )
        drawn = objects.get(image.get("id"), [])
        entry = {
            "image_id": image.get("alrun_id", image.get("id")),
            "kind": image["label_kind"],
            "cost_s": image.get("cost_s"),
            "boxes": [box for box, _ in drawn],
            "labels": [name for _, name in drawn],
        }
        for key in ("points", "extreme_points", "image_classes", "verified"):
            if key in image:
                entry[key] = image[key]
        if "labels" in image:  # click kinds: the classes of the clicks (no annotations)
            entry["labels"] = [names.get(i + 1, i) for i in image["labels"]]
        if entry["kind"] in ("click", "center_click") and "labels" not in image:
            raise AlrunError(
                f"oracle.path: {path} line {number}: click image entry without 'labels' "
                "(labelled.json written before alrun kept click classes); expected 'labels'"
            )
        if "image_classes" in image:
            entry["image_classes"] = [names.get(i + 1, i) for i in image["image_classes"]]
        entries.append((number, entry))
    return entries


def _entry(line: int, data: Any, path: Path) -> _Entry:
    where = f"oracle.path: {path} line {line}"
    if not isinstance(data, dict):
        raise AlrunError(f"{where}: expected a JSON object, got {type(data).__name__}")
    image_id = data.get("image_id")
    if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or image_id == "":
        raise AlrunError(f"{where}: expected 'image_id' (a string), got {image_id!r}")
    kind = data.get("kind")
    if kind not in RECORDED_KINDS:
        why = (
            " ('verify' answers judge the run's own predicted boxes and cannot be replayed)"
            if kind == "verify"
            else ""
        )
        raise AlrunError(
            f"{where}: unknown kind {kind!r}; expected one of {', '.join(RECORDED_KINDS)}{why}"
        )
    cost = data.get("cost_s")
    if cost is not None:
        expected = f"{where}: 'cost_s' must be a finite number of seconds >= 0"
        if _is_number(cost) and _beyond_float(cost):
            raise AlrunError(f"{expected}, got a value beyond float range")
        if not _is_number(cost) or not math.isfinite(cost) or cost < 0:
            raise AlrunError(f"{expected}, got {cost!r}")
        cost = float(cost)
    return _Entry(line, str(image_id), kind, data, cost)


# -- checking an entry against its image and the classes --------------------------------------


def _build_answer(
    entry: _Entry, record: ImageRecord, classes: tuple[str, ...], where: str, cost_model
) -> ImageLabels:
    data, kind = entry.data, entry.kind
    where = f"{where} (image '{entry.image_id}', {record.width}x{record.height})"
    no_boxes = np.zeros((0, 4), np.float32)
    if kind == "image_label":
        present = _class_indices(data.get("image_classes"), "image_classes", classes, where)
        labels = np.zeros(0, np.int64)
        answer = ImageLabels(
            entry.image_id, kind, no_boxes, labels, 0.0, image_classes=np.unique(present)
        )
    else:
        labels = _class_indices(data.get("labels"), "labels", classes, where)
        if kind == "box":
            boxes = _array(data.get("boxes"), "boxes", (4,), len(labels), where)
            _check_boxes(boxes, record, where)
            answer = ImageLabels(entry.image_id, kind, boxes, labels, 0.0)
        elif kind == "extreme":
            extreme = _array(
                data.get("extreme_points"), "extreme_points", (4, 2), len(labels), where
            )
            _check_inside(extreme.reshape(-1, 2), record, "extreme point", where)
            tight = np.concatenate([extreme.min(axis=1), extreme.max(axis=1)], axis=1)
            _check_extent(tight, where)
            answer = ImageLabels(
                entry.image_id, kind, tight.astype(np.float32), labels, 0.0, extreme_points=extreme
            )
        else:  # click, center_click
            points = _array(data.get("points"), "points", (2,), len(labels), where)
            _check_inside(points, record, "click", where)
            answer = ImageLabels(entry.image_id, kind, no_boxes, labels, 0.0, points=points)
    cost = entry.cost_s if entry.cost_s is not None else _price(answer, record, cost_model)
    return ImageLabels(
        answer.image_id,
        answer.kind,
        answer.boxes,
        answer.labels,
        cost,
        points=answer.points,
        extreme_points=answer.extreme_points,
        image_classes=answer.image_classes,
    )


def _price(answer: ImageLabels, record: ImageRecord, cost_model) -> float:
    """The cost model's price of the recorded objects (not of the hidden ground truth)."""
    labels = answer.image_classes if answer.kind == "image_label" else answer.labels
    recorded = ImageRecord(
        record.image_id,
        record.file,
        record.width,
        record.height,
        np.zeros((len(labels), 4), np.float32),
        np.asarray(labels, np.int64),
    )
    return float(cost_model.cost(recorded, answer.kind))


def _class_indices(values: Any, key: str, classes: tuple[str, ...], where: str) -> np.ndarray:
    if values is None:
        values = []
    if not isinstance(values, list):
        raise AlrunError(f"{where}: '{key}' must be a list of class names or indices")
    known = f"known classes: {_shorten([f'{i}={c}' for i, c in enumerate(classes)], 8)}"
    indices = []
    for value in values:
        if isinstance(value, str):
            if value not in classes:
                raise AlrunError(f"{where}: unknown class name '{value}' in '{key}'; {known}")
            indices.append(classes.index(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(classes):
                raise AlrunError(
                    f"{where}: class index {value} in '{key}' out of range "
                    f"0..{len(classes) - 1}; {known}"
                )
            indices.append(value)
        else:
            raise AlrunError(
                f"{where}: '{key}' entries must be class names or indices, got {value!r}"
            )
    return np.asarray(indices, dtype=np.int64)


def _array(values: Any, key: str, shape: tuple[int, ...], count: int, where: str) -> np.ndarray:
    if values is None:
        values = []
    try:
        exact = np.asarray(values, dtype=np.float64)
    except OverflowError:  # JSON integers have no size limit: 10**400 is valid JSON
        raise AlrunError(f"{where}: '{key}' must be finite numbers, {_BEYOND}") from None
    except (TypeError, ValueError) as err:
        raise AlrunError(f"{where}: '{key}' must be a list of numbers per object") from err
    with np.errstate(over="ignore"):
        array = exact.astype(np.float32)
    if np.isfinite(exact).all() and not np.isfinite(array).all():
        raise AlrunError(f"{where}: '{key}' must be finite numbers, {_BEYOND}")
    if array.size == 0:
        array = array.reshape(0, *shape)
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
        each = " x ".join(str(s) for s in shape)
        raise AlrunError(
            f"{where}: '{key}' must hold {each} numbers per object, got shape {list(array.shape)}"
        )
    if len(array) != count:
        raise AlrunError(
            f"{where}: {len(array)} {key} but {count} labels; expected one class label per object"
        )
    if not np.isfinite(array).all():
        raise AlrunError(f"{where}: '{key}' must be finite numbers")
    return array


def _check_inside(points: np.ndarray, record: ImageRecord, what: str, where: str) -> None:
    outside = (
        (points[:, 0] < 0)
        | (points[:, 0] > record.width)
        | (points[:, 1] < 0)
        | (points[:, 1] > record.height)
    )
    if outside.any():
        x, y = points[int(np.argmax(outside))].tolist()
        raise AlrunError(
            f"{where}: {what} ({x:g}, {y:g}) is outside the {record.width}x{record.height} "
            f"image; expected 0 <= x <= {record.width} and 0 <= y <= {record.height}"
        )


def _check_boxes(boxes: np.ndarray, record: ImageRecord, where: str) -> None:
    for box in boxes.tolist():
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:  # a zero-width box would fail an assertion in training
            raise AlrunError(
                f"{where}: box {_fmt(box)} has no area; expected x1 < x2 and y1 < y2 (xyxy pixels)"
            )
        if x1 < 0 or y1 < 0 or x2 > record.width or y2 > record.height:
            raise AlrunError(
                f"{where}: box {_fmt(box)} is outside the {record.width}x{record.height} "
                f"image; expected 0 <= x <= {record.width} and 0 <= y <= {record.height}"
            )


def _check_extent(tight: np.ndarray, where: str) -> None:
    """The box of each object's extreme points has an area (it becomes a training box)."""
    for n, box in enumerate(tight.tolist()):
        if box[2] <= box[0] or box[3] <= box[1]:
            raise AlrunError(
                f"{where}: extreme points of object {n} span no area (box {_fmt(box)}); "
                "expected left < right and top < bottom"
            )


def _beyond_float(value: int | float) -> bool:
    try:
        float(value)
    except OverflowError:
        return True
    return False


_BEYOND = "got a value beyond float range"


def _fmt(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shorten(items: Sequence[str], keep: int) -> str:
    shown = ", ".join(str(i) for i in items[:keep])
    return shown + (f", ... ({len(items)} in all)" if len(items) > keep else "")


def _count_kinds(answers) -> dict[str, int]:
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer.kind] = counts.get(answer.kind, 0) + 1
    return {kind: counts[kind] for kind in LABEL_KINDS if kind in counts}
