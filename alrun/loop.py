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
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from alrun.acquisition.strategies import RandomScore, ScoringContext, Strategy
from alrun.budget import Budget, check_initial_affordable, unit_cost
from alrun.config import RunOptions
from alrun.data.coco import write_coco
from alrun.data.dataset import DatasetSplits
from alrun.detectors.base import Detector, TrainSchedule
from alrun.errors import AlrunError, BudgetError
from alrun.io import atomic_write_bytes, save_torch, write_json
from alrun.metrics import evaluate, failure_modes
from alrun.oracle import ImageLabels, SimulatedOracle
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.rundir import RunDir, config_fingerprint, pool_state, restore_pool
from alrun.types import Detections, Needs, RoundResult, Selection

__all__ = ["build_experiment", "run_experiment", "run_round", "unit_cost"]

log = logging.getLogger("alrun")


@dataclass
class Experiment:
    """Everything a run is made of, built from the composed config."""

    splits: DatasetSplits
    detector: Detector
    regime: Any
    strategy: Strategy
    budget: Budget
    oracle: SimulatedOracle
    schedule: TrainSchedule
    seed: int


def build_experiment(cfg: DictConfig) -> Experiment:
    """Instantiate every config group (``_target_`` + ``hydra.utils.instantiate``).

    The cheap groups are built (and so validated) first, so a bad value is reported before a
    dataset is read or a model is built.
    """
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise AlrunError(f"seed: expected a non-negative integer, got {cfg.seed!r}")
    schedule = instantiate(cfg.trainer)
    budget = instantiate(cfg.budget)
    strategy = instantiate(cfg.strategy)
    oracle = instantiate(cfg.oracle)
    regime = instantiate(cfg.supervision)
    splits = instantiate(cfg.dataset)
    if not isinstance(splits, DatasetSplits):
        raise AlrunError(f"dataset: _target_ must build DatasetSplits, got {type(splits).__name__}")
    return Experiment(
        splits=splits,
        detector=instantiate(cfg.detector, num_classes=len(splits.classes)),
        regime=regime,
        strategy=strategy,
        budget=budget,
        oracle=oracle,
        schedule=schedule,
        seed=int(cfg.seed),
    )


def derive_seed(seed: int, round_index: int, purpose: int) -> int:
    """An independent 31-bit seed per (run seed, round, purpose)."""
    return int(np.random.SeedSequence([seed, round_index + 1, purpose]).generate_state(1)[0] >> 1)


def initial_selection(exp: Experiment, pool: LabelPool) -> list[str]:
    """Seeded random initial set filled greedily up to ``budget.initial`` (in the budget unit)."""
    cost_of = unit_cost(exp.budget.unit, exp.oracle, pool)
    check_initial_affordable(exp.budget, cost_of, pool)
    scores = RandomScore()(None, ScoringContext(tuple(pool.unlabelled_ids), exp.seed, -1))
    picked = Strategy("random", RandomScore()).select(scores, exp.budget.initial, cost_of)
    if not picked:
        raise BudgetError(f"budget.initial: {exp.budget.initial:g} {exp.budget.unit} buys no image")
    return picked


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
    exp = build_experiment(cfg)
    fingerprint = config_fingerprint(cfg)
    run_dir = RunDir(root)
    with run_dir.lock():
        run_dir.check_config(fingerprint, options.resume)
        state = run_dir.load_state(options.keep_checkpoints)
        pool = LabelPool(exp.splits.pool)
        if state is None:
            start, rows, stopped = 0, [], None
            picked = initial_selection(exp, pool)
            pool.add(exp.oracle.annotate(pool.records(picked)), 0)
        else:
            start = state["last_completed_round"] + 1
            rows, stopped = state["results"], state["stopped"]
            restore_pool(pool, state["labels"])
        run_dir.record_config(fingerprint, record_files or {})
        _record_skipped(exp, run_dir, reporter)
        rounds = exp.budget.rounds
        if stopped is not None or start > rounds:
            reporter.info(f"run already complete ({stopped or 'all rounds done'})")
            return rows
        if state is not None:
            if exp.schedule.init == "continue":
                exp.detector.load_state_dict(run_dir.load_checkpoint(start - 1))
            reporter.info(f"resuming {root} after round {start - 1}")
        for r in range(start, rounds + 1):
            row, stopped = run_round(options, exp, pool, run_dir, r, reporter, rows)
            rows.append(row)
            reporter.info(
                f"round {r}/{rounds}: {row['images']} images, {row['cost_s']:.0f} s labelled, "
                f"mAP {row['mAP']:.3f}, mAP50 {row['mAP50']:.3f}, train {row['train_s']:.0f} s"
            )
            if stopped:
                reporter.info(f"stopping after round {r}: {stopped}")
                break
    reporter.table(rows, title=f"{exp.strategy.name} seed {exp.seed}")
    return rows


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
    rows: list[dict],
) -> tuple[dict, str | None]:
    """One round: train, evaluate, score and select, label, save; commits ``round_XX/``."""
    with run_dir.building_round(r) as tmp:
        totals = pool.totals()
        train_stats, train_s = _train(exp, pool, r, reporter)
        metrics = _evaluate(exp, r, reporter)
        acquired = _select(exp, pool, r, reporter)
        _write_round(tmp, options, exp, pool, r, acquired, metrics, train_stats, train_s)
        if acquired.labels:
            pool.add(acquired.labels, r + 1)
        row = _result_row(r, totals, metrics, train_s, acquired.timings)
        state = {
            "last_completed_round": r,
            "stopped": acquired.stopped,
            "rng": "all randomness is derived from (seed, round); nothing else to restore",
            "results": [*rows, row],
            "labels": pool_state(pool),
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


def _evaluate(exp: Experiment, r: int, reporter: Reporter) -> dict[str, Any]:
    """COCO metrics and failure modes of this round's model on the test split."""
    with reporter.task(f"round {r}/{exp.budget.rounds} test") as progress:
        test_preds = exp.detector.predict(exp.splits.test.images, Needs(), progress)
    return {**evaluate(exp.splits.test, test_preds), **failure_modes(exp.splits.test, test_preds)}


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
) -> None:
    """The round's artifacts, into its not-yet-committed directory."""
    if options.save_predictions and acquired.scores is not None:
        save_predictions(tmp / "preds.npz", acquired.preds, acquired.scores)
    train_set = pool.training_set()
    write_coco(
        train_set,
        tmp / "labelled.json",
        extra_image_fields={
            i: {
                "label_kind": pool.labels[i].kind,
                "round": int(pool.labelled_round[pool.index[i]]),
                "cost_s": pool.labels[i].cost_s,
            }
            for i in train_set.ids
        },
    )
    write_json(tmp / "selection.json", _selection_json(acquired.selection, exp, r))
    write_json(
        tmp / "metrics.json",
        {**metrics, "train": train_stats, "timings_s": {"train": train_s, **acquired.timings}},
    )
    save_torch(tmp / "checkpoint.pt", exp.detector.state_dict())


def _result_row(
    r: int, totals: dict, metrics: dict[str, Any], train_s: float, timings: dict[str, float]
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


def _select(exp: Experiment, pool: LabelPool, r: int, reporter: Reporter) -> RoundSelection:
    """Score the unlabelled pool and pick within this round's budget (not after the last round).

    When the pool runs dry the run stops cleanly: either nothing is left to score, or the
    budget buys no remaining image.
    """
    timings = {"predict_s": 0.0, "score_s": 0.0, "select_s": 0.0}
    strategy = exp.strategy
    empty = Selection((), (), (), strategy.name, strategy.aggregator, strategy.score_threshold)
    if r >= exp.budget.rounds:
        return RoundSelection(empty, [], None, timings)
    unlabelled = pool.unlabelled_ids
    if not unlabelled:
        return RoundSelection(empty, [], "pool exhausted: every image is labelled", timings)
    preds = None
    if strategy.needs.detections:
        t0 = time.perf_counter()
        with reporter.task(f"round {r}/{exp.budget.rounds} score pool") as progress:
            preds = exp.detector.predict(pool.records(unlabelled), strategy.needs, progress)
        timings["predict_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = strategy.score(preds, ScoringContext(tuple(unlabelled), exp.seed, r))
    timings["score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    amount = exp.budget.amount(r)
    picked = strategy.select(scores, amount, unit_cost(exp.budget.unit, exp.oracle, pool))
    timings["select_s"] = time.perf_counter() - t0
    if not picked:
        stopped = f"budget.per_round: {amount:g} {exp.budget.unit} buys no remaining image"
        return RoundSelection(empty, [], stopped, timings, preds, scores)
    labels = exp.oracle.annotate(pool.records(picked))
    selection = Selection(
        tuple(picked),
        tuple(float(scores[i]) for i in picked),
        tuple(lab.cost_s for lab in labels),
        strategy.name,
        strategy.aggregator,
        strategy.score_threshold,
    )
    return RoundSelection(selection, labels, None, timings, preds, scores)


def save_predictions(
    path: Path, preds: list[Detections] | None, scores: dict[str, float] | None
) -> None:
    """The pool predictions and image scores behind a selection, so it can be audited later.

    Per-box arrays are concatenated over images; ``offsets[i]:offsets[i+1]`` are image i's boxes.
    """
    preds = preds or []
    ids = [d.image_id for d in preds] if preds else sorted(scores or {})
    arrays: dict[str, np.ndarray] = {
        "image_ids": np.asarray(ids, dtype=str),
        "image_scores": np.asarray([(scores or {}).get(i, np.nan) for i in ids], dtype=np.float64),
        "offsets": np.cumsum([0, *[len(d) for d in preds]]).astype(np.int64),
    }
    for name in ("boxes", "scores", "labels", "probs"):
        parts = [getattr(d, name) for d in preds if getattr(d, name) is not None]
        if preds and len(parts) == len(preds):
            arrays[name] = torch.cat(parts).numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _selection_json(selection: Selection, exp: Experiment, r: int) -> dict[str, Any]:
    return {
        "round": r,
        "strategy": selection.strategy,
        "aggregator": selection.aggregator,
        "score_threshold": selection.score_threshold,
        "budget": exp.budget.amount(r) if r < exp.budget.rounds else 0.0,
        "unit": exp.budget.unit,
        "total_cost_s": selection.total_cost,
        "selected": [
            {"image_id": i, "score": _finite(s), "cost_s": c}
            for i, s, c in zip(selection.image_ids, selection.scores, selection.costs)
        ],
    }


def _finite(x: float) -> float | str:
    """JSON has no infinities: keep them readable as strings."""
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")
