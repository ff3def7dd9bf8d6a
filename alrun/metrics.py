"""Evaluation of detections against a dataset's ground truth.

* :func:`evaluate` — mAP under ``metric.protocol``: ``coco`` (pycocotools, mAP@[.5:.95]) or
  ``voc07``/``voc12`` (VOC AP at IoU 0.5, 11-point or all-point interpolation), with per-class AP.
* :func:`failure_modes` / :func:`error_impact` — TIDE error decomposition (Bolya et al., ECCV
  2020): counts at a score threshold, and the AP50 gained by fixing each error type.
* :func:`pool_misses` — on the pool (simulation only): ground-truth objects the current model
  misses in the images a strategy selected vs in the rest.

Ignore regions (``ImageRecord.ignore_boxes``: COCO crowds, VOC difficult objects) are neither
true nor false positives anywhere: COCOeval sees them as ``iscrowd=1``; the VOC protocol treats
them as the devkit treats ``difficult``; the failure analysis drops a detection that is not a
true positive and lies mostly (intersection over its own area >= 0.5) inside a same-class
ignore region.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.errors import AlrunError
from alrun.params import Fraction
from alrun.types import Detections

PROTOCOLS = ("coco", "voc07", "voc12")
#: TIDE's thresholds: foreground IoU (a match) and background IoU (nothing near)
FOREGROUND_IOU = 0.5
BACKGROUND_IOU = 0.1
#: error types, in TIDE's names -> the names used in results.csv / metrics.json
ERROR_TYPES = ("wrong_class", "poor_loc", "both", "dupe", "fp", "missed")


@dataclass(frozen=True)
class MetricConfig:
    """The ``metric:`` config block.

    ``protocol``: ``coco`` | ``voc07`` | ``voc12``. Under a VOC protocol ``mAP`` and ``mAP50``
    both hold the VOC AP (IoU 0.5, the number VOC papers call mAP) and ``mAR`` the mean
    per-class recall over all detections; ``metrics.json`` names the protocol.
    ``failure_score_threshold``: detections below it are not counted in the failure modes.
    """

    protocol: Literal[PROTOCOLS] = "coco"
    failure_score_threshold: Fraction = 0.5

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise AlrunError(
                f"metric.protocol: expected one of {'|'.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if not 0.0 <= float(self.failure_score_threshold) <= 1.0:
            raise AlrunError(
                "metric.failure_score_threshold: expected a number in [0, 1], "
                f"got {self.failure_score_threshold!r}"
            )


# --------------------------------------------------------------------------------------------
# geometry


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes (continuous coordinates, no VOC "+1")."""
    a, b = a.reshape(-1, 4).astype(np.float64), b.reshape(-1, 4).astype(np.float64)
    inter = _intersection(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the area of ``a`` (COCO's rule for crowd regions)."""
    a, b = a.reshape(-1, 4).astype(np.float64), b.reshape(-1, 4).astype(np.float64)
    inter = _intersection(a, b)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    return np.divide(inter, area_a, out=np.zeros_like(inter), where=area_a > 0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _ignore(rec: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
    if rec.ignore_boxes is None or rec.ignore_labels is None:
        return np.zeros((0, 4), np.float64), np.zeros(0, np.int64)
    return (
        np.asarray(rec.ignore_boxes, np.float64).reshape(-1, 4),
        np.asarray(rec.ignore_labels, np.int64),
    )


# --------------------------------------------------------------------------------------------
# COCO protocol


def _coco_ground_truth(dataset: DetectionDataset) -> COCO:
    images, annotations = [], []

    def add(idx: int, box: list[float], label: int, area: float | None, crowd: int) -> None:
        w, h = box[2] - box[0], box[3] - box[1]
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": idx,
                "category_id": int(label) + 1,
                "bbox": [box[0], box[1], w, h],
                "area": float(area) if area is not None else w * h,
                "iscrowd": crowd,
            }
        )

    for idx, rec in enumerate(dataset.images, start=1):
        images.append({"id": idx, "width": rec.width, "height": rec.height})
        areas = rec.areas.tolist() if rec.areas is not None else [None] * rec.num_boxes
        for box, label, area in zip(rec.boxes.tolist(), rec.labels.tolist(), areas):
            add(idx, box, label, area, 0)
        ignore_boxes, ignore_labels = _ignore(rec)
        for box, label in zip(ignore_boxes.tolist(), ignore_labels.tolist()):
            add(idx, box, label, None, 1)
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(dataset.classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _coco_evaluate(dataset: DetectionDataset, detections: Sequence[Detections]) -> dict:
    gt = _coco_ground_truth(dataset)
    coco_id = {rec.image_id: i for i, rec in enumerate(dataset.images, start=1)}
    rows = []
    for det in detections:
        boxes = det.boxes.numpy()
        for box, score, label in zip(boxes, det.scores.tolist(), det.labels.tolist()):
            rows.append(
                [coco_id[det.image_id], box[0], box[1], box[2] - box[0], box[3] - box[1]]
                + [score, label + 1]
            )
    keys = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")
    if not rows:
        per_class = {n: {"AP": 0.0, "AP50": 0.0} for n in dataset.classes}
        return {**{k: 0.0 for k in keys}, "mAR": 0.0, "per_class": per_class}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(np.asarray(rows, dtype=np.float64))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    out: dict = {k: float(stats[i]) for i, k in enumerate(keys)}
    out["mAR"] = float(stats[8])  # AR@100, all areas
    # precision[T, R, K, A, M]: IoU thresholds, recall points, classes, area "all", maxDets 100
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, name in enumerate(dataset.classes):
        p_all, p_50 = precision[:, :, k], precision[0, :, k]
        per_class[name] = {
            "AP": float(p_all[p_all > -1].mean()) if (p_all > -1).any() else None,
            "AP50": float(p_50[p_50 > -1].mean()) if (p_50 > -1).any() else None,
        }
    out["per_class"] = per_class  # None: the class has no ground truth in the test split
    return out


# --------------------------------------------------------------------------------------------
# VOC protocol (and the AP50 behind the TIDE impact)


@dataclass(frozen=True)
class _GroundTruth:
    """One image's ground truth as plain arrays; ``difficult`` rows are ignore regions."""

    boxes: np.ndarray  # (N, 4)
    labels: np.ndarray  # (N,)
    difficult: np.ndarray  # (N,) bool


@dataclass(frozen=True)
class _FlatDetections:
    """All detections of a split, flattened: ``image`` indexes the ground-truth list."""

    image: np.ndarray  # (D,) int
    boxes: np.ndarray  # (D, 4)
    scores: np.ndarray  # (D,)
    labels: np.ndarray  # (D,)

    def take(self, mask: np.ndarray) -> _FlatDetections:
        return _FlatDetections(
            self.image[mask], self.boxes[mask], self.scores[mask], self.labels[mask]
        )


def _flatten(dataset: DetectionDataset, detections: Sequence[Detections]) -> _FlatDetections:
    index = {rec.image_id: i for i, rec in enumerate(dataset.images)}
    image, boxes, scores, labels = [], [], [], []
    for det in detections:
        n = len(det)
        image.append(np.full(n, index[det.image_id], np.int64))
        boxes.append(det.boxes.detach().cpu().numpy().reshape(-1, 4).astype(np.float64))
        scores.append(det.scores.detach().cpu().numpy().astype(np.float64))
        labels.append(det.labels.detach().cpu().numpy().astype(np.int64))
    if not image:
        return _FlatDetections(
            np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        )
    return _FlatDetections(
        np.concatenate(image), np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
    )


def _voc_ground_truth(dataset: DetectionDataset, with_ignore: bool = True) -> list[_GroundTruth]:
    out = []
    for rec in dataset.images:
        boxes = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
        labels = np.asarray(rec.labels, np.int64)
        ignore_boxes, ignore_labels = (
            _ignore(rec) if with_ignore else (np.zeros((0, 4)), np.zeros(0, np.int64))
        )
        out.append(
            _GroundTruth(
                np.concatenate([boxes, ignore_boxes]),
                np.concatenate([labels, ignore_labels]),
                np.concatenate([np.zeros(len(labels), bool), np.ones(len(ignore_labels), bool)]),
            )
        )
    return out


def interpolated_ap(recall: np.ndarray, precision: np.ndarray, method: str) -> float:
    """VOC average precision from a ranked list's recall/precision (recall non-decreasing).

    ``11point`` (VOC2007): mean over recall levels 0, 0.1, ..., 1 of the best precision at
    recall >= level (0 where never reached). ``all`` (VOC2010+): area under the precision
    envelope (precision made monotone from the right), summed where recall changes.
    """
    if method == "11point":
        ap = 0.0
        for level in np.linspace(0.0, 1.0, 11):
            reached = precision[recall >= level]
            ap += (reached.max() if reached.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    change = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def class_average_precision(
    gt: Sequence[_GroundTruth], dets: _FlatDetections, num_classes: int, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP and final recall at IoU 0.5, matched as the VOC devkit does.

    Per class, detections in descending score order (stable) take the ground truth of their
    image with the highest IoU; IoU > 0.5 with a ``difficult`` one: ignored (neither TP nor
    FP); with an unmatched one: TP; with a matched one (a duplicate) or IoU <= 0.5: FP.
    Classes without non-difficult ground truth get NaN (left out of the mean).
    """
    aps = np.full(num_classes, np.nan)
    recalls = np.full(num_classes, np.nan)
    for c in range(num_classes):
        npos = sum(int(((g.labels == c) & ~g.difficult).sum()) for g in gt)
        if npos == 0:
            continue
        idx = np.where(dets.labels == c)[0]
        idx = idx[np.argsort(-dets.scores[idx], kind="stable")]
        used = [np.zeros(int((g.labels == c).sum()), bool) for g in gt]
        tp, fp = np.zeros(len(idx)), np.zeros(len(idx))
        for k, d in enumerate(idx):
            g = gt[dets.image[d]]
            mine = g.labels == c
            if not mine.any():
                fp[k] = 1
                continue
            ious = box_iou(dets.boxes[d], g.boxes[mine])[0]
            j = int(ious.argmax())
            if ious[j] > FOREGROUND_IOU:
                if g.difficult[mine][j]:
                    continue
                if not used[dets.image[d]][j]:
                    used[dets.image[d]][j] = True
                    tp[k] = 1
                else:
                    fp[k] = 1
            else:
                fp[k] = 1
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = ctp / npos
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        aps[c] = interpolated_ap(recall, precision, method) if len(idx) else 0.0
        recalls[c] = recall[-1] if len(idx) else 0.0
    return aps, recalls


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else 0.0


def _voc_evaluate(
    dataset: DetectionDataset, detections: Sequence[Detections], protocol: str
) -> dict:
    method = "11point" if protocol == "voc07" else "all"
    aps, recalls = class_average_precision(
        _voc_ground_truth(dataset), _flatten(dataset, detections), len(dataset.classes), method
    )
    voc_ap = _nanmean(aps)
    return {
        "mAP": voc_ap,
        "mAP50": voc_ap,
        "mAR": _nanmean(recalls),
        "per_class": {
            name: {"AP50": None if np.isnan(ap) else float(ap)}
            for name, ap in zip(dataset.classes, aps)
        },
    }


def evaluate(
    dataset: DetectionDataset, detections: Sequence[Detections], protocol: str = "coco"
) -> dict:
    """mAP, mAP50, mAR (+ COCO's mAP75 and per-size mAP) and per-class AP under ``protocol``.

    ``coco``: pycocotools, mAP@[.5:.95], mAR = AR@100 (-1 where COCO gives -1).
    ``voc07`` / ``voc12``: VOC AP at IoU 0.5 (11-point / all-point) in both ``mAP`` and
    ``mAP50``; ``mAR`` is the mean per-class recall over all detections.
    """
    MetricConfig(protocol=protocol)  # validates
    out = (
        _coco_evaluate(dataset, detections)
        if protocol == "coco"
        else _voc_evaluate(dataset, detections, protocol)
    )
    return {"protocol": protocol, **out}


# --------------------------------------------------------------------------------------------
# TIDE failure modes


@dataclass(frozen=True)
class _Classified:
    """Each detection's TIDE outcome and each ground-truth object's coverage."""

    dets: _FlatDetections
    outcome: np.ndarray  # (D,) str: "tp", "ignored" or an error type
    target: np.ndarray  # (D,) int: ground-truth row (within its image) an error/TP refers to, or -1
    gt_cover_score: list[np.ndarray]  # per image (N,): best score that matched or explained it
    gt_matched_score: list[np.ndarray]  # per image (N,): best score that matched it (TP)


def _classify(dataset: DetectionDataset, detections: Sequence[Detections]) -> _Classified:
    """TIDE's rules (Bolya et al. 2020, tidecv), per image, detections in descending score order.

    TP: same class, IoU >= 0.5 with a not yet matched object. Otherwise, first match wins:
    ``ignored`` (mostly inside a same-class ignore region), ``fp`` = background (IoU <= 0.1 with
    every object), ``wrong_class`` (IoU >= 0.5 with an object of another class), ``dupe``
    (IoU >= 0.5 with a same-class object already matched by a higher-scoring detection),
    ``poor_loc`` (same class, 0.1 <= IoU < 0.5), ``both`` (another class, 0.1 <= IoU < 0.5).
    """
    dets = _flatten(dataset, detections)
    outcome = np.full(len(dets.scores), "", dtype=object)
    target = np.full(len(dets.scores), -1, np.int64)
    cover, matched_score = [], []
    for i, rec in enumerate(dataset.images):
        gt_boxes = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
        gt_labels = np.asarray(rec.labels, np.int64)
        ign_boxes, ign_labels = _ignore(rec)
        cover_i = np.full(len(gt_labels), -np.inf)
        matched_i = np.full(len(gt_labels), -np.inf)
        idx = np.where(dets.image == i)[0]
        idx = idx[np.argsort(-dets.scores[idx], kind="stable")]
        ious = box_iou(dets.boxes[idx], gt_boxes)
        ioas = box_ioa(dets.boxes[idx], ign_boxes)
        for k, d in enumerate(idx):
            same = gt_labels == dets.labels[d]
            iou = ious[k]
            free = np.where(same & np.isinf(matched_i), iou, 0.0)
            if free.size and free.max() >= FOREGROUND_IOU:
                j = int(free.argmax())
                matched_i[j] = cover_i[j] = max(cover_i[j], dets.scores[d])
                outcome[d], target[d] = "tp", j
                continue
            on_ignore = np.where(ign_labels == dets.labels[d], ioas[k], 0.0)
            if on_ignore.size and on_ignore.max() >= FOREGROUND_IOU:
                outcome[d] = "ignored"
                continue
            other = np.where(~same, iou, 0.0)
            same_iou = np.where(same, iou, 0.0)
            if not iou.size or iou.max() <= BACKGROUND_IOU:
                outcome[d] = "fp"
            elif other.max() >= FOREGROUND_IOU:
                outcome[d], target[d] = "wrong_class", int(other.argmax())
            elif same_iou.max() >= FOREGROUND_IOU:
                outcome[d], target[d] = "dupe", int(same_iou.argmax())
            elif same_iou.max() >= BACKGROUND_IOU:
                outcome[d], target[d] = "poor_loc", int(same_iou.argmax())
            else:
                outcome[d], target[d] = "both", int(other.argmax())
            if outcome[d] in ("wrong_class", "poor_loc"):  # TIDE: these explain the object
                j = target[d]
                cover_i[j] = max(cover_i[j], dets.scores[d])
        cover.append(cover_i)
        matched_score.append(matched_i)
    return _Classified(dets, outcome, target, cover, matched_score)


def failure_modes(
    dataset: DetectionDataset, detections: Sequence[Detections], score_threshold: float = 0.5
) -> dict[str, int]:
    """Count TIDE errors among detections with score >= ``score_threshold``.

    ``fp`` is TIDE's background error; ``missed`` counts objects that no detection above the
    threshold matched or came near (explained by a ``wrong_class``/``poor_loc`` error), as
    in TIDE. See :func:`_classify` for the other types.
    """
    c = _classify(dataset, detections)
    confident = c.dets.scores >= score_threshold
    counts = {t: int(((c.outcome == t) & confident).sum()) for t in ERROR_TYPES if t != "missed"}
    counts["missed"] = int(sum((cov < score_threshold).sum() for cov in c.gt_cover_score))
    return {t: counts[t] for t in ERROR_TYPES}


def error_impact(dataset: DetectionDataset, detections: Sequence[Detections]) -> dict[str, float]:
    """TIDE's mAP impact: AP50 after fixing one error type minus AP50 as is, for each type.

    Computed over all detections (AP needs the whole ranking), with all-point AP at IoU 0.5.
    Fixes, as in TIDE: ``wrong_class`` takes the object's class and ``poor_loc`` the object's
    box (or is dropped when a higher-scoring detection already took that object); ``both``,
    ``dupe`` and ``fp`` detections are dropped; ``missed`` objects are removed from the ground
    truth. Ignored detections are left out throughout.
    """
    c = _classify(dataset, detections)
    classes = len(dataset.classes)
    gt = _voc_ground_truth(dataset, with_ignore=False)
    kept = c.outcome != "ignored"

    def ap50(dets: _FlatDetections, ground_truth: list[_GroundTruth]) -> float:
        return _nanmean(class_average_precision(ground_truth, dets, classes, "all")[0])

    base = ap50(c.dets.take(kept), gt)
    impact = {}
    for error in ERROR_TYPES:
        if error == "missed":
            fixed_gt = [
                _GroundTruth(g.boxes[keep], g.labels[keep], g.difficult[keep])
                for g, cov in zip(gt, c.gt_cover_score)
                for keep in [~np.isinf(cov)]
            ]
            impact[error] = ap50(c.dets.take(kept), fixed_gt) - base
            continue
        dets = c.dets
        boxes, labels, keep = dets.boxes.copy(), dets.labels.copy(), kept.copy()
        taken = [~np.isinf(m) for m in c.gt_matched_score]
        order = np.argsort(-dets.scores, kind="stable")
        for d in order[c.outcome[order] == error]:
            if error in ("both", "dupe", "fp"):
                keep[d] = False
                continue
            image, j = dets.image[d], c.target[d]
            if taken[image][j]:
                keep[d] = False
                continue
            taken[image][j] = True
            g = gt[image]
            if error == "wrong_class":
                labels[d] = g.labels[j]
            else:
                boxes[d] = g.boxes[j]
        fixed = _FlatDetections(dets.image, boxes, dets.scores, labels).take(keep)
        impact[error] = ap50(fixed, gt) - base
    return {"AP50": base, **{f"d_{t}": float(v) for t, v in impact.items()}}


def failure_analysis(
    dataset: DetectionDataset, detections: Sequence[Detections], score_threshold: float
) -> dict:
    """What metrics.json records about errors: counts at the threshold + TIDE impact."""
    return {
        **failure_modes(dataset, detections, score_threshold),
        "failure_score_threshold": float(score_threshold),
        "error_impact_AP50": error_impact(dataset, detections),
    }


# --------------------------------------------------------------------------------------------
# pool: what the model misses where the strategy looked


def pool_misses(
    records: Sequence[ImageRecord],
    predictions: Sequence[Detections],
    selected_ids: Sequence[str],
    score_threshold: float = 0.5,
) -> dict[str, dict[str, float]]:
    """Ground-truth objects the model misses (no same-class detection with score >=
    ``score_threshold`` at IoU >= 0.5, greedy in score order) in the selected images vs the
    rest of the scored pool. Possible only in simulation, where the pool's labels are known.
    """
    per_image = image_misses(records, predictions, score_threshold)
    return summarise_misses(per_image, selected_ids, score_threshold)


def image_misses(
    records: Sequence[ImageRecord], predictions: Sequence[Detections], score_threshold: float
) -> dict[str, tuple[int, int]]:
    """(objects, missed) per predicted image of ``records`` (see :func:`pool_misses`); a
    streamed pool keeps these counts per shard instead of the predictions."""
    by_id = {p.image_id: p for p in predictions}
    out: dict[str, tuple[int, int]] = {}
    for rec in records:
        if rec.image_id not in by_id:
            continue
        det = by_id[rec.image_id]
        keep = det.scores >= score_threshold
        boxes = det.boxes[keep].detach().cpu().numpy()
        labels = det.labels[keep].detach().cpu().numpy()
        order = np.argsort(-det.scores[keep].detach().cpu().numpy(), kind="stable")
        gt_labels = np.asarray(rec.labels, np.int64)
        ious = box_iou(boxes, np.asarray(rec.boxes))
        found = np.zeros(len(gt_labels), bool)
        for d in order:
            free = np.where((gt_labels == labels[d]) & ~found, ious[d], 0.0)
            if free.size and free.max() >= FOREGROUND_IOU:
                found[int(free.argmax())] = True
        out[rec.image_id] = (len(gt_labels), int((~found).sum()))
    return out


def summarise_misses(
    per_image: Mapping[str, tuple[int, int]], selected_ids: Sequence[str], score_threshold: float
) -> dict[str, dict[str, float]]:
    """:func:`pool_misses`'s record from per-image (objects, missed) counts."""
    selected = set(selected_ids)
    groups = {"selected": [0, 0, 0], "rest": [0, 0, 0]}  # images, objects, missed
    for image_id, (objects, missed) in per_image.items():
        group = groups["selected" if image_id in selected else "rest"]
        group[0] += 1
        group[1] += objects
        group[2] += missed
    out = {}
    for name, (images, objects, missed) in groups.items():
        out[name] = {
            "images": images,
            "objects": objects,
            "missed": missed,
            "missed_per_image": missed / images if images else 0.0,
            "missed_fraction": missed / objects if objects else 0.0,
        }
    out["score_threshold"] = float(score_threshold)  # type: ignore[assignment]
    return out
