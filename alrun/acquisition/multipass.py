"""Multi-pass uncertainty: line up extra prediction passes with the reference boxes, score.

A multi-pass prediction (``PredictionBatch.passes``: MC-dropout passes, ensemble members or
test-time views) has its own boxes in every pass. For each reference box (the deterministic,
un-augmented pass) this finds its match in every pass (:mod:`alrun.acquisition.match`) and
gathers what the scores of :mod:`alrun.acquisition.scores` consume: the box's class
distribution per pass, the matched boxes and their overlap with the reference.
:class:`PassUncertainty` is the scorer that strategies (``strategy=mc_entropy``, ``bald``, ...)
configure with one of those scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from alrun.acquisition.aggregate import check_class_weights
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.match import MATCH_METRICS, check_matching, match_aligned, match_boxes
from alrun.acquisition.reduction import (
    Aggregator,
    ClassWeights,
    CountSources,
    EmptyPolicy,
    _name_of,
    box_confidence,
    check_reduction,
    image_scores,
    kept_rows,
    reduction_record,
)
from alrun.acquisition.strategies import check_distribution_head, score_pool
from alrun.detectors.views import parse_view
from alrun.errors import AlrunError
from alrun.params import OpenFraction, PositiveInt, Range, ScoreThreshold
from alrun.types import Needs

#: distributions a multi-pass score may compare (an unmatched box must be expressible as
#: "background", which ``foreground`` cannot)
PASS_DISTRIBUTIONS = ("binary", "with_background")


@dataclass(frozen=True)
class MatchedPasses:
    """Per reference box (rows of ``rows``) and pass: see the scores' argument glossary."""

    rows: Tensor  # (N,) the reference batch rows these belong to
    pass_probs: Tensor  # (N, T, K)
    pass_boxes: Tensor  # (N, T, 4)
    iou: Tensor  # (N, T)
    matched: Tensor  # (N, T) bool


def box_distribution(
    name: str, probs: Tensor | None, class_probs: Tensor | None, labels: Tensor
) -> Tensor:
    """A box's distribution for ``labels`` (the *reference* box's class): ``binary`` is the
    Bernoulli of that class's probability, ``with_background`` the C+1 softmax row."""
    if name == "binary":
        source = class_probs if class_probs is not None else probs[:, :-1]
        p = source.gather(1, labels.long().reshape(-1, 1)).clamp(0.0, 1.0)
        return torch.cat([p, 1.0 - p], dim=1)
    if name == "with_background":
        return probs
    raise ValueError(f"multi-pass distribution must be one of {PASS_DISTRIBUTIONS}, got '{name}'")


def background_distribution(name: str, n: int, width: int) -> Tensor:
    """What an unmatched box is taken to have said: background with certainty."""
    out = torch.zeros(n, width)
    out[:, -1] = 1.0
    return out


def aligned(batch: PredictionBatch, p: PredictionBatch) -> bool:
    """Whether pass ``p`` holds, row for row, the reference's boxes (same sources): MC-dropout
    passes of dense heads are read at the reference anchors."""
    return (
        batch.sources is not None
        and p.sources is not None
        and torch.equal(p.offsets, batch.offsets)
        and torch.equal(p.sources, batch.sources)
    )


def _match_per_image(
    batch: PredictionBatch,
    p: PredictionBatch,
    order: Tensor,
    per_image: Sequence[Tensor],
    metric: str,
    threshold: float,
) -> tuple[Tensor, Tensor]:
    """Match image by image; returns (row of ``p`` or -1, overlap) in the caller's row order."""
    n = len(order)
    index = torch.full((n,), -1, dtype=torch.int64)  # in image order (rows[order])
    overlap = torch.zeros(n)
    start = 0
    offsets = p.offsets.tolist()
    for i, ref_rows in enumerate(per_image):
        k = len(ref_rows)
        if k == 0:
            continue
        lo, hi = offsets[i], offsets[i + 1]
        idx, ov = match_boxes(batch.boxes[ref_rows], p.boxes[lo:hi], metric, threshold)
        index[start : start + k] = torch.where(idx >= 0, idx + lo, idx)
        overlap[start : start + k] = ov
        start += k
    back = torch.empty_like(order)
    back[order] = torch.arange(n)
    return index[back], overlap[back]


def match_passes(
    batch: PredictionBatch,
    rows: Tensor,
    distribution: str,
    metric: str = "iou",
    threshold: float = 0.5,
    passes: Sequence[PredictionBatch] | None = None,
) -> MatchedPasses:
    """Match reference rows ``rows`` (int64 indices into ``batch``, any order) to every pass."""
    passes = batch.passes if passes is None else passes
    if not passes:
        raise ValueError("the batch has no extra passes to match")
    for p in passes:
        if p.image_ids != batch.image_ids:
            raise ValueError("every pass must hold the same images in the same order")
    rows = rows.long()
    labels = batch.labels[rows]
    ref_dist = box_distribution(
        distribution,
        None if batch.probs is None else batch.probs[rows],
        None if batch.class_probs is None else batch.class_probs[rows],
        labels,
    )
    width = ref_dist.shape[1]
    seg = batch.segment[rows]
    order = torch.argsort(seg, stable=True)
    counts = torch.bincount(seg, minlength=len(batch)).tolist()
    per_image = torch.split(rows[order], counts)
    n, t = len(rows), len(passes)
    pass_probs = torch.zeros(n, t, width)
    pass_boxes = torch.zeros(n, t, 4)
    iou = torch.zeros(n, t)
    matched = torch.zeros(n, t, dtype=torch.bool)
    for j, p in enumerate(passes):
        if aligned(batch, p):
            found, overlap = match_aligned(batch.boxes[rows], p.boxes[rows], metric, threshold)
            index = torch.where(found >= 0, rows, found)
        else:
            index, overlap = _match_per_image(batch, p, order, per_image, metric, threshold)
        hit = index >= 0
        dist = background_distribution(distribution, n, width)
        if bool(hit.any()):
            found = index[hit]
            dist[hit] = box_distribution(
                distribution,
                None if p.probs is None else p.probs[found],
                None if p.class_probs is None else p.class_probs[found],
                labels[hit],
            ).to(dist.dtype)
            pass_boxes[hit, j] = p.boxes[found].float()
        pass_probs[:, j] = dist
        iou[:, j] = overlap
        matched[:, j] = hit
    return MatchedPasses(rows, pass_probs, pass_boxes, iou, matched)


#: where the extra passes of a :class:`PassUncertainty` come from
PASS_SOURCES = ("mc_dropout", "tta", "ensemble", "none")
#: the arguments a multi-pass score may ask for (see alrun.acquisition.scores)
PASS_INPUTS = ("pass_probs", "ref_probs", "iou", "pass_boxes", "matched")
PER_PASS_INPUTS = ("pass_probs", "iou", "pass_boxes", "matched")
SINGLE_INPUTS = ("boxes", "proposals", "confidence")


def _required_inputs(fn: Callable) -> tuple[str, ...]:
    """The parameters ``fn`` needs filled (those without a default, partial-bound excluded)."""
    params = inspect.signature(fn).parameters.values()
    return tuple(
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def _dry_run(box_score: Callable[..., Tensor], inputs: Sequence[str], name: str) -> None:
    """Call the score once on a tiny made-up input, so a bad setting bound in the config (e.g.
    ``box_score.reduce=median``) is a start-up error, not a failure after a round of training."""
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    sample = {
        "pass_probs": torch.full((1, 2, 2), 0.5),
        "ref_probs": torch.full((1, 2), 0.5),
        "iou": torch.ones(1, 2),
        "pass_boxes": box.expand(2, 4)[None].clone(),
        "matched": torch.ones(1, 2, dtype=torch.bool),
        "boxes": box,
        "proposals": box,
        "confidence": torch.full((1,), 0.5),
    }
    try:
        out = box_score(**{k: sample[k] for k in inputs})
    except Exception as err:  # noqa: BLE001 - any failure here is a configuration error
        raise AlrunError(f"strategy.scorer.box_score: '{name}' fails: {err}") from None
    if not isinstance(out, Tensor) or out.shape != (1,):
        raise AlrunError(
            f"strategy.scorer.box_score: '{name}' must return one score per box, got "
            f"{getattr(out, 'shape', type(out).__name__)}"
        )


class PassUncertainty:
    """Per-box uncertainty across extra prediction passes, reduced per image.

    ``box_score`` is a function of :mod:`alrun.acquisition.scores` whose parameter names say
    what it needs (``pass_probs``, ``ref_probs``, ``iou``, ``pass_boxes``, ``matched``,
    ``boxes``, ``proposals``, ``confidence``). ``source`` says where the passes come from:
    ``mc_dropout`` (``passes`` T stochastic passes with dropout ``dropout`` before the heads'
    logits; the detector is built and trained with it), ``tta`` (one pass per entry of
    ``views``), ``ensemble`` (``members`` K models, ``ensemble_kind`` independent | snapshot) or
    ``none`` (single-pass scores such as localization tightness). The detector computes passes
    only when the score asks for a per-pass input.

    Each reference box (the deterministic, un-augmented pass) is matched in every pass by
    ``match_metric`` (iou | giou) >= ``match_threshold``; an unmatched box counts as
    background with overlap 0 (:mod:`alrun.acquisition.match`). ``distribution``: ``binary``
    (the reference class's probability as a Bernoulli, in every pass) or ``with_background``.
    ``class_weights`` (one per class) multiplies each box's score by its class's weight before
    aggregation. The ``weighted`` aggregator weights boxes by their max class probability.
    ``max_boxes`` keeps at most that many boxes per image, those of the highest max class
    probability (CALD scores an image's top 30).
    """

    def __init__(
        self,
        box_score: Callable[..., Tensor],
        source: Literal[PASS_SOURCES] = "mc_dropout",
        passes: PositiveInt = 10,
        dropout: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.2,
        views: Sequence[str] = (),
        members: Annotated[int, Range(2)] = 5,
        ensemble_kind: Literal["independent", "snapshot"] = "independent",
        match_metric: Literal[MATCH_METRICS] = "iou",
        match_threshold: OpenFraction = 0.5,
        aggregator: Aggregator = "mean",
        score_threshold: ScoreThreshold = 0.1,
        empty: EmptyPolicy = "min",
        distribution: Literal[PASS_DISTRIBUTIONS] = "binary",
        class_weights: ClassWeights = None,
        count_sources: CountSources = "once",
        max_boxes: PositiveInt | None = None,
    ):
        name = _name_of(box_score)
        inputs = _required_inputs(box_score)
        unknown = [i for i in inputs if i not in PASS_INPUTS + SINGLE_INPUTS]
        if unknown:
            raise AlrunError(
                f"strategy.scorer.box_score: '{name}' is not a multi-pass score (it asks for "
                f"{', '.join(unknown)}; a multi-pass score takes some of "
                f"{', '.join(PASS_INPUTS + SINGLE_INPUTS)}; a single-pass score takes no "
                "strategy/passes)"
            )
        if source not in PASS_SOURCES:
            raise AlrunError(
                f"strategy.scorer.source: expected one of {'|'.join(PASS_SOURCES)}, got '{source}'"
            )
        self.uses_passes = any(i in PER_PASS_INPUTS for i in inputs)
        if self.uses_passes and source == "none":
            raise AlrunError(
                f"strategy.scorer.source: '{name}' compares passes, so strategy/passes=none "
                "cannot feed it; choose strategy/passes=mc_dropout|tta|ensemble"
            )
        if source == "mc_dropout":
            if not isinstance(passes, int) or passes < 1:
                raise AlrunError(f"strategy.scorer.passes: expected an integer >= 1, got {passes}")
            if not 0.0 < float(dropout) < 1.0:
                raise AlrunError(
                    f"strategy.scorer.dropout: expected a number in (0, 1), got {dropout}"
                )
        if source == "tta":
            if not views:
                raise AlrunError("strategy.scorer.views: tta needs at least one view")
            for view in views:
                parse_view(view)
        if source == "ensemble":
            if not isinstance(members, int) or members < 2:
                raise AlrunError(
                    f"strategy.scorer.members: an ensemble needs >= 2 members, got {members}"
                )
            if ensemble_kind not in ("independent", "snapshot"):
                raise AlrunError(
                    "strategy.scorer.ensemble_kind: expected independent|snapshot, got "
                    f"'{ensemble_kind}'"
                )
        check_matching(match_metric, match_threshold)
        check_reduction(aggregator, empty, score_threshold, count_sources)
        if distribution not in PASS_DISTRIBUTIONS:
            raise AlrunError(
                f"strategy.scorer.distribution: expected one of {'|'.join(PASS_DISTRIBUTIONS)} "
                f"for multi-pass scores (an unmatched box is background), got '{distribution}'"
            )
        _dry_run(box_score, inputs, name)
        self.box_score = box_score
        self.inputs = inputs
        self.source = source
        self.passes = int(passes)
        self.dropout = float(dropout)
        self.views = tuple(str(v) for v in views)
        self.members = int(members)
        self.ensemble_kind = ensemble_kind
        self.match_metric = match_metric
        self.match_threshold = float(match_threshold)
        self.aggregator = aggregator
        self.score_threshold = float(score_threshold)
        self.empty = empty
        self.distribution = distribution
        self.class_weights = check_class_weights(class_weights)
        self.count_sources = count_sources
        if max_boxes is not None and not (isinstance(max_boxes, int) and max_boxes >= 1):
            raise AlrunError(
                f"strategy.scorer.max_boxes: expected null or an integer >= 1, got {max_boxes!r}"
            )
        self.max_boxes = max_boxes
        self.needs = self._needs()

    def _needs(self) -> Needs:
        proposals = "proposals" in self.inputs
        if not self.uses_passes:
            return Needs(probs=True, proposals=proposals)
        if self.source == "mc_dropout":
            return Needs(probs=True, passes=self.passes, head_dropout=self.dropout)
        if self.source == "tta":
            return Needs(probs=True, augment=self.views, proposals=proposals)
        return Needs(
            probs=True,
            passes=self.members,
            ensemble=self.members,
            ensemble_kind=self.ensemble_kind,
            proposals=proposals,
        )

    def check_detector(self, head_type: str) -> None:
        check_distribution_head(self.distribution, head_type, "binary")

    def batch_scores(self, batch: PredictionBatch) -> list[float | None]:
        if batch.probs is None:
            raise AlrunError("strategy: detector returned no class probabilities")
        if len(batch) == 0:
            return []
        rows = kept_rows(batch, self.score_threshold, self.count_sources, max_boxes=self.max_boxes)
        class_probs = batch.class_probs if batch.class_probs is not None else batch.probs[:, :-1]
        confidence = box_confidence(batch, rows)
        available: dict[str, Tensor] = {"boxes": batch.boxes[rows], "confidence": confidence}
        if "ref_probs" in self.inputs:
            available["ref_probs"] = box_distribution(
                self.distribution, batch.probs[rows], class_probs[rows], batch.labels[rows]
            )
        if "proposals" in self.inputs:
            if batch.proposals is None:
                raise AlrunError("strategy: the detector returned no proposals (two-stage only)")
            available["proposals"] = batch.proposals[rows]
        if self.uses_passes:
            if not batch.passes:
                raise AlrunError("strategy: the detector returned no extra passes")
            matched = match_passes(
                batch, rows, self.distribution, self.match_metric, self.match_threshold
            )
            available.update(
                pass_probs=matched.pass_probs,
                iou=matched.iou,
                pass_boxes=matched.pass_boxes,
                matched=matched.matched,
            )
        box_scores = self.box_score(**{k: available[k] for k in self.inputs})
        return image_scores(self, batch, rows, box_scores)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        return score_pool(self, context)

    def describe(self) -> dict[str, Any]:
        passes: dict[str, Any] = {"source": self.source if self.uses_passes else "none"}
        if self.uses_passes and self.source == "mc_dropout":
            passes.update(passes=self.passes, dropout=self.dropout)
        elif self.uses_passes and self.source == "tta":
            passes.update(views=list(self.views))
        elif self.uses_passes and self.source == "ensemble":
            passes.update(members=self.members, ensemble_kind=self.ensemble_kind)
        if self.uses_passes:
            passes.update(
                match_metric=self.match_metric,
                match_threshold=self.match_threshold,
                unmatched="background, overlap 0",
            )
        return {
            "scorer": "pass_uncertainty",
            "box_score": _name_of(self.box_score),
            **passes,
            "distribution": self.distribution,
            "max_boxes": self.max_boxes,
            **reduction_record(self),
        }
