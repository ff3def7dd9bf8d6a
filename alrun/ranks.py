"""The processes of one job: which rank leads, what rank 0 tells the others before the rounds,
the one line they end with when rank 0 fails first, and the check that every rank picked the
same images.

Every rank runs the same rounds (:mod:`alrun.loop`); only rank 0 reads the run directory,
so it tells the others how the run starts (the first round, the labels, the regime's state
and the model) in one broadcast, or that it failed. Collectives live in :mod:`alrun.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig

import alrun.distributed as distributed
from alrun.detectors.torchvision.adapter import resolve_device
from alrun.errors import AlrunError

T = TypeVar("T")

#: what rank 0 calls once it knows how the run starts: a function computing that state
Announce = Callable[[Callable[[], Any]], None]


def join_world(cfg: DictConfig, env: Mapping[str, str] | None = None) -> distributed.World:
    """Check ``trainer.devices``/``trainer.nodes`` against the devices and the launcher (one line
    each, before anything is read or written) and join the launcher's process group."""
    trainer = cfg.get("trainer") or {}
    counts = {key: trainer.get(key, 1) for key in ("devices", "nodes")}
    for key, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AlrunError(f"trainer.{key}: expected an integer >= 1, got {value!r}")
    oracle = str((cfg.get("oracle") or {}).get("_target_", ""))
    if counts["devices"] * counts["nodes"] > 1 and oracle.endswith("HumanOracle"):
        raise AlrunError(
            "trainer.devices: oracle=human pauses the run between rounds for annotators, which "
            "a job of several processes cannot; run it with trainer.devices=1 trainer.nodes=1"
        )
    detector = cfg.get("detector") or {}
    device = resolve_device(str(detector.get("device", "auto")))
    launch = distributed.check_request(
        counts["devices"],
        counts["nodes"],
        device,
        os.environ if env is None else env,
    )
    return distributed.join(launch, device)


def lead(world: distributed.World, run: Callable[[Announce], T]) -> T:
    """Rank 0 (or the only process) runs ``run(announce)``; ``announce`` hands the other ranks
    how the run starts. If ``run`` fails before announcing, they end with its one line."""
    told: list[bool] = []

    def announce(start_state: Callable[[], Any]) -> None:
        if world.size > 1:
            distributed.broadcast(("ok", start_state()))
        told.append(True)

    try:
        return run(announce)
    except BaseException as err:
        if not told:
            tell_followers(world, err)
        raise


def tell_followers(world: distributed.World, err: BaseException) -> None:
    """Rank 0 failed before the rounds: the other ranks end with the same line."""
    if world.size > 1:
        message = str(err) if isinstance(err, AlrunError) else None
        try:
            distributed.broadcast(("failed", message))
        except RuntimeError:  # they failed too (the same config error) and left: rank 0's
            pass  # own error is the one to report, not the lost connection


def await_start() -> Any:
    """A rank > 0: what rank 0 announced, or rank 0's one line if it failed first."""
    status, start_state = distributed.broadcast(None)
    if status != "ok":
        raise AlrunError(start_state or "distributed: rank 0 failed before round 0; see its log")
    return start_state


def check_agreement(picked: Sequence[str], r: int) -> None:
    """Every rank scored the same gathered predictions; a rank that picked other images than
    rank 0 would label another pool from here on: stop instead."""
    if distributed.current().size > 1 and distributed.broadcast(list(picked)) != list(picked):
        raise RuntimeError(f"distributed: round {r}: this rank selected other images than rank 0")
