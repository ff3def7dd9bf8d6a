"""The active-learning round loop: train, evaluate, score the pool, select, label, save.

Building the run from its config lives in :mod:`alrun.experiment`; the acquisition step in
:mod:`alrun.selection`; what a round writes in :mod:`alrun.round_files`; persistence (lock,
config record, atomic round commits, resume from what is on disk) in :mod:`alrun.rundir`;
budget costing in :mod:`alrun.budget`; run-control options in :class:`alrun.rundir.RunOptions`;
how a run starts or resumes in :mod:`alrun.resume`; which process of a job leads and what it
tells the others in :mod:`alrun.ranks`.
All randomness is derived from ``(seed, round)`` so a resumed run makes the same choices as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import alrun.distributed as distributed
import alrun.resume as resume
from alrun.annotation.oracle import AwaitingLabels, attach_oracle, begin_oracle_batch
from alrun.diagnostics import collapse_reason
from alrun.engine import STRATEGY_UNLABELLED, BatchSource, StrategyTraining
from alrun.experiment import Experiment, build_experiment
from alrun.io import read_json
from alrun.logger import NullLogger
from alrun.metrics import evaluate, failure_analysis
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.ranks import Announce, await_start, check_agreement, join_world, lead
from alrun.resume import Start
from alrun.round_files import RoundOutcome, result_row, save_predictions, write_round
from alrun.rundir import (
    FollowerDir,
    RunDir,
    RunOptions,
    check_run_names,
    config_fingerprint,
    job_log_name,
    pool_state,
)
from alrun.seeding import Purpose
from alrun.selection import initial_selection, selection_pool_misses, unit_cost
from alrun.streaming import acquire
from alrun.supervision.base import LabelRequest
from alrun.truth import TruthAudit
from alrun.types import Needs

__all__ = [
    "Experiment",
    "build_experiment",
    "derive_seed",
    "initial_selection",
    "run_experiment",
    "run_round",
    "save_predictions",
    "unit_cost",
]

log = logging.getLogger("alrun")


def derive_seed(seed: int, round_index: int, purpose: Purpose) -> int:
    """An independent 31-bit seed per (run seed, round, purpose)."""
    return int(
        np.random.SeedSequence([seed, round_index + 1, int(purpose)]).generate_state(1)[0] >> 1
    )


def run_experiment(
    cfg: DictConfig,
    root: Path,
    reporter: Reporter | None = None,
    record_files: Mapping[str, str] | None = None,
) -> list[dict]:
    """Run (or resume) one experiment into ``root``; returns the results rows.

    ``record_files`` (relative path -> text, e.g. ``.hydra/config.yaml``) are written into the
    run directory once, after the config has been checked against the one recorded there.
    With ``trainer.devices`` x ``trainer.nodes`` > 1 every process of the job runs this; only
    rank 0 writes ``root`` and the others follow it (:mod:`alrun.ranks`).
    """
    reporter = reporter or Reporter(quiet=True)
    options = RunOptions.from_config(cfg)
    check_run_names(cfg)
    world = join_world(cfg)
    try:
        if world.leader:
            return lead(world, partial(_lead_run, cfg, root, options, reporter, record_files))
        return _follow(cfg, root, options)
    finally:
        distributed.leave(world)


def _lead_run(cfg, root, options, reporter, record_files, announce: Announce) -> list[dict]:
    """Rank 0 (or the only process): everything, files included."""
    run_dir = RunDir(root)
    run_dir.check_ours(job_log_name())  # a folder of the user's: refused before any write
    exp = build_experiment(cfg)
    fingerprint = config_fingerprint(cfg)
    attach_oracle(exp.oracle, root)
    with run_dir.lock():
        run_dir.check_config(fingerprint, options.resume)
        pool = LabelPool(exp.splits.pool.visible(), TruthAudit(exp.truth))
        try:
            start = resume.begin(exp, pool, run_dir, options)
        except AwaitingLabels:  # oracle=human: the initial set went out; the run is recorded
            run_dir.record_config(fingerprint, record_files or {})
            raise
        run_dir.record_config(fingerprint, record_files or {})
        resume.record_data(exp, run_dir, reporter)
        complete = start.complete(exp.budget.rounds)
        if start.round > 0 and not complete:
            resume.restore_model(exp, run_dir, start.round, reporter)
        model = start.round > 0 and not complete  # the other ranks continue from it
        announce(lambda: resume.shared_start(exp, pool, start, model))
        if complete:
            reporter.info(f"run already complete ({start.stopped or 'all rounds done'})")
            return start.rows
        logger = instantiate(cfg.logger) if "logger" in cfg else NullLogger()
        logger.start(
            OmegaConf.to_container(cfg, resolve=True), root, f"{exp.strategy.name}-seed{exp.seed}"
        )
        _run_rounds(options, exp, pool, run_dir, start, reporter, logger)
        logger.finish()  # (a crashed run is closed by wandb's own exit hook)
    reporter.table(start.rows, title=f"{exp.strategy.name} seed {exp.seed}")
    return start.rows


def _follow(cfg: DictConfig, root: Path, options: RunOptions) -> list[dict]:
    """A rank > 0: the same experiment and rounds as rank 0, started from rank 0's state
    (labels, regime, model), writing nothing."""
    exp = build_experiment(cfg)
    shared = await_start()
    pool = LabelPool(exp.splits.pool.visible(), TruthAudit(exp.truth))
    start = resume.follow(exp, pool, shared)
    if not start.complete(exp.budget.rounds):
        quiet = Reporter(quiet=True)
        _run_rounds(options, exp, pool, FollowerDir(root), start, quiet, NullLogger())
    return start.rows


def _run_rounds(options, exp, pool, run_dir, start: Start, reporter, logger) -> None:
    """Rounds from ``start.round`` on, each row appended to ``start.rows``."""
    rounds, rows = exp.budget.rounds, start.rows
    for r in range(start.round, rounds + 1):
        row, stopped = run_round(options, exp, pool, run_dir, r, reporter, rows)
        rows.append(row)
        reporter.info(
            f"round {r}/{rounds}: {row['images']} images, {row['cost_s']:.0f} s labelled, "
            f"mAP {row['mAP']:.3f}, mAP50 {row['mAP50']:.3f}, train {row['train_s']:.0f} s"
        )
        if run_dir.writes:  # rank 0 (the others read nothing of the run dir)
            _log_round(logger, run_dir, pool, r, row)
        if stopped:
            reporter.info(f"stopping after round {r}: {stopped}")
            break


def _log_round(logger, run_dir: RunDir, pool: LabelPool, r: int, row: dict) -> None:
    """Hand the committed round to the experiment logger (wandb, or nothing)."""
    selected = read_json(run_dir.round_dir(r) / "selection.json")["selected"]
    files = [pool.record(item["image_id"]).file for item in selected]
    logger.log_round(row, read_json(run_dir.round_dir(r) / "metrics.json"), files)


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
        begin_oracle_batch(exp.oracle, r + 1, exp.detector)
        acquired = acquire(options, exp, pool, r, reporter, request, tmp)
        metrics = {**metrics, "pool_misses": selection_pool_misses(exp, pool, acquired)}
        outcome = RoundOutcome(metrics, train_stats, train_s, collapsed)
        check_agreement(acquired.selection.image_ids, r)
        if run_dir.writes:
            write_round(tmp, options, exp, pool, r, acquired, outcome)
        if acquired.labels:
            pool.add(acquired.labels, r + 1)
        row = result_row(r, totals, outcome, acquired.timings)
        state = {
            "last_completed_round": r,
            "stopped": acquired.stopped,
            "rng": "all randomness is derived from (seed, round); nothing else to restore",
            "results": [*rows, row],
            "labels": pool_state(pool),
            "regime": exp.regime.state_dict(),
            "torch_threads": torch.get_num_threads(),  # results depend on it (check_threads)
        }
        distributed.barrier()  # every rank finished the round before rank 0 commits it
        run_dir.commit_round(r, tmp, state, options.keep_checkpoints)
        distributed.barrier()
    return row, acquired.stopped


def _train(exp: Experiment, pool: LabelPool, r: int, reporter: Reporter) -> tuple[dict, float]:
    t0 = time.perf_counter()
    with reporter.task(f"round {r}/{exp.budget.rounds} train") as progress:
        seed = derive_seed(exp.seed, r, Purpose.TRAIN)
        stats = exp.regime.train(
            exp.detector, pool, exp.schedule, seed, r, progress, strategy=_training(exp, pool)
        )
    return stats, time.perf_counter() - t0


def _training(exp: Experiment, pool: LabelPool) -> StrategyTraining:
    """The strategy's training, with the unlabelled pool (images only) when a hook draws it."""
    if not exp.training.draws_unlabelled or not pool.unlabelled_ids:
        return exp.training
    source = BatchSource(
        STRATEGY_UNLABELLED,
        pool.dataset.subset(pool.unlabelled_ids, "unlabelled"),
        role="unlabelled",
    )
    return replace(exp.training, sources=(source,))


def _evaluate(
    exp: Experiment, r: int, reporter: Reporter, train_stats: dict
) -> tuple[dict[str, Any], str | None]:
    """Metrics and failure modes of this round's model on the test split, and whether the
    model looks collapsed (said loudly: its selection is suspect)."""
    with reporter.task(f"round {r}/{exp.budget.rounds} test") as progress:
        test_images = exp.splits.test.visible().images
        test_preds = distributed.predict_sharded(
            exp.detector.predict, test_images, exp.predict_block, Needs(), progress
        )
    metrics = evaluate(exp.splits.test, test_preds, exp.metric.protocol)  # the evaluator: truth
    collapsed = collapse_reason(metrics["mAP50"], train_stats)
    if collapsed:
        message = f"round {r}: model looks collapsed ({collapsed}); its selection is suspect"
        log.warning(message)
    failures = failure_analysis(exp.splits.test, test_preds, exp.metric.failure_score_threshold)
    return {**metrics, **failures}, collapsed
