"""What a round writes into its (not yet committed) directory, and its row of results.csv."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alrun.acquisition.context import PredictionBatch
from alrun.data.coco import write_coco
from alrun.experiment import Experiment
from alrun.io import atomic_write_bytes, save_torch, write_json
from alrun.pool import LabelPool
from alrun.rundir import RunOptions
from alrun.selection import RoundSelection
from alrun.types import RoundResult, Selection


@dataclass(frozen=True)
class RoundOutcome:
    """What training and evaluation of one round gave."""

    metrics: dict[str, Any]
    train_stats: dict
    train_s: float
    collapsed: str | None


def write_round(
    tmp: Path,
    options: RunOptions,
    exp: Experiment,
    pool: LabelPool,
    r: int,
    acquired: RoundSelection,
    outcome: RoundOutcome,
) -> None:
    """The round's artifacts, into its not-yet-committed directory."""
    if options.save_predictions and acquired.scores is not None and not acquired.saved:
        save_predictions(tmp / "preds.npz", acquired.batch, acquired.scores)
    labelled = pool.labelled_set()
    write_coco(
        labelled,
        tmp / "labelled.json",
        extra_image_fields={i: pool.describe(i) for i in labelled.ids},
    )
    write_json(tmp / "selection.json", selection_json(acquired.selection, exp, r))
    write_json(
        tmp / "metrics.json",
        {
            **outcome.metrics,
            "train": outcome.train_stats,
            "collapsed": outcome.collapsed,
            "timings_s": {"train": outcome.train_s, **acquired.timings},
        },
    )
    save_torch(tmp / "checkpoint.pt", exp.model_state())
    record = exp.regime.round_record(r)  # what the regime did, if it says
    if record is not None:
        write_json(tmp / "supervision.json", record)


def result_row(r: int, totals: dict, outcome: RoundOutcome, timings: dict[str, float]) -> dict:
    metrics = outcome.metrics
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
            collapsed=int(outcome.collapsed is not None),
            train_s=outcome.train_s,
            **timings,
        )
    )


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


def selection_json(selection: Selection, exp: Experiment, r: int) -> dict[str, Any]:
    return {
        "round": r,
        **selection.method,
        "budget": exp.budget.amount(r) if r < exp.budget.rounds else 0.0,
        "unit": exp.budget.unit,
        "fill": exp.budget.fill,
        "tie_break": "seeded random order from (seed, round)",
        "total_cost_s": selection.total_cost,
        "selected": [
            {"image_id": i, "score": finite(s), "cost_s": c}
            for i, s, c in zip(selection.image_ids, selection.scores, selection.costs)
        ],
    }


def finite(x: float) -> float | str:
    """JSON has no infinities: keep them readable as strings."""
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")
