"""The acquisition step of a round: predict on the pool, score, pick within the budget, label.

Also the seeded random initial set. All randomness comes from ``(seed, round)``
(:meth:`alrun.acquisition.context.AcquisitionContext.rng`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

import alrun.distributed as distributed
from alrun.acquisition.compas import BoxQueryStrategy
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.pool_values import PoolValues
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import RandomScore
from alrun.budget import check_initial_affordable, cost_function
from alrun.data.images import load_image
from alrun.errors import BudgetError
from alrun.experiment import Experiment
from alrun.metrics import pool_misses, summarise_misses
from alrun.oracle import SimulatedOracle
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.regions import asked_regions
from alrun.supervision.base import LabelRequest
from alrun.types import Detections, ImageLabels, Needs, Selection


@dataclass
class RoundSelection:
    """What the acquisition step of one round produced."""

    selection: Selection
    labels: list[ImageLabels]
    stopped: str | None
    timings: dict[str, float]
    preds: list[Detections] | None = None
    scores: Mapping[str, float] | None = None
    batch: PredictionBatch | None = None  # ``preds`` as the ragged batch the strategy saw
    #: a streamed pool (alrun.streaming): (objects, missed) per scored image instead of
    #: ``preds``, and whether its predictions were already written to preds.npz
    misses: Mapping[str, tuple[int, int]] | None = None
    saved: bool = False


@dataclass(frozen=True)
class PoolPredictions:
    """What the strategy asked the detector for, on the pool and on the labelled set."""

    preds: list[Detections] | None = None
    labelled_embeddings: torch.Tensor | None = None
    labelled_preds: PredictionBatch | None = None
    labelled_targets: dict | None = None


log = logging.getLogger("alrun")


def unit_cost(unit: str, oracle: SimulatedOracle, pool: LabelPool, kind: str | None = None):
    return cost_function(unit, oracle, pool.record, kind)


def initial_selection(exp: Experiment, pool: LabelPool) -> list[str]:
    """Seeded random initial set filled up to ``budget.initial`` (in the budget unit), or the
    images ``budget.initial_ids`` lists (checked in :func:`build_experiment`)."""
    if exp.initial_ids is not None:
        return list(exp.initial_ids)
    cost_of = unit_cost(exp.budget.unit, exp.oracle, pool, exp.regime.label_kind(LabelRequest(0)))
    check_initial_affordable(exp.budget, cost_of, pool)
    context = AcquisitionContext(
        tuple(pool.unlabelled_ids),
        exp.seed,
        -1,
        budget=exp.budget.initial,
        cost_of=cost_of,
        fill=exp.budget.fill,
    )
    picked = TopK()(RandomScore()(context), context)
    if not picked:
        raise BudgetError(f"budget.initial: {exp.budget.initial:g} {exp.budget.unit} buys no image")
    return picked


def predict_for_strategy(
    exp: Experiment, pool: LabelPool, r: int, reporter: Reporter
) -> PoolPredictions:
    """Only what the strategy's ``needs`` ask (random: nothing)."""
    needs = exp.strategy.needs
    if not (needs.detections or needs.embedding or needs.labelled_embeddings):
        return PoolPredictions()
    with reporter.task(f"round {r}/{exp.budget.rounds} score pool") as progress:
        records = pool.records(candidate_ids(exp, pool))  # split across ranks when distributed
        block = exp.predict_block
        preds = distributed.predict_sharded(exp.predictor.predict, records, block, needs, progress)
    return replace(labelled_predictions(exp, pool, needs), preds=preds)


def labelled_predictions(exp: Experiment, pool: LabelPool, needs: Needs) -> PoolPredictions:
    """What ``needs`` asks of the labelled set (embeddings, detections with their boxes)."""
    embeddings, labelled_preds, targets = None, None, None
    if needs.labelled_embeddings:
        labelled = exp.detector.predict(pool.records(pool.labelled_ids), Needs(embedding=True))
        embeddings = torch.stack([d.embedding for d in labelled])
    if needs.labelled_detections:  # (issue 13: PPAL difficulty, false-negative targets)
        labelled_preds, targets = labelled_detections(exp, pool, needs)
    return PoolPredictions(None, embeddings, labelled_preds, targets)


def select_round(
    exp: Experiment, pool: LabelPool, r: int, reporter: Reporter, request: LabelRequest
) -> RoundSelection:
    """Score the unlabelled pool and pick within this round's budget (not after the last round).

    When the pool runs dry the run stops cleanly: either nothing is left to score, or the
    budget buys no remaining image.
    """
    timings = {"predict_s": 0.0, "score_s": 0.0, "select_s": 0.0}
    strategy = exp.strategy
    empty = Selection((), (), (), strategy.describe_unscored())
    if r >= exp.budget.rounds:
        return RoundSelection(empty, [], None, timings)
    if not candidate_ids(exp, pool):
        return RoundSelection(empty, [], "pool exhausted: every image is labelled", timings)
    t0 = time.perf_counter()
    found = predict_for_strategy(exp, pool, r, reporter)
    timings["predict_s"] = time.perf_counter() - t0 if found.preds is not None else 0.0
    context = _context(exp, pool, r, request, found)
    t0 = time.perf_counter()
    scores = strategy.score(context)
    timings["score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if isinstance(strategy, BoxQueryStrategy):  # box-level: the regions asked, across the pool
        queries = strategy.plan(context, _region_charges(exp, pool, strategy.charge))
        answered = {i: pool.labels[i].boxes for i in queries if i in pool.labels}
        picked, request = list(queries), replace(request, queries=queries, answered=answered)
    else:
        picked = strategy.select(scores, context)
    timings["select_s"] = time.perf_counter() - t0
    step = RoundSelection(empty, [], None, timings, found.preds, scores, context.preds)
    return labelled_pick(exp, pool, request, picked, context.budget, step)


def labelled_pick(
    exp: Experiment,
    pool: LabelPool,
    request: LabelRequest,
    picked: list[str],
    budget: float,
    found: RoundSelection,
) -> RoundSelection:
    """``found`` (predictions, scores, timings of the step) with the pick labelled by the
    oracle and described, or stopped when the budget bought nothing."""
    strategy = exp.strategy
    scores = found.scores or {}
    if not picked:
        stopped = f"budget.per_round: {budget:g} {exp.budget.unit} buys no remaining image"
        if isinstance(strategy, BoxQueryStrategy):
            stopped = (
                f"strategy={strategy.name}: no predicted box to ask about fits "
                f"budget.per_round ({budget:g} {exp.budget.unit})"
            )
        nothing = Selection((), (), (), strategy.describe())  # this round's scoring
        return replace(found, selection=nothing, labels=[], stopped=stopped)
    if not isinstance(strategy, BoxQueryStrategy):
        warning = tie_warning(strategy.name, scores, len(picked))
        if warning is not None:
            log.warning(warning)
    labels = exp.regime.annotate(exp.oracle, pool.records(picked), request)
    selection = Selection(
        tuple(picked),
        tuple(float(scores[i]) for i in picked),
        tuple(lab.cost_s for lab in labels),
        strategy.describe(),
    )
    return replace(found, selection=selection, labels=labels, stopped=None)


def _region_charges(exp: Experiment, pool: LabelPool, charge: str):
    """What each query of an image costs in the budget unit (the oracle's price)."""

    def charges(image_id, boxes, labels):
        known = pool.labels.get(image_id)  # asked before: its answers are not sold again
        return exp.oracle.region_charges(
            pool.record(image_id),
            boxes,
            labels,
            exp.budget.unit,
            charge,
            None if known is None else known.boxes,
        )

    return charges


def _context(
    exp: Experiment, pool: LabelPool, r: int, request: LabelRequest, found: PoolPredictions
) -> AcquisitionContext:
    kind = exp.regime.label_kind(request)
    ids = candidate_ids(exp, pool)
    asked = {i: asked_regions(pool.labels[i]) for i in ids if i in pool.labels}
    return AcquisitionContext(
        pool_ids=tuple(ids),
        seed=exp.seed,
        round=r,
        budget=exp.budget.amount(r),
        cost_of=unit_cost(exp.budget.unit, exp.oracle, pool, kind),
        fill=exp.budget.fill,
        preds=None if found.preds is None else PredictionBatch.from_detections(found.preds),
        labelled_ids=tuple(pool.labelled_ids),
        labelled_embeddings=found.labelled_embeddings,
        history=request.history,
        selections=pool.selections(),
        labelled_preds=found.labelled_preds,
        labelled_targets=found.labelled_targets,
        load_images=pool_pixels(pool),
        asked=asked or None,
    )


def candidate_ids(exp: Experiment, pool: LabelPool) -> list[str]:
    """The images this round may ask about: the unlabelled ones, and the partly labelled ones
    too for a box-query strategy that asks again (``strategy.reask``, BLAD's default)."""
    strategy = exp.strategy
    if isinstance(strategy, BoxQueryStrategy) and strategy.reask:
        return pool.box_query_ids()
    return pool.unlabelled_ids


def pool_pixels(pool: LabelPool):
    """A loader of pool images' pixels by id (no labels), for scorers with their own heads."""

    def load(ids):
        return [load_image(r) for r in pool.records(list(ids))]

    return load


def labelled_detections(exp: Experiment, pool: LabelPool, needs: Needs):
    """Predictions on the labelled images with boxes, and those (oracle) boxes."""
    records = pool.training_set().images
    preds = PredictionBatch.from_detections(exp.predictor.predict(records, needs))
    targets = {r.image_id: (torch.as_tensor(r.boxes), torch.as_tensor(r.labels)) for r in records}
    return preds, targets


def selection_pool_misses(
    exp: Experiment, pool: LabelPool, acquired: RoundSelection
) -> dict | None:
    """Objects the model misses in the selected images vs the rest (None: no pool predictions)."""
    threshold = exp.metric.failure_score_threshold
    if acquired.misses:  # counted shard by shard (alrun.streaming)
        return summarise_misses(acquired.misses, acquired.selection.image_ids, threshold)
    if not acquired.preds:
        return None
    records = [exp.truth[p.image_id] for p in acquired.preds]  # the evaluator's truth
    return pool_misses(records, acquired.preds, acquired.selection.image_ids, threshold)


def tie_warning(name: str, scores: Mapping[str, float], picked: int) -> str | None:
    """A line when the strategy could not tell the candidates apart: every image scored the same
    (an untrained model finds no box above the score threshold, so each scores ``empty``). The
    pick is then the seeded tie-break's, i.e. random, and the run should say so."""
    if picked >= len(scores) or len(scores) < 2:
        return None
    if isinstance(scores, PoolValues):  # a streamed step's scores, already an array
        values = scores.values[scores.present]
    else:
        values = np.asarray(list(scores.values()), dtype=float)
    same = bool(np.all(values == values[0])) or bool(np.all(np.isnan(values)))
    if not same:
        return None
    return (
        f"strategy={name}: all {len(scores)} candidate images scored the same ({values[0]:g}: "
        "e.g. no box above the score threshold); this round's picks follow the seeded "
        "tie-break, as random would"
    )
