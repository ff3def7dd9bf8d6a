"""What rank 0 tells the other ranks before the rounds: the start state, or its one line when
it fails first (two gloo processes here; the loop on two ranks: tests/test_loop_distributed)."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from alrun import ranks
from alrun.distributed import World
from alrun.errors import AlrunError


def test_one_process_leads_alone():
    told = []

    def run(announce):
        announce(lambda: told.append(1))
        return "rows"

    def refused(announce):
        raise AlrunError("its line")

    assert ranks.lead(World(), run) == "rows"
    assert told == []  # nobody to tell: the start state is not even computed
    with pytest.raises(AlrunError, match="its line"):
        ranks.lead(World(), refused)
    ranks.check_agreement(["a", "b"], 0)  # one process always agrees with itself


def test_rank_0_reports_its_own_error_when_the_others_have_left(monkeypatch):
    """Every rank refused the same config (e.g. SyncBN on CPU ranks) and the others already
    left: telling them fails, and rank 0 still ends with its own line."""

    def gone(obj):
        raise RuntimeError("Connection closed by peer")

    def refused(announce):
        raise AlrunError("its line")

    monkeypatch.setattr(ranks.distributed, "broadcast", gone)
    with pytest.raises(AlrunError, match="its line"):
        ranks.lead(World(0, 2), refused)


def _rank(rank: int, port: int, fail: bool, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank, 2)
    try:
        if world.leader:

            def run(announce):
                if fail:
                    raise AlrunError("run_dir: not an alrun run directory")
                announce(lambda: {"round": 3})
                ranks.check_agreement(["a", "b"], 3)
                return "led"

            try:
                out.put((rank, ranks.lead(world, run)))
            except AlrunError as err:
                out.put((rank, f"raised: {err}"))
        else:
            try:
                out.put((rank, ranks.await_start()))
                ranks.check_agreement(["a", "c"], 3)
            except (AlrunError, RuntimeError) as err:
                out.put((rank, f"raised: {err}"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(fail: bool) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, fail, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=120) for _ in range(len(procs) + (0 if fail else 1))]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    found: dict = {}
    for rank, value in results:
        found.setdefault(rank, []).append(value)
    return found


@pytest.mark.integration
def test_the_other_rank_gets_the_start_state_or_rank_0s_line():
    ok = _two_ranks(fail=False)
    assert ok[0] == ["led"]
    assert ok[1][0] == {"round": 3}  # rank 0's start state, computed once
    assert ok[1][1] == "raised: distributed: round 3: this rank selected other images than rank 0"
    failed = _two_ranks(fail=True)
    assert failed == {
        0: ["raised: run_dir: not an alrun run directory"],
        1: ["raised: run_dir: not an alrun run directory"],
    }
