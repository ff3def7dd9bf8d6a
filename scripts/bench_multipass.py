"""Multi-pass cost on the demo pool: one pool pass vs T=10 MC dropout vs 5-view TTA.

Goal: T=10 MC dropout <= 1.5x one pass, because MC passes re-run only the heads' last layers
on cached backbone/FPN/tower features. The detector is built with head dropout (as
``strategy=mc_entropy`` builds it) and trained briefly first, so it keeps a realistic number of
boxes, or loaded from ``--checkpoint`` (a demo run of an MC strategy: ``round_04/checkpoint.pt``).
Prediction and scoring (matching passes + the score) are timed separately; best of
``--repeats``.

    .venv/bin/python scripts/bench_multipass.py [--iterations 300] [--checkpoint PATH]

Other detectors: ``--detector`` (a ``detector=`` option) with Hydra ``--override``s, e.g. the
MMDetection RetinaNet at a CPU-sized scale (run with ``.venv-mmdet/bin/python``):

    .venv-mmdet/bin/python scripts/bench_multipass.py --detector mmdet_retinanet_r50 \
        --iterations 50 --pool 200 --override detector.builder.min_size=256 \
        detector.builder.max_size=256
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra.utils import instantiate

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.config import compose_config
from alrun.engine import BatchSource, train
from alrun.loop import build_experiment
from alrun.pool import LabelPool


def _time(strategy, detector, records, ids, repeats):
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds = detector.predict(records, strategy.needs)
        t1 = time.perf_counter()
        batch = PredictionBatch.from_detections(preds)
        strategy.score(AcquisitionContext(tuple(ids), 0, 0, preds=batch))
        t2 = time.perf_counter()
        timing = (t1 - t0, t2 - t1, sum(len(p) for p in preds))
        best = timing if best is None or timing[0] + timing[1] < best[0] + best[1] else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detector", default=None, help="a detector= option (default: demo's)")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides")
    parser.add_argument("--pool", type=int, default=0, help="at most this many pool images")
    args = parser.parse_args()

    chosen = [f"detector={args.detector}"] if args.detector else []
    cfg = compose_config(["experiment=demo", "strategy=mc_entropy", *chosen, *args.override])
    exp = build_experiment(cfg)  # builds the detector with head dropout 0.2 (tiny FCOS: demo's)
    pool = LabelPool(exp.splits.pool)
    train_ids = pool.dataset.ids[:100]
    if args.checkpoint:
        exp.detector.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    else:
        schedule = instantiate(cfg.trainer)
        # from scratch the schedule runs first_iterations: --iterations sets both
        its = {"iterations": args.iterations, "first_iterations": args.iterations}
        schedule = type(schedule)(**{**schedule.__dict__, **its})
        # the benchmark trains on the pool's ground truth (exp.splits holds it; the pool's
        # ImageSet, what strategies see, has none)
        source = BatchSource("labelled", exp.splits.pool.subset(train_ids))
        train(exp.detector, [source], schedule, seed=0, from_scratch=True)
    labelled = set(train_ids)
    ids = [i for i in pool.dataset.ids if i not in labelled][: args.pool or None]
    records = pool.records(ids)
    views = '["hflip","scale:0.8","jitter:0.2","noise:0.02","noise:0.05"]'
    runs = {
        "entropy (1 pass)": ["strategy=entropy"],
        "mc_entropy T=10": ["strategy=mc_entropy", "strategy.scorer.passes=10"],
        "tta 5 views": ["strategy=tta_inconsistency", f"strategy.scorer.views={views}"],
    }
    name = args.detector or "demo's detector"
    print(f"{name}; pool: {len(records)} unlabelled images, {torch.get_num_threads()} threads")
    print(f"{'strategy':<20}{'boxes':>7}{'predict_s':>11}{'score_s':>9}{'total_s':>9}{'ratio':>8}")
    base = None
    for name, overrides in runs.items():
        strategy = instantiate(compose_config([*overrides, *chosen, *args.override]).strategy)
        predict_s, score_s, boxes = _time(strategy, exp.detector, records, ids, args.repeats)
        total = predict_s + score_s
        base = total if base is None else base
        print(
            f"{name:<20}{boxes:>7}{predict_s:>11.3f}{score_s:>9.3f}{total:>9.3f}"
            f"{total / base:>7.2f}x"
        )
    print("ratio = (predict + score) / the one-pass entropy run; goal: MC T=10 <= 1.5x")


if __name__ == "__main__":
    main()
