"""alrun.distributed: launcher detection, the one-line refusals, the per-device share of a batch,
sharded prediction; and the loop's refusals before anything is written. The two-process runs are
in tests/test_loop_distributed.py (integration)."""

from __future__ import annotations

import os

import pytest
import torch

from alrun import distributed
from alrun.detectors.base import TrainSchedule
from alrun.distributed import (
    World,
    check_request,
    detect_launch,
    first_host,
    gather_by_id,
    micro_batches,
    predict_sharded,
    rank_micro_batches,
    shard,
)
from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.ranks import join_world
from alrun.rundir import RunDir, RunDirError, config_fingerprint
from tests.helpers import compose_config

CPU = torch.device("cpu")
TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29400",
}
SLURM = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "123456",
}


def test_torchrun_environment_is_read():
    launch = detect_launch(TORCHRUN)
    assert launch == distributed.Launch("torchrun", 1, 1, 2, "10.0.0.5", 29400)


def test_slurm_environment_is_read_with_a_port_from_the_job_id():
    launch = detect_launch(SLURM)
    assert (launch.launcher, launch.rank, launch.local_rank, launch.world_size) == (
        "slurm",
        3,
        1,
        4,
    )
    assert launch.master_addr == "gpu07"
    assert 20000 <= launch.master_port <= 60000
    assert detect_launch(SLURM).master_port == launch.master_port  # every task agrees
    assert detect_launch({**SLURM, "MASTER_PORT": "12345"}).master_port == 12345


def test_torchrun_wins_inside_slurm_and_one_task_jobs_are_not_distributed():
    assert detect_launch({**SLURM, **TORCHRUN}).launcher == "torchrun"
    assert detect_launch({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert detect_launch({}) is None


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node1", "node1"), ("gpu[03-05,09],cpu1", "gpu03"), ("a[7,9]", "a7"), ("x,y", "x")],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_a_non_integer_launcher_variable_is_one_line():
    with pytest.raises(AlrunError, match="^RANK: expected an integer from the launcher"):
        detect_launch({**TORCHRUN, "RANK": "one"})


@pytest.mark.parametrize(
    ("devices", "nodes", "env", "message"),
    [
        (64, 1, TORCHRUN, r"^trainer.devices: 64 asked but this node has \d+ CPU cores"),
        (2, 1, {}, "^trainer.devices: 2 x 1 nodes needs a distributed launcher"),
        (2, 2, TORCHRUN, "= 4 but the torchrun launcher started 2 processes"),
        (1, 1, TORCHRUN, "torchrun launcher started 2 processes but trainer.devices x"),
    ],
)
def test_impossible_requests_are_one_line(devices, nodes, env, message):
    if devices == 2 and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    with pytest.raises(AlrunError, match=message) as err:
        check_request(devices, nodes, CPU, env)
    assert "\n" not in str(err.value)


def test_one_process_without_a_launcher_is_not_distributed():
    assert check_request(1, 1, CPU, {}) is None
    assert distributed.current() == World()


def test_the_global_batch_must_give_every_micro_batch_an_image():
    with pytest.raises(AlrunError, match="trainer.batch_size: 2 is the global batch"):
        TrainSchedule(batch_size=2, devices=2, accumulate=2)
    assert TrainSchedule(batch_size=4, devices=2, accumulate=2).accumulate == 2


def test_micro_batches_deal_the_batch_and_pad_a_short_one():
    assert micro_batches([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert micro_batches([7], 3) == [[7], [7], [7]]  # the end of an epoch, as DistributedSampler
    with pytest.raises(AlrunError, match="empty batch"):
        micro_batches([], 2)


def test_n_ranks_compute_the_micro_batches_of_one_process_with_accumulate_n():
    batch = list(range(11))
    one = rank_micro_batches(batch, World(0, 1), 4)
    ranks = [m for r in range(2) for m in rank_micro_batches(batch, World(r, 2), 2)]
    assert ranks == one == micro_batches(batch, 4)
    assert sorted(i for m in one for i in m) == batch


def test_shards_are_whole_prediction_batches_dealt_round_robin():
    items = list(range(10))
    parts = [shard(items, World(r, 2), 3) for r in range(2)]
    assert parts == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]
    assert shard(items, World(1, 3)) == [1, 4, 7]


def test_gather_by_id_restores_the_order_and_names_missing_images():
    assert gather_by_id(["b", "a"], ["a", "b"], [1, 2]) == [2, 1]
    with pytest.raises(RuntimeError, match="no prediction gathered for 1 images"):
        gather_by_id(["a", "c"], ["a"], [1])


def test_concat_over_ranks_sends_cpu_tensors_and_returns_them_on_the_given_device(monkeypatch):
    """Under nccl a pickled CUDA tensor would unpickle onto the sender's GPU: every tensor must
    travel on the CPU and come back on the caller's device (the meta device stands in for a
    GPU), through tuples, lists and dicts."""
    sent = []

    def fake_all_gather_object(gathered, mine):
        sent.append(mine)
        other = [("b", torch.full((2,), 7.0), {"boxes": torch.ones(1, 4)})]
        gathered[0], gathered[1] = mine, other  # this process is rank 0 of 2

    monkeypatch.setattr(distributed, "current", lambda: World(rank=0, size=2))
    monkeypatch.setattr(distributed.dist, "all_gather_object", fake_all_gather_object)
    mine = [("a", torch.arange(3.0), {"boxes": torch.zeros(1, 4), "labels": [torch.tensor(1)]})]

    out = distributed.concat_over_ranks(mine, device="meta")

    assert [t.device.type for t in _tensors(sent)] == ["cpu", "cpu", "cpu"]
    assert [name for name, _, _ in out] == ["a", "b"]
    assert {t.device.type for t in _tensors(out)} == {"meta"}
    assert out[1][1].shape == (2,) and isinstance(out[0][2]["labels"], list)


def test_step_notes_are_every_ranks_in_rank_order_and_emptied_by_drain(monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: World(rank=1, size=2))

    def fake_all_gather_object(gathered, mine):  # this process is rank 1 of 2
        gathered[0], gathered[1] = [("loss", 0.5), ("loss", 0.25)], mine

    monkeypatch.setattr(distributed.dist, "all_gather_object", fake_all_gather_object)
    notes = distributed.StepNotes()
    notes.note(("loss", 0.125))
    assert notes.drain() == [("loss", 0.5), ("loss", 0.25), ("loss", 0.125)]
    assert notes.drain() == [("loss", 0.5), ("loss", 0.25)]  # nothing of its own left


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def test_predict_sharded_is_the_plain_call_for_one_process():
    calls = []

    def predict(records, tag):
        calls.append((list(records), tag))
        return [r * 2 for r in records]

    assert predict_sharded(predict, [1, 2, 3], 2, "x") == [2, 4, 6]
    assert calls == [([1, 2, 3], "x")]


SMALL = ["experiment=smoke", "quiet=true", "detector.device=cpu"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.devices=64"], "trainer.devices: 64 asked but this node has"),
        (["trainer.devices=2"], "trainer.devices: 2 x 1 nodes needs a distributed launcher"),
        (["trainer.nodes=0"], "trainer.nodes: expected an integer >= 1, got 0"),
        (["trainer.nodes=2", "oracle=human"], "trainer.devices: oracle=human pauses the run"),
    ],
)
def test_the_loop_refuses_before_writing_anything(tmp_path, monkeypatch, overrides, message):
    if overrides == ["trainer.devices=2"] and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    root = tmp_path / "run"
    with pytest.raises(AlrunError, match=message):
        run_experiment(compose_config(SMALL + overrides), root)
    assert not root.exists()


def test_join_world_reads_the_given_environment():
    cfg = compose_config(SMALL + ["trainer.devices=2"])
    with pytest.raises(AlrunError, match="needs a distributed launcher"):
        join_world(cfg, env={})
    assert join_world(compose_config(SMALL), env={}) == World()


def test_the_mmdetection_backend_is_checked_as_any_detector():
    """mmdet models train through alrun's engine, whose DDP replica serves every backend: a
    request for 2 devices is no longer refused for the backend, only for what is missing."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    cfg = compose_config(SMALL + ["detector=mmdet_retinanet_r50", "trainer.devices=2"])
    with pytest.raises(AlrunError, match="^trainer.devices: 2 x 1 nodes needs a distributed"):
        join_world(cfg, env={})


def test_a_run_resumed_on_another_device_count_is_refused(tmp_path):
    """N -> M devices is a different config: trainer.batch_size is the global batch, but per-
    device BatchNorm statistics and loss normalisation change the numbers, so a resumed run would
    match neither an N- nor an M-device run. One-process records omit the keys (older runs
    resume)."""
    one = config_fingerprint(compose_config(SMALL))
    two = config_fingerprint(compose_config(SMALL + ["trainer.devices=2"]))
    assert "devices" not in one["trainer"] and two["trainer"]["devices"] == 2
    run_dir = RunDir(tmp_path)
    run_dir.record_config(two, {})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunDirError, match=r"trainer.devices: 2 -> \(absent\)"):
        run_dir.check_config(one, "auto")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_only_ranks_above_0_are_followers():
    assert distributed.is_follower(TORCHRUN)
    assert not distributed.is_follower({**TORCHRUN, "RANK": "0"})
    assert not distributed.is_follower({})
    assert not distributed.is_follower({**TORCHRUN, "RANK": "x"})  # reported when joining
