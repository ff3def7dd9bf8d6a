"""The acquisition step on a pool predicted in shards (``acquisition.shard_size`` images).

Each shard is predicted, scored as it arrives and reduced to what selection needs
(:mod:`alrun.acquisition.streaming`); the misses the evaluator reports are counted per image;
with ``save_predictions=true`` the shard goes to ``preds.npz`` on disk
(:mod:`alrun.prediction_file`). A two-phase selector's candidates are predicted again in a
second pass that keeps only what its diversity stage reads.

Equality with the whole-pool step (:func:`alrun.selection.select_round`) is exact because a
detector's output for an image depends on the batch it was predicted in (last-bit float
differences, and MC-dropout masks seeded by the batch's ids): shards are cut at multiples of
the detector's ``predict_batch_size`` (and of the test-time view batch), and the second pass
re-predicts the pool's own batches that hold candidates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import alrun.distributed as distributed
from alrun.acquisition.compas import BoxQueryStrategy
from alrun.acquisition.context import PredictionBatch
from alrun.acquisition.pool_values import PoolValues
from alrun.acquisition.streaming import (
    Keep,
    concat,
    ids_only,
    one_head,
    plan_for,
    precomputed_features,
    reduce_shard,
    select_rows,
    shard_context,
)
from alrun.detectors.passes import VIEW_BATCH
from alrun.experiment import Experiment
from alrun.metrics import image_misses
from alrun.pool import LabelPool
from alrun.prediction_file import PredictionWriter
from alrun.progress import Reporter
from alrun.rundir import RunOptions
from alrun.selection import (
    RoundSelection,
    _context,
    labelled_pick,
    labelled_predictions,
    select_round,
)
from alrun.supervision.base import LabelRequest
from alrun.types import Needs, Selection


def batch_unit(exp: Experiment, needs: Needs) -> int:
    """Images per prediction batch of the detector (shards are cut at multiples of it)."""
    unit = int(getattr(exp.detector, "predict_batch_size", 1) or 1)
    return math.lcm(unit, VIEW_BATCH) if needs.augment else unit


def shard_length(shard_size: int, unit: int) -> int:
    """``shard_size`` rounded up to whole prediction batches."""
    return -(-shard_size // unit) * unit


def stream_round(
    exp: Experiment,
    pool: LabelPool,
    r: int,
    reporter: Reporter,
    request: LabelRequest,
    shard_size: int,
    save_to: Path | None = None,
) -> RoundSelection:
    """:func:`alrun.selection.select_round` with the pool predicted ``shard_size`` images at a
    time (rounded up to whole prediction batches); ``save_to``: write preds.npz there."""
    needs = exp.strategy.needs
    if (
        r >= exp.budget.rounds
        or not pool.unlabelled_ids
        or not (needs.detections or needs.embedding)
    ):
        return select_round(exp, pool, r, reporter, request)  # nothing predicted on the pool
    strategy = exp.strategy
    ids = pool.dataset.ids  # scores and miss counts are held by pool position, not in dicts
    plan = plan_for(strategy, lambda: PoolValues(ids, pool.index))
    timings = {"predict_s": 0.0, "score_s": 0.0, "select_s": 0.0}
    found = labelled_predictions(exp, pool, needs)
    context = _context(exp, pool, r, request, found)
    pool_ids = context.pool_ids  # the unlabelled images, predicted in this order
    first_needs = strategy.scorer.needs if plan.second_pass is not None else needs
    if not (first_needs.detections or first_needs.embedding):
        first_needs = needs  # a diversity stage over a random pre-selection: one pass
        plan = replace(plan, keep=plan.keep.merge(plan.second_pass), second_pass=None)
    writer = PredictionWriter(save_to) if save_to is not None else None
    misses = PoolValues(ids, pool.index, width=2, dtype=np.int32)  # (objects, missed)
    keeps_nothing = plan.keep == Keep()  # top-k: scores only, no per-shard batch kept
    kept: list[PredictionBatch] = []
    heads: set[str] = set()
    try:
        unit = batch_unit(exp, first_needs)
        length = shard_length(shard_size, unit)
        with reporter.task(f"round {r}/{exp.budget.rounds} score pool") as progress:
            for start in range(0, len(pool_ids), length):
                chunk = pool.records(pool_ids[start : start + length])
                t0 = time.perf_counter()
                dets = distributed.predict_sharded(  # each rank its part, gathered by id
                    exp.predictor.predict,
                    chunk,
                    unit,
                    first_needs,
                    _offset(progress, start, len(pool_ids)),
                )
                timings["predict_s"] += time.perf_counter() - t0
                truth = [exp.truth[d.image_id] for d in dets]  # the evaluator's, as before
                misses.update(image_misses(truth, dets, exp.metric.failure_score_threshold))
                batch = PredictionBatch.from_detections(dets)
                del dets
                t0 = time.perf_counter()
                shard = shard_context(context, batch)
                heads.add(batch.head)
                with torch.no_grad():
                    plan.scoring.add(shard)
                    if not keeps_nothing:
                        kept.append(reduce_shard(batch, plan.keep, shard))
                timings["score_s"] += time.perf_counter() - t0
                if writer is not None:
                    writer.add(batch)
                del batch, shard
        t0 = time.perf_counter()
        # keeping nothing, the reduction is the pool's ids (its own tuple, not a copy)
        reduced = ids_only(pool_ids, one_head(heads)) if keeps_nothing else concat(kept)
        kept.clear()
        context = shard_context(context, reduced)
        with torch.no_grad():
            scores = plan.scoring.finish(context)
        timings["score_s"] += time.perf_counter() - t0
        if plan.second_pass is not None:
            t0 = time.perf_counter()
            candidate_ids = strategy.selector.candidates(scores, context)
            candidates = second_pass(exp, pool, candidate_ids, needs, plan.second_pass, context)
            context = shard_context(context, candidates)
            timings["predict_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with precomputed_features(strategy.selector, plan.keep, context.preds):
            picked = strategy.select(scores, context)
        timings["select_s"] = time.perf_counter() - t0
        if writer is not None:
            writer.finish(scores)
    finally:
        if writer is not None:
            writer.discard()
    empty = Selection((), (), (), {})
    step = RoundSelection(
        empty, [], None, timings, None, scores, None, misses=misses, saved=writer is not None
    )
    return labelled_pick(exp, pool, request, picked, context.budget, step)


def second_pass(
    exp: Experiment,
    pool: LabelPool,
    ids: Sequence[str],
    needs: Needs,
    keep: Keep,
    context,
) -> PredictionBatch:
    """What ``keep`` says of the candidates ``ids``, from the pool's own prediction batches
    that hold them (``context.pool_ids`` cut as the first pass cut it, so each candidate's
    prediction is bit-identical to the first pass's)."""
    unit = batch_unit(exp, needs)
    wanted = set(ids)
    pool_ids = context.pool_ids
    batches = sorted({n // unit for n, image_id in enumerate(pool_ids) if image_id in wanted})
    kept: list[PredictionBatch] = []
    for b in batches:
        chunk = pool.records(pool_ids[b * unit : (b + 1) * unit])
        dets = distributed.predict_sharded(exp.predictor.predict, chunk, unit, needs)
        batch = PredictionBatch.from_detections(dets)
        batch = select_rows(batch, ids)
        with torch.no_grad():
            kept.append(reduce_shard(batch, keep, shard_context(context, batch)))
    return concat(kept)


def _offset(progress, start: int, total: int):
    if progress is None:
        return None
    return lambda done, _total: progress(start + done, total)


def acquire(
    options: RunOptions,
    exp: Experiment,
    pool: LabelPool,
    r: int,
    reporter: Reporter,
    request: LabelRequest,
    round_dir: Path,
) -> RoundSelection:
    """The round's acquisition step: streamed in shards unless ``acquisition.shard_size`` is
    null; with ``save_predictions`` the shards go to ``round_dir/preds.npz`` as they come (from
    rank 0 only). Box-level queries rank boxes across the whole pool: they take the whole-pool
    step."""
    if options.shard_size is None or isinstance(exp.strategy, BoxQueryStrategy):
        return select_round(exp, pool, r, reporter, request)
    leader = distributed.current().leader
    save_to = round_dir / "preds.npz" if options.save_predictions and leader else None
    return stream_round(exp, pool, r, reporter, request, options.shard_size, save_to)
