"""Round-0 robustness across seeds: train the round-0 model of a config for several seeds and
print mAP50, the training loss and how many box-regression outputs are alive (> 0) per seed.

Why: training the tiny FCOS from scratch collapsed for some seeds (mAP50 0.000), which silently
wrecks every paired comparison of that seed. FCOS's regression head ends in a ReLU; once its
pre-activations are all negative no gradient reaches them again ("dead" regression: zero-size
boxes, mAP 0 while classification still fires). The ``alive`` column shows it.

    python scripts/round0_seeds.py --seeds 0 1 2 3 4 -- experiment=demo
"""

from __future__ import annotations

import argparse
import time

import torch

from alrun.config import compose_config
from alrun.loop import build_experiment, derive_seed, initial_selection
from alrun.metrics import evaluate
from alrun.pool import LabelPool
from alrun.seeding import Purpose
from alrun.types import Needs


def regression_alive(detector, records) -> float:
    """Fraction of the FCOS regression head's outputs that are > 0 (ReLU alive)."""
    model = detector.model
    captured: list[torch.Tensor] = []
    head = model.head.regression_head
    hook = head.bbox_reg.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        detector.predict(records[:16], Needs())
    finally:
        hook.remove()
    outs = torch.cat([c.flatten() for c in captured])
    return float((outs > 0).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("overrides", nargs="*", default=["experiment=demo"])
    args = parser.parse_args()
    print(f"config: {' '.join(args.overrides)}")
    print(
        f"{'seed':>4}{'mAP50':>8}{'mAP':>8}{'first_loss':>12}{'final_loss':>12}{'alive':>8}{'s':>6}"
    )
    results = []
    for seed in args.seeds:
        cfg = compose_config([*args.overrides, f"seed={seed}"])
        exp = build_experiment(cfg)
        pool = LabelPool(exp.splits.pool)
        pool.add(exp.oracle.annotate(pool.records(initial_selection(exp, pool))), 0)
        t0 = time.perf_counter()
        seed0 = derive_seed(seed, 0, Purpose.TRAIN)
        stats = exp.regime.train(exp.detector, pool, exp.schedule, seed0, 0, strategy=exp.training)
        took = time.perf_counter() - t0
        test = list(exp.splits.test.images)
        metrics = evaluate(exp.splits.test, exp.detector.predict(test, Needs()))
        alive = regression_alive(exp.detector, test)
        results.append(metrics["mAP50"])
        print(
            f"{seed:>4}{metrics['mAP50']:>8.3f}{metrics['mAP']:>8.3f}"
            f"{stats.get('first_loss', float('nan')):>12.3f}{stats['final_loss']:>12.3f}"
            f"{alive:>8.2f}{took:>6.0f}"
        )
    print(f"min mAP50 {min(results):.3f}, mean {sum(results) / len(results):.3f}")


if __name__ == "__main__":
    main()
