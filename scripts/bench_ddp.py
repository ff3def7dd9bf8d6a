"""gloo on 2 CPU processes vs 1: time per training iteration and per pool image, and the
equality check (issue 22). Not a test: numbers depend on the machine and its load.

    python scripts/bench_ddp.py [--iterations 20] [--pool 256] [--image-size 128] [--loop]
    .venv-mmdet/bin/python scripts/bench_ddp.py --detector mmdet [--image-size 128] [--loop]

The driver runs this file as a worker three times: one process; one process with
``trainer.accumulate=2`` (the two ranks' micro-batches, computed one after the other); two
processes under ``torchrun`` (gloo). Each worker trains ``--detector`` (``tiny``: the tiny FCOS;
``mmdet``: MMDetection's RetinaNet with a ResNet-18, random init, at ``--image-size`` px) for
``--iterations`` steps of the global batch (``--batch``) on synthetic images, then predicts
``--pool`` images (sharded across ranks in prediction batches) and reports seconds per
iteration and per image.
Equality: the trained weights of 2 ranks vs one process with accumulate=2, for GroupNorm (exact
expected) and BatchNorm (rank 0's running statistics: differs; for mmdet, GroupNorm replaces the
backbone's BatchNorm through ``cfg_options``). ``--loop`` also runs a 2-round loop both ways
(norm=group) and compares every round's selection and metrics.
One torch thread per process (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> None:
    import torch

    from alrun import distributed
    from alrun.config import compose_config
    from alrun.engine import BatchSource, train
    from alrun.experiment import build_experiment
    from alrun.ranks import join_world
    from alrun.types import Needs

    torch.set_num_threads(1)
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = compose_config(
        [
            "experiment=demo",
            *detector_overrides(args.detector, args.image_size, args.norm),
            f"dataset.max_pool_images={max(args.pool, args.labelled)}",
            f"trainer.devices={devices}",
            f"trainer.accumulate={args.accumulate}",
            f"trainer.batch_size={args.batch}",
            f"trainer.iterations={args.iterations}",
            "trainer.first_iterations=null",
            "trainer.warmup_iters=5",
        ]
    )
    world = join_world(cfg)
    exp = build_experiment(cfg)
    labelled = exp.splits.pool.subset(
        [r.image_id for r in exp.splits.pool.images[: args.labelled]], "labelled"
    )
    exp.detector.reset(0)
    distributed.barrier()
    t0 = time.perf_counter()
    stats = train(exp.detector, [BatchSource("labelled", labelled)], exp.schedule, seed=1)
    train_s = time.perf_counter() - t0
    records = [r.ref for r in exp.splits.pool.images[: args.pool]]
    distributed.barrier()
    t0 = time.perf_counter()
    preds = distributed.predict_sharded(exp.detector.predict, records, exp.predict_block, Needs())
    predict_s = time.perf_counter() - t0
    if world.leader:
        torch.save(exp.detector.state_dict(), args.out / "weights.pt")
        boxes = sum(len(p) for p in preds)
        result = {
            "devices": world.size,
            "accumulate": args.accumulate,
            "s_per_iteration": train_s / args.iterations,
            "s_per_pool_image": predict_s / len(records),
            "final_loss": stats["final_loss"],
            "pool_boxes": boxes,
        }
        (args.out / "result.json").write_text(json.dumps(result))
    distributed.leave(world)


#: MMDetection's RetinaNet with a ResNet-18 (random init), every box kept
MMDET = [
    "detector=mmdet_retinanet_r50",
    "+detector.builder.cfg_options.model.backbone.depth=18",
    "+detector.builder.cfg_options.model.neck.in_channels=[64,128,256,512]",
    "+detector.builder.cfg_options.model.test_cfg.score_thr=0.0",
]
#: GroupNorm in place of the ResNet's BatchNorm (RetinaNet's FPN and head have no norm layer)
MMDET_GROUP_NORM = [
    "+detector.builder.cfg_options.model.backbone.norm_cfg.type=GN",
    "+detector.builder.cfg_options.model.backbone.norm_cfg.num_groups=32",
]


def detector_overrides(detector: str, image_size: int, norm: str) -> list[str]:
    """The worker's detector at ``image_size`` px with ``norm`` (batch | group) layers."""
    if detector == "tiny":
        return [
            "detector.device=cpu",
            f"detector.builder.image_size={image_size}",
            f"detector.builder.norm={norm}",
        ]
    return [
        *MMDET,
        "detector.device=cpu",
        f"++detector.builder.image_size={image_size}",
        *(MMDET_GROUP_NORM if norm == "group" else []),
    ]


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")


def _worker_args(args: argparse.Namespace, out: Path, norm: str, accumulate: int) -> list[str]:
    return [
        str(Path(__file__).resolve()),
        "--worker",
        f"--detector={args.detector}",
        f"--out={out}",
        f"--norm={norm}",
        f"--accumulate={accumulate}",
        f"--iterations={args.iterations}",
        f"--pool={args.pool}",
        f"--labelled={args.labelled}",
        f"--batch={args.batch}",
        f"--image-size={args.image_size}",
    ]


def _max_diff(a: Path, b: Path, buffers: bool) -> float:
    """Largest difference over the parameters, or over the BatchNorm buffers (running
    statistics and batch counts)."""
    import torch

    one, two = torch.load(a), torch.load(b)
    keys = [k for k in one if ("running_" in k or "num_batches" in k) == buffers]
    return max((float((one[k].double() - two[k].double()).abs().max()) for k in keys), default=0)


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    return env


def driver(args: argparse.Namespace) -> None:
    env = _env()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for norm in ("batch", "group"):
            for name, launcher, accumulate in (
                ("1 process", [sys.executable], 1),
                ("1 process, accumulate=2", [sys.executable], 2),
                ("2 gloo processes", torchrun, 1),
            ):
                out = Path(tmp) / f"{norm}-{name.replace(' ', '_').replace(',', '')}"
                out.mkdir()
                _run([*launcher, *_worker_args(args, out, norm, accumulate)], env)
                results[(norm, name)] = (out, json.loads((out / "result.json").read_text()))
        model = "tiny FCOS" if args.detector == "tiny" else "mmdet RetinaNet R-18"
        print(
            f"{model} {args.image_size} px, global batch {args.batch}, {args.iterations} "
            f"iterations, {args.pool} pool images, 1 torch thread per process"
        )
        print("| norm | run | s / iteration | s / pool image | final loss |")
        print("|---|---|---|---|---|")
        for (norm, name), (_, r) in results.items():
            print(
                f"| {norm} | {name} | {r['s_per_iteration']:.3f} | {r['s_per_pool_image']:.4f} "
                f"| {r['final_loss']:.6f} |"
            )
        for norm in ("batch", "group"):
            two = results[(norm, "2 gloo processes")][0] / "weights.pt"
            acc = results[(norm, "1 process, accumulate=2")][0] / "weights.pt"
            one = results[(norm, "1 process")][0] / "weights.pt"
            print(
                f"norm={norm}: max |difference| of the parameters, 2 ranks vs 1 process "
                f"accumulate=2: {_max_diff(two, acc, False):.3g} (BatchNorm buffers "
                f"{_max_diff(two, acc, True):.3g}); vs 1 process, whole batch: "
                f"{_max_diff(two, one, False):.3g} (buffers {_max_diff(two, one, True):.3g})"
            )
        if args.loop:
            loop_equality(Path(tmp), env, torchrun, args.detector)


def loop_equality(tmp: Path, env: dict[str, str], torchrun: list[str], detector: str) -> None:
    """A 2-round entropy loop, norm=group: 2 ranks vs one process with accumulate=2."""
    overrides = [
        "experiment=smoke",
        "quiet=true",
        *detector_overrides(detector, 96, "group"),
        "detector.predict_batch_size=8",
        "strategy=entropy",
        "trainer.batch_size=8",
    ]
    if detector == "mmdet":  # a young RetinaNet's boxes are all below the default 0.1
        overrides.append("strategy.scorer.score_threshold=0.0")
    runs = {}
    for name, launcher, extra in (
        ("two", torchrun, ["trainer.devices=2"]),
        ("one", [sys.executable], ["trainer.accumulate=2"]),
    ):
        t0 = time.perf_counter()
        run_dir = tmp / f"loop-{name}"
        _run([*launcher, "-m", "alrun.cli", *overrides, *extra, f"hydra.run.dir={run_dir}"], env)
        runs[name] = (run_dir, time.perf_counter() - t0)
    same = True
    for path in sorted(runs["one"][0].glob("round_*")):
        for file in ("selection.json", "metrics.json"):
            a = json.loads((path / file).read_text())
            b = json.loads((runs["two"][0] / path.name / file).read_text())
            a.pop("timings_s", None), b.pop("timings_s", None)
            same &= a == b
    print(
        f"loop (experiment=smoke, norm=group, 3 rounds): selections and metrics equal: {same}; "
        f"wall {runs['two'][1]:.0f} s (2 ranks) vs {runs['one'][1]:.0f} s (1 process)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--detector", choices=("tiny", "mmdet"), default="tiny")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--pool", type=int, default=256)
    parser.add_argument("--labelled", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--loop", action="store_true")
    args = parser.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
