"""Two gloo processes run a 2-round loop with an MMDetection RetinaNet (ResNet-18 at 96 px, the
model of the other mmdet CLI tests) and select and score as one process with
``trainer.accumulate=2``; a rank killed in round 1 leaves a run that resumes to the same results;
SyncBN on CPU ranks is one line. Marked ``mmdet`` (run with the mmdet venv, see
``tests/detectors/mmdet_helpers``); the launch and comparison machinery is
``tests/test_loop_distributed.py``'s.

The tolerance is zero, for the reasons the torchvision test gives (DDP's average of 2 ranks'
gradients is the accumulated gradient of the same 2 micro-batches; prediction is sharded in whole
prediction batches): the backbone uses GroupNorm (mmdet's default BatchNorm keeps rank 0's running
statistics, which one process updates from both micro-batches), RetinaNet's FPN and head have no
norm layer. ``strategy=ppal`` also checks the training hook that collects positive anchors on
every rank (its class quality is one process's) and the head features of sharded prediction.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import test_loop_distributed as loop
from tests.detectors.mmdet_helpers import R18, needs_mmdet
from tests.test_loop_distributed import kill_rank_1_in_round_1, one_process, rounds, torchrun

pytestmark = [pytest.mark.mmdet, needs_mmdet]

start_ranks = loop.start_ranks  # the fixture that starts the two ranks by hand

GROUP_NORM = (
    "+detector.builder.cfg_options.model.backbone.norm_cfg.type=GN",
    "+detector.builder.cfg_options.model.backbone.norm_cfg.num_groups=32",
)
ARGS = [
    "experiment=smoke",
    "quiet=true",
    "detector=mmdet_retinanet_r50",
    "detector.device=cpu",
    "detector.predict_batch_size=2",
    "+detector.builder.cfg_options.model.test_cfg.score_thr=0.0",
    *R18,
    *GROUP_NORM,
    "dataset.max_pool_images=16",
    "dataset.max_test_images=4",
    "budget.initial=4",
    "budget.per_round=4",
    "budget.rounds=1",
    "trainer.batch_size=4",
    "trainer.first_iterations=3",
    "trainer.iterations=2",
    "trainer.warmup_iters=1",
    "trainer.lr=0.001",
    "strategy=ppal",
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    run_dir = tmp_path_factory.mktemp("mmddp") / "two"
    done = torchrun(run_dir, args=ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_gloo_ranks_train_and_select_an_mmdet_model_as_one_process(two_ranks, tmp_path):
    one = tmp_path / "one"
    done = one_process(one, "trainer.accumulate=2", args=ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks, single = rounds(two_ranks), rounds(one)
    assert len(ranks) == 2 and ranks[0]["selection"]["selected"]
    assert "ppal_quality/class_0" in ranks[0]["metrics"]["train"]
    assert ranks == single  # every score, class quality, loss and metric, exactly


def test_a_killed_rank_leaves_an_mmdet_run_that_resumes(two_ranks, tmp_path, start_ranks):
    run_dir = tmp_path / "killed"
    kill_rank_1_in_round_1(run_dir, start_ranks, args=ARGS)
    done = torchrun(run_dir, args=ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rounds(run_dir) == rounds(two_ranks)


def test_sync_batch_norm_on_cpu_ranks_is_one_line():
    """torch synchronises BatchNorm over CUDA devices only: SyncBN with several CPU processes
    is refused naming the layer's norm_cfg; one process, or CUDA, keeps it."""
    import torch

    from alrun.detectors.mmdet import check_sync_batch_norm
    from alrun.errors import AlrunError
    from tests.detectors.mmdet_helpers import retinanet

    det = retinanet(**{"model.backbone.norm_cfg.type": "SyncBN"})
    with pytest.raises(AlrunError) as err:
        check_sync_batch_norm(det.model, torch.device("cpu"), 2)
    message = str(err.value)
    assert message.startswith("detector.builder.config: SyncBN in backbone.bn1 (")
    assert "cfg_options.model.backbone.norm_cfg.type=BN" in message and "\n" not in message
    check_sync_batch_norm(det.model, torch.device("cpu"), 1)
    check_sync_batch_norm(det.model, torch.device("cuda"), 2)
