"""Query-by-committee: how much the members of a committee disagree on matched boxes.

BLAD's WhiteBoxQBC (Lyu et al., CVPR 2023, github.com/lyumengyao/blad, ``acdet/apis/test.py``
``single_gpu_test_wbqbc``), computed per image and per class ``c`` over the detections of every
member: each member's box of class ``c`` whose score ``s`` lies strictly inside
(``low``, ``high``) is compared with the other members' boxes of class ``c`` overlapping it by
IoU > ``overlap``; its margin is ``|s - max of their scores|`` (0 when none overlaps). Class
``c``'s margin is the sum of those margins over the number of class-``c`` boxes of all members,
and the image's score is the mean of the class margins weighted by each class's highest score:
``sum_c conf_c * margin_c / sum_c conf_c``. High = the committee disagrees.

BLAD's committee is the RoI head read at each FPN level (a two-stage "white box"); alrun's is
the members of an ensemble (``alrun.detectors.passes.Ensemble``), which any backend has.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.reduction import EMPTY_POLICIES, EmptyPolicy, empty_image_score
from alrun.acquisition.strategies import score_pool
from alrun.errors import AlrunError
from alrun.params import Range
from alrun.types import Needs

Fraction = Annotated[float, Range(0, 1)]


def committee_disagreement(
    boxes: list[Tensor],
    scores: list[Tensor],
    labels: list[Tensor],
    low: float = 0.1,
    high: float = 0.9,
    overlap: float = 0.3,
) -> float | None:
    """WhiteBoxQBC's score of one image from each member's ``boxes`` (n_m, 4) xyxy, ``scores``
    (n_m,) and ``labels`` (n_m,); None when no member found anything (BLAD divides 0 by 0)."""
    if len(boxes) < 2:
        raise ValueError("a committee needs at least 2 members")
    member = torch.cat([torch.full((len(b),), m) for m, b in enumerate(boxes)])
    all_boxes = torch.cat([b.reshape(-1, 4).double() for b in boxes])
    all_scores = torch.cat([s.double() for s in scores])
    all_labels = torch.cat([lab.long() for lab in labels])
    if len(all_scores) == 0:
        return None
    weighted, total_conf = 0.0, 0.0
    for c in torch.unique(all_labels).tolist():
        of_c = all_labels == c
        b, s, m = all_boxes[of_c], all_scores[of_c], member[of_c]
        iou = box_iou(b, b)
        margin = 0.0
        for i in range(len(s)):
            if not low < float(s[i]) < high:
                continue
            near = (m != m[i]) & (iou[i] > overlap)
            second = float(s[near].max()) if bool(near.any()) else 0.0
            margin += abs(float(s[i]) - second)
        conf = float(s.max())
        weighted += conf * margin / len(s)
        total_conf += conf
    return weighted / total_conf if total_conf > 0 else None


class CommitteeDisagreement:
    """Query-by-committee (BLAD's WhiteBoxQBC) over the ``members`` models of an ensemble.

    Defaults are BLAD's (``single_gpu_test_wbqbc``): boxes scored in (0.1, 0.9) count, other
    members' boxes of the same class overlap them by IoU > 0.3. ``score_threshold`` drops member
    boxes below it first (BLAD's members output mmdet's test boxes, ``rcnn.score_thr=0.05``).
    ``empty``: the score of an image where no member found a box (BLAD: 0/0 = nan).
    """

    def __init__(
        self,
        members: Annotated[int, Range(2)] = 3,
        ensemble_kind: str = "independent",
        low: Fraction = 0.1,
        high: Fraction = 0.9,
        overlap: Fraction = 0.3,
        score_threshold: Annotated[float, Range(0, 1, high_open=True)] = 0.05,
        empty: EmptyPolicy = "min",
    ):
        if not isinstance(members, int) or isinstance(members, bool) or members < 2:
            raise AlrunError(
                f"strategy.scorer.members: a committee needs >= 2 members, got {members!r}"
            )
        if ensemble_kind not in ("independent", "snapshot"):
            raise AlrunError(
                "strategy.scorer.ensemble_kind: expected independent|snapshot, got "
                f"'{ensemble_kind}'"
            )
        for key, value in (("low", low), ("high", high), ("overlap", overlap)):
            if not 0.0 <= float(value) <= 1.0:
                raise AlrunError(f"strategy.scorer.{key}: expected a number in [0, 1], got {value}")
        if not float(low) < float(high):
            raise AlrunError(
                f"strategy.scorer.low: expected below strategy.scorer.high ({high}), got {low}"
            )
        if not 0.0 <= float(score_threshold) < 1.0:
            raise AlrunError(
                "strategy.scorer.score_threshold: expected a number in [0, 1), got "
                f"{score_threshold}"
            )
        if isinstance(empty, str) and empty not in EMPTY_POLICIES:
            raise AlrunError(
                f"strategy.scorer.empty: expected one of {'|'.join(EMPTY_POLICIES)} or a number, "
                f"got '{empty}'"
            )
        self.members = int(members)
        self.ensemble_kind = ensemble_kind
        self.low, self.high, self.overlap = float(low), float(high), float(overlap)
        self.score_threshold = float(score_threshold)
        self.empty = empty
        self.needs = Needs(
            probs=True, passes=self.members, ensemble=self.members, ensemble_kind=ensemble_kind
        )

    def batch_scores(self, batch: PredictionBatch) -> list[float | None]:
        if len(batch.passes) < 2:
            raise AlrunError("strategy: query-by-committee needs the ensemble members' passes")
        out: list[float | None] = []
        for i in range(len(batch)):
            parts = []
            for p in batch.passes:
                lo, hi = int(p.offsets[i]), int(p.offsets[i + 1])
                keep = p.scores[lo:hi] >= self.score_threshold
                parts.append((p.boxes[lo:hi][keep], p.scores[lo:hi][keep], p.labels[lo:hi][keep]))
            score = committee_disagreement(
                [b for b, _, _ in parts],
                [s for _, s, _ in parts],
                [lab for _, _, lab in parts],
                self.low,
                self.high,
                self.overlap,
            )
            out.append(empty_image_score(self.empty) if score is None else score)
        return out

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        return score_pool(self, context)

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "committee_disagreement",
            "source": "ensemble",
            "members": self.members,
            "ensemble_kind": self.ensemble_kind,
            "low": self.low,
            "high": self.high,
            "overlap": self.overlap,
            "score_threshold": self.score_threshold,
            "empty": self.empty,
        }
