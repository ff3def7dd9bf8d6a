"""Fault drill: kill a smoke run at every file operation, resume it, compare with a clean run.

    python scripts/fault_drill.py                  # every kill point of a 2-round smoke run
    python scripts/fault_drill.py --points 1,17,40 # chosen points
    python scripts/fault_drill.py --sample 6 -- strategy=random   # extra alrun overrides
    python scripts/fault_drill.py --sample 6 --match "rename-done round_00" -- strategy=ppal

A reference run counts the fault points (``ALRUN_FAULT_LOG``, see :mod:`alrun.io`: one before
and one after every atomic write, rename, unlink and tree removal). For each point K a fresh
run is killed with SIGKILL at K (``ALRUN_FAULT_AT=K``), then re-run with the same command; the
resumed directory must hold the same rounds as the reference, with identical selection.json,
labelled.json, supervision.json, metrics.json (timings and pre-training cache hits aside) and
results.csv (timing columns aside), no temp leftovers and only the last checkpoint. Prints
``passed/total`` and exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the smoke preset cut to two rounds (round_00, round_01) of a few iterations each
DEFAULT_OVERRIDES = [
    "experiment=smoke",
    "quiet=true",
    "budget.rounds=1",
    "dataset.num_pool=30",
    "dataset.num_test=10",
    "trainer.iterations=3",
    "trainer.first_iterations=5",
]
TIMING_COLUMNS = {"train_s", "predict_s", "score_s", "select_s"}
#: metrics.json "train" entries that, like timings, tell about the machine rather than the run:
#: whether synthetic pre-training was read from its cache or computed in this process
MACHINE_TRAIN_KEYS = {"pretrain/cache_hit"}


def run_cli(run_dir: Path, overrides: list[str], env_extra: dict[str, str]) -> int:
    """Run ``alrun`` in a forked child (imports are paid once, in this process); returns its
    exit status, ``-9`` when SIGKILL ended it."""
    argv = ["alrun", *overrides, f"hydra.run.dir={run_dir}"]
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            for key in ("ALRUN_FAULT_AT", "ALRUN_FAULT_LOG", "ALRUN_FAULT_KIND"):
                os.environ.pop(key, None)
            os.environ.update(env_extra)
            devnull = os.open(os.devnull, os.O_WRONLY)
            err_file = os.open(
                run_dir.parent / f"{run_dir.name}.stderr",
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o644,
            )
            os.dup2(devnull, 1)
            os.dup2(err_file, 2)
            sys.argv = argv
            import torch

            torch.set_num_threads(1)  # many short runs: threads only fight each other
            from alrun.cli import main

            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - report and exit non-zero
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def snapshot(run_dir: Path) -> dict[str, object]:
    """What must match between an interrupted-and-resumed run and the reference."""
    view: dict[str, object] = {}
    for round_dir in sorted(run_dir.glob("round_*")):
        for name in ("selection.json", "labelled.json", "metrics.json", "supervision.json"):
            if name == "supervision.json" and not (round_dir / name).exists():
                continue  # written by regimes that record what they did (the listing checks it)
            data = json.loads((round_dir / name).read_text())
            if name == "metrics.json":
                data.pop("timings_s", None)
                for key in MACHINE_TRAIN_KEYS:
                    data.get("train", {}).pop(key, None)
            view[f"{round_dir.name}/{name}"] = data
        view[f"{round_dir.name}/files"] = sorted(p.name for p in round_dir.iterdir())
    with open(run_dir / "results.csv") as handle:
        view["results.csv"] = [
            {k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(handle)
        ]
    state = json.loads((run_dir / "state.json").read_text())
    view["state.json"] = {k: v for k, v in state.items() if k != "results"}
    view["leftovers"] = sorted(
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith(".tmp")
    )
    return view


def first_difference(a: dict[str, object], b: dict[str, object]) -> str | None:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return None


def choose_points(
    ops: list[str], points: str | None, sample: int | None, match: str | None = None
) -> list[int]:
    """The kill points: ``points`` as given, else those ``match`` names together with ``sample``
    evenly spread ones (each option alone, or both), else every point."""
    total = len(ops)
    if points:
        return [int(p) for p in points.split(",")]
    chosen: set[int] = set()
    if match:  # the first point whose "<op> <path>" contains each comma-separated part
        for part in match.split(","):
            chosen.add(next(i for i, line in enumerate(ops, 1) if part in line))
    if sample and sample < total:  # evenly spread, always including the first and the last
        step = (total - 1) / (sample - 1) if sample > 1 else 0
        chosen |= {round(1 + i * step) for i in range(sample)}
    elif sample:
        chosen |= set(range(1, total + 1))
    return sorted(chosen) if chosen else list(range(1, total + 1))


def count_points(overrides: list[str], workdir: Path) -> tuple[list[str], dict[str, object]]:
    """Run the reference (after a warm-up that fills data caches, whose writes would shift the
    numbering) and return its fault-point log lines and its snapshot."""
    if run_cli(workdir / "warmup", overrides, {}) != 0:
        raise SystemExit("warm-up run failed")
    shutil.rmtree(workdir / "warmup")
    log_file = workdir / "faults.log"
    log_file.unlink(missing_ok=True)
    reference = workdir / "reference"
    if run_cli(reference, overrides, {"ALRUN_FAULT_LOG": str(log_file)}) != 0:
        raise SystemExit("reference run failed")
    ops = log_file.read_text().replace(f"{reference}/", "").splitlines()
    return ops, snapshot(reference)


def drill_point(k: int, overrides: list[str], workdir: Path, expected: dict[str, object]) -> str:
    """Kill a fresh run at point ``k``, resume it, compare: "ok" or what went wrong."""
    run_dir = workdir / f"kill_{k:03d}"
    killed = run_cli(run_dir, overrides, {"ALRUN_FAULT_AT": str(k)})
    if killed != -9:
        return f"not killed (exit {killed})"
    resumed = run_cli(run_dir, overrides, {})
    if resumed != 0:
        return f"resume failed (exit {resumed})"
    diff = first_difference(expected, snapshot(run_dir))
    if diff is not None:
        return f"differs: {diff}"
    shutil.rmtree(run_dir)
    return "ok"


def drill(
    overrides: list[str], workdir: Path, points: str | None, sample: int | None, match: str | None
) -> int:
    ops, expected = count_points(overrides, workdir)
    chosen = choose_points(ops, points, sample, match)
    print(f"{len(ops)} fault points in the reference run; drilling {len(chosen)}", flush=True)
    passed = 0
    for k in chosen:
        verdict = drill_point(k, overrides, workdir, expected)
        passed += verdict == "ok"
        op = ops[k - 1].split(" ", 1)[1]
        print(f"  kill at {k:3d} ({op}): {verdict}", flush=True)
    print(f"{passed}/{len(chosen)}")
    return 0 if passed == len(chosen) else 1


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    import alrun.cli  # noqa: F401 - imported once here, inherited by every forked run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", help="comma-separated kill points (default: all)")
    parser.add_argument("--sample", type=int, help="drill this many evenly spread points")
    parser.add_argument(
        "--match", help="comma-separated op/path parts, e.g. 'rename-done round_00'"
    )
    parser.add_argument("--workdir", type=Path, help="keep run dirs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra alrun overrides (after --)")
    args = parser.parse_args(argv)
    overrides = DEFAULT_OVERRIDES + args.overrides
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return drill(overrides, args.workdir, args.points, args.sample, args.match)
    with tempfile.TemporaryDirectory(prefix="alrun-drill-") as tmp:
        return drill(overrides, Path(tmp), args.points, args.sample, args.match)


if __name__ == "__main__":
    sys.exit(main())
