"""Wall time and peak RSS of one acquisition step, whole pool vs streamed in shards (issue 22).

Usage: python scripts/bench_pool.py [--sizes 1000 10000 100000] [--strategies entropy
       mc_entropy ppal] [--shard-size 1024] [--image-size 64] [--json out.json]

Each (pool size, strategy, path) runs in its own process, so its peak RSS is its own: the
synthetic pool (``--image-size`` px PNGs, cached under $ALRUN_CACHE) is read, a 100-image
initial set labelled, and one acquisition step timed with an untrained tiny FCOS (predict batch
32, one torch thread): ``whole`` is :func:`alrun.selection.select_round`, ``stream`` is
:func:`alrun.streaming.stream_round`, each followed by the round's pool-miss record (which the
whole path computes from the held predictions). The scorers' thresholds are set to 0 so every
predicted box (up to 100 an image) is scored as a trained model's would be (the selectors' stay;
the untrained model's boxes, ~0.07, still pass CCMS's 0.05, so ppal's step includes CCMS's block
similarity over 400 candidates x 100 boxes, ~2.6 GB at any pool size); mc_entropy runs T=10 MC-
dropout passes; ppal uses ``quality=post_nms`` (its EMA hook needs a training round) and its
two-phase second pass over 4 x 100 candidates. The step's own memory is ``peak - before`` (RSS
when the step starts; the peak is reset then, where Linux allows, since reading a 10^5-image
pool's annotations peaks higher than a streamed step), after freed heap is handed back to the
OS (else the step reuses what reading the pool freed, more for a larger pool). The COCO line
extrapolates each path's measured per-image memory linearly to 115,922 images, and gives the
issue's estimate for RetinaNet on COCO (300 boxes an image, ~680 bytes a box) beside one shard.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

COCO_POOL = 115_922
#: bytes an image a streamed step keeps by pool position: the context's id tuple and the
#: id-by-position list (8 each), the score and the miss counts with their flags (9 each)
STEP_BYTES_AN_IMAGE = 34
REPO = Path(__file__).resolve().parents[1]


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) so the step's own peak is measured, not the
    JSON parsing of a 10^5-image pool before it (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> bool:
    """Hand freed heap back to the OS (``gc.collect`` then glibc's ``malloc_trim``) so RSS at
    the step's start counts live memory only. Otherwise reading a larger pool leaves more freed
    heap behind, the step reuses it without raising RSS, and its own growth hides there (at
    32 px the untrimmed step measured 29 MB at 10^4 images and 20 MB at 10^5)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def zero_score_thresholds(node) -> None:
    """Every ``score_threshold`` / ``threshold`` float under ``node`` set to 0, in place: an
    untrained or barely trained model's boxes then all count (tests/test_streaming.py too)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        for key in list(node.keys()):
            if key in ("score_threshold", "threshold") and isinstance(node[key], float):
                node[key] = 0.0
            else:
                zero_score_thresholds(node[key])
    elif isinstance(node, ListConfig):
        for item in node:
            zero_score_thresholds(item)


def one(size: int, strategy: str, path: str, shard_size: int, image_size: int) -> dict:
    """One measurement, in this process (the parent runs each in a fresh one)."""
    import torch

    from alrun.config import compose_config
    from alrun.loop import build_experiment, initial_selection
    from alrun.pool import LabelPool
    from alrun.progress import Reporter
    from alrun.selection import select_round, selection_pool_misses
    from alrun.streaming import stream_round
    from alrun.supervision.base import LabelRequest

    torch.set_num_threads(1)
    overrides = [
        f"dataset.num_pool={size}",
        "dataset.num_test=8",
        f"dataset.image_size={image_size}",
        f"detector.builder.image_size={image_size}",
        f"strategy={strategy}",
        "budget.initial=100",
        "budget.per_round=100",
        "budget.rounds=1",
        "quiet=true",
    ]
    if strategy == "mc_entropy":
        overrides.append("strategy.scorer.passes=10")
    if strategy == "ppal":
        overrides.append("strategy.scorer.quality=post_nms")
    cfg = compose_config(overrides)
    zero_score_thresholds(cfg.strategy.scorer)
    exp = build_experiment(cfg)
    pool = LabelPool(exp.splits.pool.visible())
    picked = initial_selection(exp, pool)
    pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
    request = LabelRequest(1, (), exp.detector)
    trimmed = _release_free_memory()
    before = _status_mb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if path == "whole":
        acquired = select_round(exp, pool, 0, Reporter(True), request)
    else:
        acquired = stream_round(exp, pool, 0, Reporter(True), request, shard_size)
    selection_pool_misses(exp, pool, acquired)  # the round's record of misses, in both
    wall = time.perf_counter() - t0
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = _status_mb("VmHWM") if reset else process_peak
    return {
        "size": size,
        "strategy": strategy,
        "path": path,
        "wall_s": round(wall, 2),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "step_mb": round(peak - before, 1),
        "process_peak_mb": round(process_peak, 1),
        "peak_is_the_steps": reset,
        "heap_trimmed": trimmed,
        "picked": len(acquired.selection.image_ids),
        "timings": {k: round(v, 2) for k, v in acquired.timings.items()},
    }


def run_child(size: int, strategy: str, path: str, args) -> dict | None:
    command = [sys.executable, __file__, "--one", str(size), strategy, path]
    command += ["--shard-size", str(args.shard_size), "--image-size", str(args.image_size)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{size} {strategy} {path}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def coco_lines(rows: list[dict], shard_size: int) -> list[str]:
    lines = []
    for strategy in sorted({r["strategy"] for r in rows}):
        for path in ("whole", "stream"):
            got = sorted(
                (r["size"], r["step_mb"])
                for r in rows
                if r["strategy"] == strategy and r["path"] == path
            )
            if len(got) < 2:
                continue
            (n0, m0), (n1, m1) = got[-2], got[-1]
            per_image = max(m1 - m0, 0.0) / (n1 - n0)
            at_coco = m1 + per_image * (COCO_POOL - n1)
            lines.append(
                f"{strategy:11s} {path:6s}: {per_image * 1024:8.2f} KB/image more -> "
                f"~{at_coco / 1024:7.2f} GB for the COCO pool's step (this tiny model)"
            )
    box = 680  # bytes a kept box: probs 81 + class_probs 80 floats, boxes, score, label, source
    lines.append(
        f"RetinaNet on COCO (issue 22: 300 boxes an image x ~{box} B): whole pool "
        f"~{COCO_POOL * 300 * box / 1e9:.1f} GB of predictions; streamed: one shard of "
        f"{shard_size} images ~{shard_size * 300 * box / 1e6:.0f} MB + per-image scores "
        f"(~{COCO_POOL * STEP_BYTES_AN_IMAGE / 1e6:.0f} MB of ids, scores, miss counts)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "STRATEGY", "PATH"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--strategies", nargs="+", default=["entropy", "mc_entropy", "ppal"])
    parser.add_argument("--paths", nargs="+", default=["whole", "stream"])
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="append each row here (JSONL)")
    args = parser.parse_args()
    if args.one:
        size, strategy, path = int(args.one[0]), args.one[1], args.one[2]
        print(json.dumps(one(size, strategy, path, args.shard_size, args.image_size)))
        return
    rows = []
    header = f"{'pool':>7s} {'strategy':11s} {'path':6s} {'wall s':>8s} {'s/1k img':>8s} "
    header += f"{'peak MB':>8s} {'before':>8s} {'step MB':>8s}"
    print(header, flush=True)
    for size in args.sizes:
        for strategy in args.strategies:
            for path in args.paths:
                row = run_child(size, strategy, path, args)
                if row is None:
                    continue
                rows.append(row)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
                print(
                    f"{size:7d} {strategy:11s} {path:6s} {row['wall_s']:8.1f} "
                    f"{1000 * row['wall_s'] / size:8.2f} {row['peak_rss_mb']:8.0f} "
                    f"{row['rss_before_mb']:8.0f} {row['step_mb']:8.0f}",
                    flush=True,
                )
    for line in coco_lines(rows, args.shard_size):
        print(line)


if __name__ == "__main__":
    main()
