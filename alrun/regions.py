"""Box-level queries: what a simulated annotator answers when asked about regions of an image.

A query is a predicted box (and its predicted class) the annotator is shown. Following BLAD's
ComPAS simulation (Lyu et al., CVPR 2023, github.com/lyumengyao/blad,
``acdet/mining/methods/compas_mining_algorithm.py`` ``ComPASMiningAlgorithm.mining``), the query
is matched to the true object it overlaps most, when that overlap is at least ``match_iou``
(BLAD: ``MaxIoUAssigner`` at 0.25); an object not answered yet is then labelled with its true
box and class. A query on no object, or on an object an earlier query already answered, adds
nothing. Queries are answered in the order given (their rank).

Deviation (named in docs/methods.md): with one query box, BLAD's ``MaxIoUAssigner``
(``gt_max_assign_all=False``) ends on the *last* object over the threshold, not the most
overlapping one; alrun takes the most overlapping one. They agree when one object is over it.

Costs per query, in seconds: confirming a query whose box already fits its object (same class,
IoU >= ``confirm_iou``) or rejecting one on no new object is a verification (``verify_s``,
1.6 s, Papadopoulos et al. 2016); an object whose box has to be corrected is drawn (``box_s``,
25.5 s, Su et al. 2012). In boxes: 1 per new object (BLAD's count, ``charge=answered``) or 1
per query (``charge=asked``).

Asking an image again (BLAD keeps a partly labelled image in its pool, ``partial_obj``, until
every object is labelled, and its next round's predictions on it are ranked with the rest): a
query overlapping a region asked before (an earlier query or its answer) by IoU >=
``REASK_IOU`` (BLAD's assigner threshold, 0.25) is not asked again (:func:`asked_before`; BLAD
skips a query matched to an object already labelled, uncharged), and the annotator never
answers an object twice (``answered`` in :func:`answer_regions`). The answers of every round
accumulate on one label (:func:`merge_partial`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from alrun.errors import AlrunError
from alrun.truth import pairwise_iou
from alrun.types import ImageLabels

#: how a box budget counts queries: BLAD's objects answered, or every query asked
CHARGES = ("answered", "asked")
#: a candidate this close to a region asked before is not asked again (BLAD's ``MaxIoUAssigner``
#: threshold of ``ComPASMiningAlgorithm.mining``, ``thresh`` 0.25)
REASK_IOU = 0.25


@dataclass(frozen=True)
class RegionAnswers:
    """The answers to one image's queries, in query order."""

    answers: np.ndarray  # (Q,) index of the true object answered, -1: nothing new
    confirmed: np.ndarray  # (Q,) bool: the query box already fitted its object
    seconds: np.ndarray  # (Q,) annotation seconds of each query


def answer_regions(
    query_boxes: np.ndarray,
    query_labels: np.ndarray,
    true_boxes: np.ndarray,
    true_labels: np.ndarray,
    match_iou: float = 0.25,
    confirm_iou: float = 0.5,
    verify_s: float = 1.6,
    box_s: float = 25.5,
    answered: np.ndarray | None = None,
) -> RegionAnswers:
    """Answer ``query_boxes`` (Q, 4) in order against the true boxes of one image.
    ``answered``: boxes (A, 4) answered in earlier rounds (copies of true boxes); a query on
    one of those objects adds nothing (charged as a rejection)."""
    query_boxes = np.asarray(query_boxes, np.float32).reshape(-1, 4)
    true_boxes = np.asarray(true_boxes, np.float32).reshape(-1, 4)
    n = len(query_boxes)
    answers = np.full(n, -1, np.int64)
    confirmed = np.zeros(n, bool)
    seconds = np.full(n, float(verify_s))
    if n == 0 or len(true_boxes) == 0:
        return RegionAnswers(answers, confirmed, seconds)
    iou = pairwise_iou(query_boxes, true_boxes)
    taken = np.zeros(len(true_boxes), bool)
    if answered is not None and len(answered):
        known = pairwise_iou(true_boxes, np.asarray(answered, np.float32).reshape(-1, 4))
        taken |= (known >= 1 - 1e-6).any(axis=1)  # the same object, answered before
    for q in range(n):
        best = int(np.argmax(iou[q]))
        if iou[q, best] < match_iou or taken[best]:
            continue  # rejected: nothing (new) there, one verification
        taken[best] = True
        answers[q] = best
        fits = iou[q, best] >= confirm_iou and int(query_labels[q]) == int(true_labels[best])
        confirmed[q] = fits
        seconds[q] = verify_s if fits else box_s
    return RegionAnswers(answers, confirmed, seconds)


def query_charges(found: RegionAnswers, unit: str, charge: str = "answered") -> np.ndarray:
    """What each query costs in the budget ``unit`` (boxes or seconds); images are refused."""
    if unit == "seconds":
        return found.seconds.astype(np.float64)
    if unit == "boxes":
        if charge == "asked":
            return np.ones(len(found.answers))
        return (found.answers >= 0).astype(np.float64)
    raise AlrunError(
        f"budget.unit: box-level queries are bought by the box or the second, got '{unit}'; "
        "set budget.unit=boxes or budget.unit=seconds"
    )


def asked_regions(label: ImageLabels) -> np.ndarray:
    """The regions of a ``partial`` label already asked about: its queries and its answers."""
    queries = label.queries if label.queries is not None else np.zeros((0, 4), np.float32)
    return np.concatenate([queries.reshape(-1, 4), label.boxes.reshape(-1, 4)]).astype(np.float32)


def asked_before(boxes: np.ndarray, asked: np.ndarray, iou: float = REASK_IOU) -> np.ndarray:
    """(B,) True where a candidate box overlaps a region ``asked`` (A, 4) by IoU >= ``iou``."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    asked = np.asarray(asked, np.float32).reshape(-1, 4)
    if len(boxes) == 0 or len(asked) == 0:
        return np.zeros(len(boxes), bool)
    return (pairwise_iou(boxes, asked) >= iou).any(axis=1)


def merge_partial(old: ImageLabels, new: ImageLabels) -> ImageLabels:
    """One ``partial`` label holding both: queries and answers of ``old`` then ``new`` (the
    new answers' indices shifted past the old boxes), seconds added."""
    for lab in (old, new):
        if lab.kind != "partial" or lab.queries is None or lab.answers is None:
            raise AlrunError(
                f"image '{lab.image_id}': only box-level ('partial') labels are asked again, "
                f"got '{lab.kind}'"
            )
    if old.image_id != new.image_id:
        raise AlrunError(f"merge_partial: labels of '{old.image_id}' and '{new.image_id}'")
    shifted = np.where(new.answers >= 0, new.answers + len(old.boxes), -1)
    rounds = [lab.query_rounds for lab in (old, new)]
    return replace(
        old,
        boxes=np.concatenate([old.boxes.reshape(-1, 4), new.boxes.reshape(-1, 4)]),
        labels=np.concatenate([old.labels, new.labels]).astype(np.int64),
        cost_s=old.cost_s + new.cost_s,
        queries=np.concatenate([old.queries.reshape(-1, 4), new.queries.reshape(-1, 4)]),
        query_labels=np.concatenate([old.query_labels, new.query_labels]).astype(np.int64),
        answers=np.concatenate([old.answers, shifted]).astype(np.int64),
        query_rounds=None if any(r is None for r in rounds) else np.concatenate(rounds),
    )
