"""The active-learning round loop: train, evaluate, score the pool, select, label, save.

Every round is written to ``.round_XX.tmp/`` and renamed to ``round_XX/`` when complete; only
then is ``state.json`` rewritten (atomically). A killed run therefore resumes from the last
round named in ``state.json``; a half-written round directory is discarded and redone. All
randomness is derived from ``(seed, round)`` so a resumed run makes the same choices.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import RandomScore, Strategy
from alrun.budget import Budget, cost_function
from alrun.data.coco import write_coco
from alrun.data.dataset import DatasetSplits, split_record
from alrun.detectors.base import Detector, TrainSchedule
from alrun.diagnostics import collapse_reason
from alrun.engine import starts_from_scratch
from alrun.errors import AlrunError, BudgetError
from alrun.io import atomic_write_bytes, read_json, save_torch, write_csv, write_json
from alrun.logger import NullLogger
from alrun.metrics import MetricConfig, evaluate, failure_analysis, pool_misses
from alrun.oracle import SimulatedOracle
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.supervision.base import LabelRequest, Regime, check_regime
from alrun.types import Detections, ImageLabels, Needs, RoundResult, Selection

log = logging.getLogger("alrun")

STATE_FILE = "state.json"
#: config keys that may change between a run and its resumption
_RESUME_FREE_KEYS = ("resume", "quiet", "keep_checkpoints", "save_predictions")


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


def build_experiment(cfg: DictConfig) -> Experiment:
    """Instantiate every config group (``_target_`` + ``hydra.utils.instantiate``)."""
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise AlrunError(f"seed: expected a non-negative integer, got {cfg.seed!r}")
    splits = instantiate(cfg.dataset)
    if not isinstance(splits, DatasetSplits):
        raise AlrunError(f"dataset: _target_ must build DatasetSplits, got {type(splits).__name__}")
    detector = instantiate(cfg.detector, num_classes=len(splits.classes))
    strategy = instantiate(cfg.strategy)
    strategy.check_detector(
        getattr(detector, "head_type", "softmax"), getattr(detector, "can_embed", True)
    )
    exp = Experiment(
        splits=splits,
        detector=detector,
        regime=instantiate(cfg.supervision),
        strategy=strategy,
        budget=instantiate(cfg.budget),
        oracle=instantiate(cfg.oracle),
        schedule=instantiate(cfg.trainer),
        seed=int(cfg.seed),
        metric=instantiate(cfg.metric) if "metric" in cfg else MetricConfig(),
    )
    check_regime(exp.regime, exp.oracle)
    return exp


def derive_seed(seed: int, round_index: int, purpose: int) -> int:
    """An independent 31-bit seed per (run seed, round, purpose)."""
    return int(np.random.SeedSequence([seed, round_index + 1, purpose]).generate_state(1)[0] >> 1)


def _config_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in _RESUME_FREE_KEYS:
        data.pop(key, None)
    return data


def initial_selection(exp: Experiment, pool: LabelPool) -> list[str]:
    """Seeded random initial set filled greedily up to ``budget.initial`` (in the budget unit)."""
    cost_of = unit_cost(exp.budget.unit, exp.oracle, pool, exp.regime.label_kind(LabelRequest(0)))
    total = sum(cost_of(i) for i in pool.unlabelled_ids)
    if exp.budget.initial > total:
        raise BudgetError(
            f"budget.initial: {exp.budget.initial:g} {exp.budget.unit} requested but the pool "
            f"'{pool.dataset.name}' only holds {total:g} {exp.budget.unit} ({len(pool)} images)"
        )
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


class RunDir:
    """Paths and persistence of one run directory."""

    def __init__(self, root: Path):
        self.root = root

    def round_dir(self, r: int) -> Path:
        return self.root / f"round_{r:02d}"

    def tmp_round_dir(self, r: int) -> Path:
        return self.root / f".round_{r:02d}.tmp"

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def discard_incomplete(self, last_completed: int) -> None:
        for path in self.root.glob(".round_*.tmp"):
            shutil.rmtree(path)
        for path in self.root.glob("round_*"):
            if path.is_dir() and int(path.name.split("_")[1]) > last_completed:
                shutil.rmtree(path)


def _load_state(run_dir: RunDir, cfg: DictConfig) -> dict[str, Any] | None:
    mode = cfg.get("resume", "auto")
    exists = run_dir.state_path.exists()
    if mode is True and not exists:
        raise AlrunError(f"resume=true: no {STATE_FILE} in {run_dir.root}")
    if not exists:
        return None
    if mode is False:
        raise AlrunError(
            f"{run_dir.root} already holds a run ({STATE_FILE}); resume it (resume=auto) "
            "or choose another hydra.run.dir"
        )
    state = read_json(run_dir.state_path)
    if state["config"] != _config_fingerprint(cfg):
        raise AlrunError(
            f"{run_dir.root} holds a run with a different config; choose another hydra.run.dir "
            "(compare with its .hydra/config.yaml)"
        )
    return state


def _restore_pool(pool: LabelPool, state: dict[str, Any]) -> None:
    for item in state["labels"]:
        pool.add([ImageLabels.from_json(item)], int(item["round"]))


def _state(cfg, pool: LabelPool, last_completed: int, stopped: str | None, rows) -> dict:
    labels = [
        {**pool.labels[i].to_json(), "round": int(pool.labelled_round[pool.index[i]])}
        for i in pool.labelled_ids
    ]
    return {
        "last_completed_round": last_completed,
        "stopped": stopped,
        "rng": "all randomness is derived from (seed, round); nothing else to restore",
        "config": _config_fingerprint(cfg),
        "results": rows,
        "labels": labels,
    }


def run_experiment(cfg: DictConfig, root: Path, reporter: Reporter | None = None) -> list[dict]:
    """Run (or resume) one experiment into ``root``; returns the results rows."""
    reporter = reporter or Reporter(quiet=True)
    root.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(root)
    state = _load_state(run_dir, cfg)
    exp = build_experiment(cfg)
    skipped = [*exp.splits.pool.skipped, *exp.splits.test.skipped]
    if skipped:
        write_json(root / "skipped.json", {"count": len(skipped), "items": skipped})
        reporter.info(f"dataset: skipped {len(skipped)} invalid items (listed in skipped.json)")
    write_json(root / "splits.json", split_record(exp.splits))  # the test set, for audit
    pool = LabelPool(exp.splits.pool)
    rounds = exp.budget.rounds
    if state is None:
        start, rows, stopped = 0, [], None
        picked = initial_selection(exp, pool)
        pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
    else:
        start = state["last_completed_round"] + 1
        rows, stopped = state["results"], state["stopped"]
        _restore_pool(pool, state)
        exp.regime.load_state_dict(state.get("regime", {}))
        run_dir.discard_incomplete(state["last_completed_round"])
        write_csv(root / "results.csv", rows)  # it may lag state.json if killed in between
        if start <= rounds and stopped is None and not starts_from_scratch(exp.schedule, start):
            checkpoint = run_dir.round_dir(start - 1) / "checkpoint.pt"
            exp.detector.load_state_dict(torch.load(checkpoint, weights_only=True))
        reporter.info(f"resuming {root} after round {start - 1}")
    if stopped is not None or start > rounds:
        reporter.info(f"run already complete ({stopped or 'all rounds done'})")
        return rows

    logger = instantiate(cfg.logger) if "logger" in cfg else NullLogger()
    logger.start(
        OmegaConf.to_container(cfg, resolve=True), root, f"{exp.strategy.name}-seed{exp.seed}"
    )
    for r in range(start, rounds + 1):
        row, stopped = run_round(cfg, exp, pool, run_dir, r, reporter, tuple(rows))
        rows.append(row)
        state = {**_state(cfg, pool, r, stopped, rows), "regime": exp.regime.state_dict()}
        write_json(run_dir.state_path, state)
        write_csv(root / "results.csv", rows)
        if cfg.get("keep_checkpoints", "last") == "last" and r > 0:
            (run_dir.round_dir(r - 1) / "checkpoint.pt").unlink(missing_ok=True)
        reporter.info(
            f"round {r}/{rounds}: {row['images']} images, {row['cost_s']:.0f} s labelled, "
            f"mAP {row['mAP']:.3f}, mAP50 {row['mAP50']:.3f}, train {row['train_s']:.0f} s"
        )
        selected = read_json(run_dir.round_dir(r) / "selection.json")["selected"]
        files = [pool.record(item["image_id"]).file for item in selected]
        logger.log_round(row, read_json(run_dir.round_dir(r) / "metrics.json"), files)
        if stopped:
            reporter.info(f"stopping after round {r}: {stopped}")
            break
    logger.finish()  # (a crashed run is closed by wandb's own exit hook)
    reporter.table(rows, title=f"{exp.strategy.name} seed {exp.seed}")
    return rows


def run_round(
    cfg: DictConfig,
    exp: Experiment,
    pool: LabelPool,
    run_dir: RunDir,
    r: int,
    reporter: Reporter,
    history: Sequence[dict] = (),
) -> tuple[dict, str | None]:
    """Train, evaluate, select and label one round; writes ``round_XX/`` atomically."""
    rounds = exp.budget.rounds
    tmp = run_dir.tmp_round_dir(r)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        totals = pool.totals()
        train_seed = derive_seed(exp.seed, r, 1)
        t0 = time.perf_counter()
        with reporter.task(f"round {r}/{rounds} train") as progress:
            train_stats = exp.regime.train(
                exp.detector, pool, exp.schedule, train_seed, r, progress
            )
        train_s = time.perf_counter() - t0
        with reporter.task(f"round {r}/{rounds} test") as progress:
            test_preds = exp.detector.predict(exp.splits.test.images, Needs(), progress)
        metrics = evaluate(exp.splits.test, test_preds, exp.metric.protocol)
        collapsed = collapse_reason(metrics["mAP50"], train_stats)
        if collapsed:
            message = f"round {r}: model looks collapsed ({collapsed}); its selection is suspect"
            log.warning(message)
            reporter.info(f"WARNING: {message}")
        failures = failure_analysis(exp.splits.test, test_preds, exp.metric.failure_score_threshold)

        history = (*history, {"round": r, **totals, **metrics})
        acquired = _select(exp, pool, r, reporter, LabelRequest(r + 1, history, exp.detector))
        if cfg.get("save_predictions", False) and acquired.scores is not None:
            save_predictions(tmp / "preds.npz", acquired.preds, acquired.scores)
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
                **failures,
                "pool_misses": _pool_misses(exp, pool, acquired),
                "train": train_stats,
                "collapsed": collapsed,
                "timings_s": {"train": train_s, **acquired.timings},
            },
        )
        save_torch(tmp / "checkpoint.pt", exp.detector.state_dict())
        tmp.rename(run_dir.round_dir(r))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if acquired.labels:
        pool.add(acquired.labels, r + 1)
    row = asdict(
        RoundResult(
            round=r,
            images=int(totals["images"]),
            boxes=int(totals["boxes"]),
            clicks=int(totals["clicks"]),
            cost_s=totals["cost_s"],
            mAP=metrics["mAP"],
            mAP50=metrics["mAP50"],
            mAR=metrics["mAR"],
            fp=failures["fp"],
            missed=failures["missed"],
            wrong_class=failures["wrong_class"],
            poor_loc=failures["poor_loc"],
            both=failures["both"],
            dupe=failures["dupe"],
            collapsed=int(collapsed is not None),
            train_s=train_s,
            **acquired.timings,
        )
    )
    return row, acquired.stopped


@dataclass
class RoundSelection:
    """What the acquisition step of one round produced."""

    selection: Selection
    labels: list[ImageLabels]
    stopped: str | None
    timings: dict[str, float]
    preds: list[Detections] | None = None
    scores: dict[str, float] | None = None


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
    empty = Selection((), (), (), strategy.describe())
    if r >= exp.budget.rounds:
        return RoundSelection(empty, [], None, timings)
    unlabelled = pool.unlabelled_ids
    if not unlabelled:
        return RoundSelection(empty, [], "pool exhausted: every image is labelled", timings)
    preds, labelled_embeddings = None, None
    needs = strategy.needs
    if needs.detections or needs.embedding or needs.labelled_embeddings:
        t0 = time.perf_counter()
        with reporter.task(f"round {r}/{exp.budget.rounds} score pool") as progress:
            preds = exp.detector.predict(pool.records(unlabelled), needs, progress)
        if needs.labelled_embeddings:
            labelled = exp.detector.predict(pool.records(pool.labelled_ids), Needs(embedding=True))
            labelled_embeddings = torch.stack([d.embedding for d in labelled])
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
    )
    t0 = time.perf_counter()
    scores = strategy.score(context)
    timings["score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    picked = strategy.select(scores, context)
    timings["select_s"] = time.perf_counter() - t0
    if not picked:
        stopped = f"budget.per_round: {amount:g} {exp.budget.unit} buys no remaining image"
        return RoundSelection(empty, [], stopped, timings, preds, scores)
    labels = exp.regime.annotate(exp.oracle, pool.records(picked), request)
    selection = Selection(
        tuple(picked),
        tuple(float(scores[i]) for i in picked),
        tuple(lab.cost_s for lab in labels),
        strategy.describe(),
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
