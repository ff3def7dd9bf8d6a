"""Acquisition overhead on the demo pool: pool inference vs score + select, side by side.

Goal: score + select <= 5 % of one pool inference pass. The detector is trained briefly first so
it produces a realistic number of boxes (an untrained one produces almost none), or loaded from
``--checkpoint`` (e.g. a demo run's ``round_04/checkpoint.pt``).

    .venv/bin/python scripts/bench_overhead.py [--iterations 300] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra.utils import instantiate

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.budget import Budget
from alrun.config import compose_config
from alrun.loop import build_experiment, unit_cost
from alrun.pool import LabelPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = compose_config(["experiment=demo"])
    exp = build_experiment(cfg)
    pool = LabelPool(exp.splits.pool)
    train_ids = pool.dataset.ids[:100]
    if args.checkpoint:
        exp.detector.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    else:
        schedule = instantiate(cfg.trainer)
        schedule = type(schedule)(**{**schedule.__dict__, "iterations": args.iterations})
        exp.detector.fit(pool.dataset.subset(train_ids), schedule, seed=0, from_scratch=True)
    labelled = set(train_ids)
    unlabelled = [i for i in pool.dataset.ids if i not in labelled]
    records = pool.records(unlabelled)
    budget = Budget.from_config(initial=1, per_round=50, rounds=1)
    print(f"pool: {len(records)} unlabelled images, {torch.get_num_threads()} threads")
    print(
        f"{'strategy':<18}{'boxes':>8}{'predict_s':>11}{'score_s':>9}{'select_s':>10}{'ratio':>9}"
    )
    for name in ("random", "entropy", "margin", "least_confidence"):
        strategy = instantiate(compose_config([f"strategy={name}"]).strategy)
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            preds = (
                exp.detector.predict(records, strategy.needs) if strategy.needs.detections else None
            )
            t1 = time.perf_counter()
            context = AcquisitionContext(
                tuple(unlabelled),
                0,
                0,
                budget=budget.amount(0),
                cost_of=unit_cost("images", exp.oracle, pool),
                preds=None if preds is None else PredictionBatch.from_detections(preds),
            )
            scores = strategy.score(context)
            t2 = time.perf_counter()
            strategy.select(scores, context)
            t3 = time.perf_counter()
            timing = (t1 - t0, t2 - t1, t3 - t2)
            best = timing if best is None or sum(timing) < sum(best) else best
        boxes = sum(len(p) for p in preds) if preds else 0
        predict_s, score_s, select_s = best
        ratio = f"{(score_s + select_s) / predict_s:.2%}" if preds else "n/a"
        print(f"{name:<18}{boxes:>8}{predict_s:>11.3f}{score_s:>9.4f}{select_s:>10.4f}{ratio:>9}")
        if name == "entropy":
            entropy_preds, entropy_scorer, entropy_predict_s = preds, strategy.scorer, predict_s
    # the same entropy scorer called image by image instead of once over the whole pool
    t0 = time.perf_counter()
    for det in entropy_preds:
        entropy_scorer.image_score(det)
    loop_s = time.perf_counter() - t0
    print(
        f"{'entropy per-image':<18}{'':>8}{entropy_predict_s:>11.3f}{loop_s:>9.4f}{'':>10}"
        f"{loop_s / entropy_predict_s:>9.2%}"
    )
    print("ratio = (score + select) / pool inference; goal <= 5 %")


if __name__ == "__main__":
    main()
