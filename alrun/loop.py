"""The active-learning round loop: train, evaluate, score the pool, select, label, save.

Building the run from its config lives in :mod:`alrun.experiment`; the acquisition step in
:mod:`alrun.selection`; what a round writes in :mod:`alrun.round_files`; persistence (lock,
config record, atomic round commits, resume from what is on disk) in :mod:`alrun.rundir`;
budget costing in :mod:`alrun.budget`; run-control options in :class:`alrun.rundir.RunOptions`.
All randomness is derived from ``(seed, round)`` so a resumed run makes the same choices as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import alrun.distributed as distributed
from alrun.annotation.oracle import AwaitingLabels
from alrun.data.dataset import split_record
from alrun.detectors.torchvision.adapter import resolve_device
from alrun.diagnostics import collapse_reason
from alrun.engine import STRATEGY_UNLABELLED, BatchSource, StrategyTraining, starts_from_scratch
from alrun.errors import AlrunError
from alrun.experiment import Experiment, build_experiment
from alrun.io import read_json, write_json
from alrun.logger import NullLogger
from alrun.metrics import evaluate, failure_analysis
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.round_files import RoundOutcome, result_row, save_predictions, write_round
from alrun.rundir import (
    FollowerDir,
    RunDir,
    RunOptions,
    check_run_names,
    check_threads,
    config_fingerprint,
    job_log_name,
    pool_state,
    restore_pool,
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
    rank 0 writes ``root`` and the others follow it (:mod:`alrun.distributed`).
    """
    reporter = reporter or Reporter(quiet=True)
    options = RunOptions.from_config(cfg)
    check_run_names(cfg)
    world = join_world(cfg)
    try:
        if world.leader:
            return _lead(cfg, root, options, reporter, record_files, world)
        return _follow(cfg, root, options)
    finally:
        distributed.leave(world)


def join_world(cfg: DictConfig, env: Mapping[str, str] | None = None) -> distributed.World:
    """Check ``trainer.devices``/``trainer.nodes`` against the devices and the launcher (one line
    each, before anything is read or written) and join the launcher's process group."""
    trainer = cfg.get("trainer") or {}
    counts = {key: trainer.get(key, 1) for key in ("devices", "nodes")}
    for key, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AlrunError(f"trainer.{key}: expected an integer >= 1, got {value!r}")
    oracle = str((cfg.get("oracle") or {}).get("_target_", ""))
    if counts["devices"] * counts["nodes"] > 1 and oracle.endswith("HumanOracle"):
        raise AlrunError(
            "trainer.devices: oracle=human pauses the run between rounds for annotators, which "
            "a job of several processes cannot; run it with trainer.devices=1 trainer.nodes=1"
        )
    detector = cfg.get("detector") or {}
    device = resolve_device(str(detector.get("device", "auto")))
    launch = distributed.check_request(
        counts["devices"],
        counts["nodes"],
        device,
        str(detector.get("_target_", "")),
        os.environ if env is None else env,
    )
    return distributed.join(launch, device)


def _lead(cfg, root, options, reporter, record_files, world) -> list[dict]:
    """Rank 0 (or the only process): everything, files included. The other ranks wait for how
    the run starts; if rank 0 fails before telling them, they end with its one line."""
    told: list[bool] = []

    def announce(start_state: Callable[[], tuple]) -> None:
        if world.size > 1:
            distributed.broadcast(("ok", start_state()))
        told.append(True)

    try:
        return _lead_run(cfg, root, options, reporter, record_files, announce)
    except BaseException as err:
        if not told:
            _tell_followers(world, err)
        raise


def _lead_run(cfg, root, options, reporter, record_files, announce) -> list[dict]:
    run_dir = RunDir(root)
    run_dir.check_ours(job_log_name())  # a folder of the user's: refused before any write
    exp = build_experiment(cfg)
    fingerprint = config_fingerprint(cfg)
    _oracle_hook(exp.oracle, "attach", root)
    with run_dir.lock():
        run_dir.check_config(fingerprint, options.resume)
        pool = LabelPool(exp.splits.pool.visible(), TruthAudit(exp.truth))
        try:
            start, rows, stopped = _start(exp, pool, run_dir, options)
        except AwaitingLabels:  # oracle=human: the initial set went out; the run is recorded
            run_dir.record_config(fingerprint, record_files or {})
            raise
        run_dir.record_config(fingerprint, record_files or {})
        _record_skipped(exp, run_dir, reporter)
        if not (root / "splits.json").exists():
            write_json(root / "splits.json", split_record(exp.splits))  # the test set, for audit
        complete = stopped is not None or start > exp.budget.rounds
        if start > 0 and not complete:
            _restore_model(exp, run_dir, start, reporter)
        model = start > 0 and not complete  # the other ranks need the model to continue from

        def start_state() -> tuple:
            state = exp.model_state() if model else None
            return start, rows, stopped, pool_state(pool), exp.regime.state_dict(), state

        announce(start_state)
        if complete:
            reporter.info(f"run already complete ({stopped or 'all rounds done'})")
            return rows
        logger = instantiate(cfg.logger) if "logger" in cfg else NullLogger()
        logger.start(
            OmegaConf.to_container(cfg, resolve=True), root, f"{exp.strategy.name}-seed{exp.seed}"
        )
        _run_rounds(options, exp, pool, run_dir, start, rows, reporter, logger)
        logger.finish()  # (a crashed run is closed by wandb's own exit hook)
    reporter.table(rows, title=f"{exp.strategy.name} seed {exp.seed}")
    return rows


def _tell_followers(world: distributed.World, err: BaseException) -> None:
    """Rank 0 failed before the rounds: the other ranks end with the same line."""
    if world.size > 1:
        message = str(err) if isinstance(err, AlrunError) else None
        distributed.broadcast(("failed", message))


def _follow(cfg: DictConfig, root: Path, options: RunOptions) -> list[dict]:
    """A rank > 0: the same experiment and rounds as rank 0, started from rank 0's state
    (labels, regime, model), writing nothing."""
    exp = build_experiment(cfg)
    status, start_state = distributed.broadcast(None)
    if status != "ok":
        raise AlrunError(start_state or "distributed: rank 0 failed before round 0; see its log")
    start, rows, stopped, labels, regime_state, model = start_state
    pool = LabelPool(exp.splits.pool.visible(), TruthAudit(exp.truth))
    restore_pool(pool, labels)
    exp.regime.load_state_dict(regime_state)
    if stopped is not None or start > exp.budget.rounds:
        return rows
    if model is not None:
        exp.load_model_state(model)
    quiet = Reporter(quiet=True)
    _run_rounds(options, exp, pool, FollowerDir(root), start, rows, quiet, NullLogger())
    return rows


def _start(
    exp: Experiment, pool: LabelPool, run_dir: RunDir, options: RunOptions
) -> tuple[int, list[dict], str | None]:
    """(first round to run, the rows so far, why the run stopped): a new run buys its initial
    set; a resumed one restores the pool and the regime's state from ``state.json``."""
    state = run_dir.load_state(options.keep_checkpoints, exp.budget.rounds)
    if state is None:
        picked = initial_selection(exp, pool)
        _oracle_hook(exp.oracle, "begin_batch", 0)
        pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
        return 0, [], None
    if state["stopped"] is None and state["last_completed_round"] < exp.budget.rounds:
        check_threads(state, options.allow_thread_change)  # rounds left to compute
    restore_pool(pool, state["labels"])
    exp.regime.load_state_dict(state.get("regime", {}))
    return state["last_completed_round"] + 1, state["results"], state["stopped"]


def _oracle_hook(oracle, name: str, *args) -> None:
    """Tell an oracle that works by batches (``oracle=human``) where the loop is; the
    simulated and recorded oracles have nothing to do with it."""
    hook = getattr(oracle, name, None)
    if hook is not None:
        hook(*args)


def _restore_model(exp: Experiment, run_dir: RunDir, start: int, reporter: Reporter) -> None:
    """The last round's model: continue training from it, or (trainer.init=scratch) let
    regimes that use it before retraining (pseudo-boxes, teachers) see the same model as an
    uninterrupted run; with scratch an absent checkpoint is not an error."""
    if not starts_from_scratch(exp.schedule, start) or run_dir.has_checkpoint(start - 1):
        exp.load_model_state(run_dir.load_checkpoint(start - 1))
    reporter.info(f"resuming {run_dir.root} after round {start - 1}")


def _run_rounds(options, exp, pool, run_dir, start, rows, reporter, logger) -> None:
    rounds = exp.budget.rounds
    for r in range(start, rounds + 1):
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
        _oracle_hook(exp.oracle, "begin_batch", r + 1, exp.detector)
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


def check_agreement(picked: Sequence[str], r: int) -> None:
    """Every rank scored the same gathered predictions; a rank that picked other images than
    rank 0 would label another pool from here on: stop instead."""
    if distributed.current().size > 1 and distributed.broadcast(list(picked)) != list(picked):
        raise RuntimeError(f"distributed: round {r}: this rank selected other images than rank 0")


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
