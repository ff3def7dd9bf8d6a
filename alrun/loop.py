"""The active-learning round loop: train, evaluate, score the pool, select, label, save.

Persistence (lock, config record, atomic round commits, resume from what is on disk) lives in
:mod:`alrun.rundir`; budget costing in :mod:`alrun.budget`; run-control options in
:class:`alrun.config.RunOptions`. All randomness is derived from ``(seed, round)`` so a resumed
run makes the same choices as an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alrun import initial_set
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import RandomScore, Strategy
from alrun.budget import Budget, check_initial_affordable, cost_function
from alrun.data.coco import write_coco
from alrun.data.dataset import DatasetSplits, split_record
from alrun.detectors.base import Detector, TrainSchedule
from alrun.diagnostics import collapse_reason
from alrun.engine import starts_from_scratch
from alrun.errors import AlrunError, BudgetError
from alrun.io import atomic_write_bytes, read_json, save_torch, write_json
from alrun.logger import NullLogger
from alrun.metrics import MetricConfig, evaluate, failure_analysis, pool_misses
from alrun.oracle import SimulatedOracle
from alrun.params import check_config
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.rundir import (
    RunDir,
    RunOptions,
    check_run_names,
    check_threads,
    config_fingerprint,
    job_log_name,
    pool_state,
    restore_pool,
)
from alrun.supervision.base import LabelRequest, Regime, check_regime
from alrun.types import Detections, ImageLabels, Needs, RoundResult, Selection

__all__ = ["build_experiment", "run_experiment", "run_round", "unit_cost"]

log = logging.getLogger("alrun")


@dataclass
class Experiment:
    """Everything a run is made of, built from the composed config."""

    splits: DatasetSplits
    detector: Detector
    regime: Regime
    strategy: Strategy
    budget: Budget
    oracle: SimulatedOracle
    schedule: TrainSchedule
    seed: int
    metric: MetricConfig = MetricConfig()
    initial_ids: tuple[str, ...] | None = None  # budget.initial_ids, resolved against the pool


def build_experiment(cfg: DictConfig) -> Experiment:
    """Instantiate every config group (``_target_`` + ``hydra.utils.instantiate``).

    Every declared setting is checked first (:func:`alrun.params.check_config`: types, ranges,
    keys, rules across keys), then the cheap groups are built, so a bad value is reported before
    a dataset is read, a model is built or a file is written.
    """
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise AlrunError(f"seed: expected a non-negative integer, got {cfg.seed!r}")
    check_config(cfg)
    schedule = instantiate(cfg.trainer)
    budget = instantiate(cfg.budget)
    strategy = instantiate(cfg.strategy)
    oracle = instantiate(cfg.oracle)
    regime = instantiate(cfg.supervision)
    check_regime(regime, oracle)
    metric = instantiate(cfg.metric) if "metric" in cfg else MetricConfig()
    splits = instantiate(cfg.dataset)
    if not isinstance(splits, DatasetSplits):
        raise AlrunError(f"dataset: _target_ must build DatasetSplits, got {type(splits).__name__}")
    strategy.check_data(splits)  # class_weights: one per class; scale views: bounded size
    initial_ids = _initial_ids(budget, splits, oracle, regime)
    if hasattr(regime, "check_data"):  # e.g. uda: the dataset must be its target domain
        regime.check_data(splits)
    if hasattr(oracle, "check_data"):  # oracle=recorded: file ids, classes, coordinates
        oracle.check_data(splits)
    detector = instantiate(cfg.detector, num_classes=len(splits.classes))
    strategy.check_detector(
        getattr(detector, "head_type", "softmax"), getattr(detector, "can_embed", True)
    )
    if hasattr(regime, "check_detector"):  # e.g. consistency, uda: which heads they run on
        regime.check_detector(detector)
    if strategy.training_hooks:  # learned scorers train their heads with the detector
        detector.strategy_hooks = strategy.training_hooks
    prepare = getattr(detector, "prepare", None)  # multi-pass set-up: MC dropout, ensembles
    if prepare is not None:
        prepare(strategy.needs)
    return Experiment(
        splits=splits,
        detector=detector,
        regime=regime,
        strategy=strategy,
        budget=budget,
        oracle=oracle,
        schedule=schedule,
        seed=int(cfg.seed),
        metric=metric,
        initial_ids=initial_ids,
    )


def _initial_ids(
    budget: Budget, splits: DatasetSplits, oracle: SimulatedOracle, regime: Regime
) -> tuple[str, ...] | None:
    """``budget.initial_ids`` read and checked against the pool and ``budget.initial``."""
    if budget.initial_ids is None:
        return None
    path = Path(budget.initial_ids).expanduser()
    ids = initial_set.resolve(path, splits)
    records = {r.image_id: r for r in splits.pool.images}
    kind = regime.label_kind(LabelRequest(0))
    cost_of = cost_function(budget.unit, oracle, records.__getitem__, kind)
    initial_set.check_affordable(path, ids, budget.initial, budget.unit, cost_of)
    return ids


def derive_seed(seed: int, round_index: int, purpose: int) -> int:
    """An independent 31-bit seed per (run seed, round, purpose)."""
    return int(np.random.SeedSequence([seed, round_index + 1, purpose]).generate_state(1)[0] >> 1)


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


def unit_cost(unit: str, oracle: SimulatedOracle, pool: LabelPool, kind: str | None = None):
    return cost_function(unit, oracle, pool.record, kind)


def run_experiment(
    cfg: DictConfig,
    root: Path,
    reporter: Reporter | None = None,
    record_files: Mapping[str, str] | None = None,
) -> list[dict]:
    """Run (or resume) one experiment into ``root``; returns the results rows.

    ``record_files`` (relative path -> text, e.g. ``.hydra/config.yaml``) are written into the
    run directory once, after the config has been checked against the one recorded there.
    """
    reporter = reporter or Reporter(quiet=True)
    options = RunOptions.from_config(cfg)
    check_run_names(cfg)
    run_dir = RunDir(root)
    run_dir.check_ours(job_log_name())  # a folder of the user's: refused before any write
    exp = build_experiment(cfg)
    fingerprint = config_fingerprint(cfg)
    with run_dir.lock():
        run_dir.check_config(fingerprint, options.resume)
        state = run_dir.load_state(options.keep_checkpoints, exp.budget.rounds)
        if state is not None and state["stopped"] is None:  # rounds left to compute?
            if state["last_completed_round"] < exp.budget.rounds:
                check_threads(state, options.allow_thread_change)
        pool = LabelPool(exp.splits.pool)
        if state is None:
            start, rows, stopped = 0, [], None
            picked = initial_selection(exp, pool)
            pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
        else:
            start = state["last_completed_round"] + 1
            rows, stopped = state["results"], state["stopped"]
            restore_pool(pool, state["labels"])
            exp.regime.load_state_dict(state.get("regime", {}))
        run_dir.record_config(fingerprint, record_files or {})
        _record_skipped(exp, run_dir, reporter)
        if not (root / "splits.json").exists():
            write_json(root / "splits.json", split_record(exp.splits))  # the test set, for audit
        rounds = exp.budget.rounds
        if stopped is not None or start > rounds:
            reporter.info(f"run already complete ({stopped or 'all rounds done'})")
            return rows
        if state is not None:
            # the last round's model: continue training from it, or (trainer.init=scratch) let
            # regimes that use it before retraining (pseudo-boxes, teachers) see the same model
            # as an uninterrupted run; with scratch an absent checkpoint is not an error
            if not starts_from_scratch(exp.schedule, start) or run_dir.has_checkpoint(start - 1):
                exp.detector.load_state_dict(run_dir.load_checkpoint(start - 1))
            reporter.info(f"resuming {root} after round {start - 1}")
        logger = instantiate(cfg.logger) if "logger" in cfg else NullLogger()
        logger.start(
            OmegaConf.to_container(cfg, resolve=True), root, f"{exp.strategy.name}-seed{exp.seed}"
        )
        for r in range(start, rounds + 1):
            row, stopped = run_round(options, exp, pool, run_dir, r, reporter, rows)
            rows.append(row)
            reporter.info(
                f"round {r}/{rounds}: {row['images']} images, {row['cost_s']:.0f} s labelled, "
                f"mAP {row['mAP']:.3f}, mAP50 {row['mAP50']:.3f}, train {row['train_s']:.0f} s"
            )
            _log_round(logger, run_dir, pool, r, row)
            if stopped:
                reporter.info(f"stopping after round {r}: {stopped}")
                break
        logger.finish()  # (a crashed run is closed by wandb's own exit hook)
    reporter.table(rows, title=f"{exp.strategy.name} seed {exp.seed}")
    return rows


def _log_round(logger, run_dir: RunDir, pool: LabelPool, r: int, row: dict) -> None:
    """Hand the committed round to the experiment logger (wandb, or nothing)."""
    selected = read_json(run_dir.round_dir(r) / "selection.json")["selected"]
    files = [pool.record(item["image_id"]).file for item in selected]
    logger.log_round(row, read_json(run_dir.round_dir(r) / "metrics.json"), files)


def _record_skipped(exp: Experiment, run_dir: RunDir, reporter: Reporter) -> None:
    skipped = [*exp.splits.pool.skipped, *exp.splits.test.skipped]
    if skipped:
        path = run_dir.root / "skipped.json"
        if not path.exists():
            write_json(path, {"count": len(skipped), "items": skipped})
        reporter.info(f"dataset: skipped {len(skipped)} invalid items (listed in skipped.json)")


def run_round(
    options: RunOptions,
    exp: Experiment,
    pool: LabelPool,
    run_dir: RunDir,
    r: int,
    reporter: Reporter,
    rows: Sequence[dict] = (),
) -> tuple[dict, str | None]:
    """One round: train, evaluate, score and select, label, save; commits ``round_XX/``.

    ``rows`` are the results of the earlier rounds (the history strategies and regimes see).
    """
    with run_dir.building_round(r) as tmp:
        totals = pool.totals()
        train_stats, train_s = _train(exp, pool, r, reporter)
        metrics, collapsed = _evaluate(exp, r, reporter, train_stats)
        history = (*rows, {"round": r, **totals, **metrics})
        request = LabelRequest(r + 1, history, exp.detector)
        acquired = _select(exp, pool, r, reporter, request)
        metrics = {**metrics, "pool_misses": _pool_misses(exp, pool, acquired)}
        _write_round(tmp, options, exp, pool, r, acquired, metrics, train_stats, train_s, collapsed)
        if acquired.labels:
            pool.add(acquired.labels, r + 1)
        row = _result_row(r, totals, metrics, train_s, acquired.timings, collapsed)
        state = {
            "last_completed_round": r,
            "stopped": acquired.stopped,
            "rng": "all randomness is derived from (seed, round); nothing else to restore",
            "results": [*rows, row],
            "labels": pool_state(pool),
            "regime": exp.regime.state_dict(),
            "torch_threads": torch.get_num_threads(),  # results depend on it (check_threads)
        }
        run_dir.commit_round(r, tmp, state, options.keep_checkpoints)
    return row, acquired.stopped


def _train(exp: Experiment, pool: LabelPool, r: int, reporter: Reporter) -> tuple[dict, float]:
    t0 = time.perf_counter()
    with reporter.task(f"round {r}/{exp.budget.rounds} train") as progress:
        stats = exp.regime.train(
            exp.detector, pool, exp.schedule, derive_seed(exp.seed, r, 1), r, progress
        )
    return stats, time.perf_counter() - t0


def _evaluate(
    exp: Experiment, r: int, reporter: Reporter, train_stats: dict
) -> tuple[dict[str, Any], str | None]:
    """Metrics and failure modes of this round's model on the test split, and whether the
    model looks collapsed (said loudly: its selection is suspect)."""
    with reporter.task(f"round {r}/{exp.budget.rounds} test") as progress:
        test_preds = exp.detector.predict(exp.splits.test.images, Needs(), progress)
    metrics = evaluate(exp.splits.test, test_preds, exp.metric.protocol)
    collapsed = collapse_reason(metrics["mAP50"], train_stats)
    if collapsed:
        message = f"round {r}: model looks collapsed ({collapsed}); its selection is suspect"
        log.warning(message)
    failures = failure_analysis(exp.splits.test, test_preds, exp.metric.failure_score_threshold)
    return {**metrics, **failures}, collapsed


def _write_round(
    tmp: Path,
    options: RunOptions,
    exp: Experiment,
    pool: LabelPool,
    r: int,
    acquired: RoundSelection,
    metrics: dict[str, Any],
    train_stats: dict,
    train_s: float,
    collapsed: str | None,
) -> None:
    """The round's artifacts, into its not-yet-committed directory."""
    if options.save_predictions and acquired.scores is not None:
        save_predictions(tmp / "preds.npz", acquired.batch, acquired.scores)
    labelled = pool.labelled_set()
    write_coco(
        labelled,
        tmp / "labelled.json",
        extra_image_fields={i: pool.describe(i) for i in labelled.ids},
    )
    write_json(tmp / "selection.json", _selection_json(acquired.selection, exp, r))
    write_json(
        tmp / "metrics.json",
        {
            **metrics,
            "train": train_stats,
            "collapsed": collapsed,
            "timings_s": {"train": train_s, **acquired.timings},
        },
    )
    save_torch(tmp / "checkpoint.pt", exp.detector.state_dict())
    round_record = getattr(exp.regime, "round_record", None)  # optional: what the regime did
    if round_record is not None:
        write_json(tmp / "supervision.json", round_record(r))


def _result_row(
    r: int,
    totals: dict,
    metrics: dict[str, Any],
    train_s: float,
    timings: dict[str, float],
    collapsed: str | None,
) -> dict:
    return asdict(
        RoundResult(
            round=r,
            images=int(totals["images"]),
            boxes=int(totals["boxes"]),
            clicks=int(totals["clicks"]),
            cost_s=totals["cost_s"],
            mAP=metrics["mAP"],
            mAP50=metrics["mAP50"],
            mAR=metrics["mAR"],
            fp=metrics["fp"],
            missed=metrics["missed"],
            wrong_class=metrics["wrong_class"],
            poor_loc=metrics["poor_loc"],
            both=metrics["both"],
            dupe=metrics["dupe"],
            collapsed=int(collapsed is not None),
            train_s=train_s,
            **timings,
        )
    )


@dataclass
class RoundSelection:
    """What the acquisition step of one round produced."""

    selection: Selection
    labels: list[ImageLabels]
    stopped: str | None
    timings: dict[str, float]
    preds: list[Detections] | None = None
    scores: dict[str, float] | None = None
    batch: PredictionBatch | None = None  # ``preds`` as the ragged batch the strategy saw


def _pool_misses(exp: Experiment, pool: LabelPool, acquired: RoundSelection) -> dict | None:
    """Objects the model misses in the selected images vs the rest (None: no pool predictions)."""
    if not acquired.preds:
        return None
    records = pool.records([p.image_id for p in acquired.preds])
    threshold = exp.metric.failure_score_threshold
    return pool_misses(records, acquired.preds, acquired.selection.image_ids, threshold)


def _select(
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
    unlabelled = pool.unlabelled_ids
    if not unlabelled:
        return RoundSelection(empty, [], "pool exhausted: every image is labelled", timings)
    preds, labelled_embeddings = None, None
    labelled_preds, labelled_targets = None, None
    needs = strategy.needs
    if needs.detections or needs.embedding or needs.labelled_embeddings:
        t0 = time.perf_counter()
        with reporter.task(f"round {r}/{exp.budget.rounds} score pool") as progress:
            preds = exp.detector.predict(pool.records(unlabelled), needs, progress)
        if needs.labelled_embeddings:
            labelled = exp.detector.predict(pool.records(pool.labelled_ids), Needs(embedding=True))
            labelled_embeddings = torch.stack([d.embedding for d in labelled])
        if needs.labelled_detections:  # (issue 13: PPAL difficulty, false-negative targets)
            labelled_preds, labelled_targets = _labelled_detections(exp, pool, needs)
        timings["predict_s"] = time.perf_counter() - t0
    amount = exp.budget.amount(r)
    kind = exp.regime.label_kind(request)
    context = AcquisitionContext(
        pool_ids=tuple(unlabelled),
        seed=exp.seed,
        round=r,
        budget=amount,
        cost_of=unit_cost(exp.budget.unit, exp.oracle, pool, kind),
        fill=exp.budget.fill,
        preds=None if preds is None else PredictionBatch.from_detections(preds),
        labelled_ids=tuple(pool.labelled_ids),
        labelled_embeddings=labelled_embeddings,
        history=request.history,
        selections=pool.selections(),
        labelled_preds=labelled_preds,
        labelled_targets=labelled_targets,
    )
    t0 = time.perf_counter()
    scores = strategy.score(context)
    timings["score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    picked = strategy.select(scores, context)
    timings["select_s"] = time.perf_counter() - t0
    if not picked:
        stopped = f"budget.per_round: {amount:g} {exp.budget.unit} buys no remaining image"
        nothing = Selection((), (), (), strategy.describe())  # this round's scoring
        return RoundSelection(nothing, [], stopped, timings, preds, scores, context.preds)
    labels = exp.regime.annotate(exp.oracle, pool.records(picked), request)
    selection = Selection(
        tuple(picked),
        tuple(float(scores[i]) for i in picked),
        tuple(lab.cost_s for lab in labels),
        strategy.describe(),
    )
    return RoundSelection(selection, labels, None, timings, preds, scores, context.preds)


def _labelled_detections(exp: Experiment, pool: LabelPool, needs: Needs):
    """Predictions on the labelled images with boxes, and those (oracle) boxes."""
    records = pool.training_set().images
    preds = PredictionBatch.from_detections(exp.detector.predict(records, needs))
    targets = {r.image_id: (torch.as_tensor(r.boxes), torch.as_tensor(r.labels)) for r in records}
    return preds, targets


def save_predictions(
    path: Path, batch: PredictionBatch | None, scores: dict[str, float] | None
) -> None:
    """The pool predictions and image scores behind a selection, so it can be audited later.

    Per-box arrays are the batch's flat ones; ``offsets[i]:offsets[i+1]`` are image i's boxes.
    """
    has_boxes = batch is not None and len(batch) > 0
    ids = list(batch.image_ids) if has_boxes else sorted(scores or {})
    arrays: dict[str, np.ndarray] = {
        "image_ids": np.asarray(ids, dtype=str),
        "image_scores": np.asarray([(scores or {}).get(i, np.nan) for i in ids], dtype=np.float64),
        "offsets": batch.offsets.numpy() if has_boxes else np.zeros(1, dtype=np.int64),
    }
    for name in ("boxes", "scores", "labels", "probs"):
        if has_boxes and getattr(batch, name) is not None:
            arrays[name] = getattr(batch, name).numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _selection_json(selection: Selection, exp: Experiment, r: int) -> dict[str, Any]:
    return {
        "round": r,
        **selection.method,
        "budget": exp.budget.amount(r) if r < exp.budget.rounds else 0.0,
        "unit": exp.budget.unit,
        "fill": exp.budget.fill,
        "tie_break": "seeded random order from (seed, round)",
        "total_cost_s": selection.total_cost,
        "selected": [
            {"image_id": i, "score": _finite(s), "cost_s": c}
            for i, s, c in zip(selection.image_ids, selection.scores, selection.costs)
        ],
    }


def _finite(x: float) -> float | str:
    """JSON has no infinities: keep them readable as strings."""
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")
