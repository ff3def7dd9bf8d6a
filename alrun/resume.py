"""How a run starts: a new run buys its initial set; a resumed one gives the pool, the regime
and the model back what ``state.json`` and the last checkpoint hold; a rank > 0 starts from
what rank 0 read (:mod:`alrun.ranks`). The files themselves are :mod:`alrun.rundir`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alrun.annotation.oracle import begin_oracle_batch
from alrun.data.dataset import split_record
from alrun.engine import starts_from_scratch
from alrun.experiment import Experiment
from alrun.io import write_json
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.rundir import RunDir, RunOptions, check_threads, pool_state, restore_pool
from alrun.selection import initial_selection
from alrun.supervision.base import LabelRequest


@dataclass(frozen=True)
class Start:
    """The first round to run, the results rows so far, and why the run stopped (if it did)."""

    round: int
    rows: list[dict]
    stopped: str | None = None

    def complete(self, rounds: int) -> bool:
        return self.stopped is not None or self.round > rounds


def begin(exp: Experiment, pool: LabelPool, run_dir: RunDir, options: RunOptions) -> Start:
    """A new run buys its initial set; a resumed one restores the pool and the regime's state
    from ``state.json``."""
    state = run_dir.load_state(options.keep_checkpoints, exp.budget.rounds)
    if state is None:
        picked = initial_selection(exp, pool)
        begin_oracle_batch(exp.oracle, 0)
        pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
        return Start(0, [])
    if state["stopped"] is None and state["last_completed_round"] < exp.budget.rounds:
        check_threads(state, options.allow_thread_change)  # rounds left to compute
    restore_pool(pool, state["labels"])
    exp.regime.load_state_dict(state.get("regime", {}))
    return Start(state["last_completed_round"] + 1, state["results"], state["stopped"])


def restore_model(exp: Experiment, run_dir: RunDir, start: int, reporter: Reporter) -> None:
    """The last round's model: continue training from it, or (trainer.init=scratch) let
    regimes that use it before retraining (pseudo-boxes, teachers) see the same model as an
    uninterrupted run; with scratch an absent checkpoint is not an error."""
    if not starts_from_scratch(exp.schedule, start) or run_dir.has_checkpoint(start - 1):
        exp.load_model_state(run_dir.load_checkpoint(start - 1))
    reporter.info(f"resuming {run_dir.root} after round {start - 1}")


def record_data(exp: Experiment, run_dir: RunDir, reporter: Reporter) -> None:
    """``skipped.json`` (invalid dataset items) and ``splits.json`` (the test set, for audit),
    each written once."""
    skipped = [*exp.splits.pool.skipped, *exp.splits.test.skipped]
    if skipped:
        path = run_dir.root / "skipped.json"
        if not path.exists():
            write_json(path, {"count": len(skipped), "items": skipped})
        reporter.info(f"dataset: skipped {len(skipped)} invalid items (listed in skipped.json)")
    if not (run_dir.root / "splits.json").exists():
        write_json(run_dir.root / "splits.json", split_record(exp.splits))


def shared_start(exp: Experiment, pool: LabelPool, start: Start, model: bool) -> tuple:
    """What rank 0 tells the other ranks (picklable): ``start``, the labels, the regime's state
    and, when the run continues from a trained model, its weights."""
    state = exp.model_state() if model else None
    return start, pool_state(pool), exp.regime.state_dict(), state


def follow(exp: Experiment, pool: LabelPool, shared: Any) -> Start:
    """A rank > 0 takes rank 0's :func:`shared_start`: the same labels, regime and model."""
    start, labels, regime_state, model = shared
    restore_pool(pool, labels)
    exp.regime.load_state_dict(regime_state)
    if model is not None and not start.complete(exp.budget.rounds):
        exp.load_model_state(model)
    return start
