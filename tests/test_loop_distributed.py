"""Two gloo processes run the loop (torchrun, as users start it): the same selections and metrics
as one process, a killed rank leaves a run that resumes, another device count is refused.

The reference is one process with ``trainer.accumulate=2``: it computes the same two
micro-batches per step as the two ranks (alrun.distributed.rank_micro_batches), and DDP's
gradient average over 2 ranks, ``g0/2 + g1/2``, is bit for bit the accumulated ``l0/2`` and
``l1/2`` gradients (halving is exact in floating point). The detector uses GroupNorm
(``detector.builder.norm=group``): BatchNorm keeps running statistics that DDP leaves per rank
(the model keeps rank 0's), which one process updates from both micro-batches. Prediction is
sharded in whole prediction batches, so every image is predicted in the batch one process uses.
Hence the tolerance is zero: scores, selections and metrics are compared for equality.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration

ARGS = [
    "experiment=smoke",
    "quiet=true",
    "detector.device=cpu",
    "dataset.max_pool_images=30",
    "dataset.max_test_images=10",
    "budget.initial=8",
    "budget.per_round=6",
    "trainer.iterations=6",
    "trainer.first_iterations=12",
    "trainer.batch_size=4",
    "detector.builder.image_size=64",
    "detector.builder.norm=group",
    "detector.predict_batch_size=4",
    "strategy=entropy",
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO), **extra)
    return env


def _alrun(run_dir: Path, *extra: str, args: Sequence[str] = ARGS) -> list[str]:
    return ["-m", "alrun.cli", *args, *extra, f"hydra.run.dir={run_dir}"]


def torchrun(run_dir: Path, args: Sequence[str] = ARGS) -> subprocess.CompletedProcess:
    """``alrun <args>`` on 2 gloo ranks under torchrun (``args``: the run's overrides; the
    MMDetection test passes its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", *_alrun(run_dir, "trainer.devices=2", args=args)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)


def one_process(
    run_dir: Path, *extra: str, args: Sequence[str] = ARGS
) -> subprocess.CompletedProcess:
    command = [sys.executable, *_alrun(run_dir, *extra, args=args)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)


def rounds(run_dir: Path) -> list[dict]:
    """Each round's selection and metrics without the wall times."""
    rounds = []
    for path in sorted(run_dir.glob("round_*")):
        metrics = json.loads((path / "metrics.json").read_text())
        metrics.pop("timings_s")
        selection = json.loads((path / "selection.json").read_text())
        rounds.append({"metrics": metrics, "selection": selection})
    return rounds


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    run_dir = tmp_path_factory.mktemp("ddp") / "two"
    done = torchrun(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_gloo_ranks_select_and_score_as_one_process(two_ranks, tmp_path):
    one = tmp_path / "one"
    done = one_process(one, "trainer.accumulate=2")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks, single = rounds(two_ranks), rounds(one)
    assert len(ranks) == 3 and [r["selection"]["selected"] for r in ranks[:2]] != [[], []]
    assert ranks == single  # every score, image, loss and metric, exactly
    assert not any(p.name.startswith(".round_") for p in two_ranks.iterdir())


def test_a_head_without_a_loss_on_a_micro_batch_does_not_stop_two_ranks(tmp_path):
    """Loss prediction's ranking needs 2 images a micro-batch; round 1's 14 labelled images in
    batches of 4 end with a batch of 2, one image a rank, so its head has no loss on that step
    (DDP stopped the next step: "Expected to have finished reduction in the prior iteration")."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    args = [a for a in ARGS if not a.startswith("strategy=")] + ["strategy=loss_prediction"]
    two = torchrun(tmp_path / "two", args=args)
    assert two.returncode == 0, two.stderr[-3000:]
    one = one_process(tmp_path / "one", "trainer.accumulate=2", args=args)
    assert one.returncode == 0, one.stderr[-3000:]
    labelled = json.loads((tmp_path / "two" / "round_01" / "labelled.json").read_text())
    assert len(labelled["images"]) == 14
    assert rounds(tmp_path / "two") == rounds(tmp_path / "one")


def _files(run_dir: Path) -> dict[Path, int]:
    """The run's files and their times, but the lock and Hydra's job log (every attempt
    takes the one and appends to the other)."""
    skip = {".lock", "cli.log"}
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name not in skip}


def test_a_run_on_two_devices_is_not_resumed_on_one(two_ranks):
    before = _files(two_ranks)
    done = one_process(two_ranks)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("alrun: error:")]
    assert len(lines) == 1 and "trainer.devices: 2 -> (absent)" in lines[0], done.stderr
    assert _files(two_ranks) == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def start_ranks():
    """``start(run_dir, args=ARGS)`` starts the two ranks of a run by hand, with the variables
    torchrun would set (so a test can kill one, or watch each end as under srun, where a failed
    rank does not stop the other); a rank still running when the test ends is killed."""
    started: list[subprocess.Popen] = []

    def start(run_dir: Path, args: Sequence[str] = ARGS) -> list[subprocess.Popen]:
        port = str(_free_port())
        ranks = [
            subprocess.Popen(
                [sys.executable, *_alrun(run_dir, "trainer.devices=2", args=args)],
                env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]  # fmt: skip
        started.extend(ranks)
        return ranks

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_rank_1_in_round_1(run_dir: Path, start, args: Sequence[str] = ARGS) -> None:
    """Start the two ranks (``start``: the ``start_ranks`` fixture), kill rank 1 once round 0
    is committed; rank 0 fails at its next collective without committing round 1."""
    ranks = start(run_dir, args=args)
    deadline = time.monotonic() + 300
    while not (run_dir / "round_00").is_dir():
        assert time.monotonic() < deadline and ranks[0].poll() is None, "round 0 not reached"
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[0].wait(timeout=300)
    assert ranks[0].returncode != 0  # it lost its peer
    assert not (run_dir / "round_01").exists()


def test_a_killed_rank_leaves_a_run_that_resumes(two_ranks, tmp_path, start_ranks):
    """Rank 1 is killed in round 1; rank 0 fails at its next collective without committing
    round 1; torchrun then resumes the run to the uninterrupted run's results."""
    run_dir = tmp_path / "killed"
    kill_rank_1_in_round_1(run_dir, start_ranks)
    done = torchrun(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rounds(run_dir) == rounds(two_ranks)


def test_rank_0_refusing_the_folder_ends_every_rank_with_its_line(tmp_path, start_ranks):
    """Rank 0 refuses before round 0; the other rank, waiting for the start state, ends with
    the same line instead of waiting forever (as under srun, which does not stop the others;
    torchrun would); nothing is written."""
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("the user's")
    ranks = start_ranks(run_dir)
    errors = [proc.communicate(timeout=300)[1] for proc in ranks]
    for proc, stderr in zip(ranks, errors):
        lines = [line for line in stderr.splitlines() if line.startswith("alrun: error:")]
        assert proc.returncode == 2 and len(lines) == 1, stderr[-2000:]
        assert "not an alrun run directory (holds notes.txt)" in lines[0]
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]
