"""Training on several devices and nodes: launcher detection, the process group, the
per-device share of each batch and the gather of sharded pool predictions.

A distributed run is N identical alrun processes (``trainer.devices`` per node x
``trainer.nodes``), started by ``torchrun`` or by SLURM (``srun``, submitit's launcher); alrun
never spawns them itself. Every process runs the whole loop on the same data and the same seeds:
training is :class:`~torch.nn.parallel.DistributedDataParallel` over each device's share of the
global batch, pool prediction is split across ranks and gathered by image id, so every rank
scores and selects from the same predictions. Only rank 0 writes the run directory
(:mod:`alrun.ranks`).

Every backend trains through alrun's engine (:mod:`alrun.engine`), so this serves the
torchvision and the MMDetection models alike; mmengine's distributed ``Runner`` is not used, as
it would replace alrun's loop. Training hooks that collect something per step take every rank's
share (:func:`concat_over_ranks`, :func:`sum_over_ranks`).
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from alrun.errors import AlrunError

log = logging.getLogger("alrun")

T = TypeVar("T")

#: how to start a distributed run, for the error messages
LAUNCH_HINT = (
    "start it with `torchrun --nproc-per-node=<devices> --nnodes=<nodes> -m alrun.cli ...` or "
    "with SLURM (srun, or hydra/launcher=slurm with hydra.launcher.tasks_per_node=<devices>)"
)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a job, as its launcher told it through the environment."""

    launcher: str  # "torchrun" or "slurm"
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def detect_launch(env: Mapping[str, str]) -> Launch | None:
    """The launcher's variables in ``env``, or None outside a multi-process job.

    torchrun (and any ``env://`` launcher) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT``; they win when present (torchrun inside srun). SLURM
    (``srun``, submitit) sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node
    list: the first node is the rendezvous host, the port is drawn from the job id (as submitit's
    ``TorchDistributedEnvironment`` does) unless ``MASTER_PORT`` is set. A one-task SLURM job
    (a plain sweep job) is not a distributed launch.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(
            "torchrun",
            _int(env, "RANK"),
            _int(env, "LOCAL_RANK", env.get("RANK", "0")),
            _int(env, "WORLD_SIZE"),
            env.get("MASTER_ADDR", "127.0.0.1"),
            _int(env, "MASTER_PORT", "29500"),
        )
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", "1") > 1:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job = _int(env, "SLURM_JOB_ID", "0")
        port = env.get("MASTER_PORT") or str(random.Random(job).randint(20000, 60000))
        return Launch(
            "slurm",
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_LOCALID", "0"),
            _int(env, "SLURM_NTASKS"),
            env.get("MASTER_ADDR") or first_host(nodes),
            int(port),
        )
    return None


def is_follower(env: Mapping[str, str]) -> bool:
    """Whether the launcher made this process a rank > 0 (which writes no file of the run; a
    malformed variable is reported when the run joins its process group)."""
    try:
        launch = detect_launch(env)
    except AlrunError:
        return False
    return launch is not None and launch.rank > 0


def _int(env: Mapping[str, str], key: str, default: str | None = None) -> int:
    value = env.get(key, default)
    try:
        return int(str(value))
    except ValueError:
        raise AlrunError(f"{key}: expected an integer from the launcher, got {value!r}") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise AlrunError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def devices_present(device: torch.device) -> tuple[int, str]:
    """How many processes of one node can train on ``device``'s kind, and what they are."""
    if device.type == "cuda":
        return torch.cuda.device_count(), "CUDA devices"
    return len(os.sched_getaffinity(0)), "CPU cores"


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` training processes (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0


def check_request(
    devices: int,
    nodes: int,
    device: torch.device,
    env: Mapping[str, str],
) -> Launch | None:
    """Refuse an impossible ``trainer.devices``/``trainer.nodes`` in one line, before anything
    is read or written; returns the launch to join (None: one process)."""
    wanted = devices * nodes
    launch = detect_launch(env)
    if wanted == 1:
        if launch is not None and launch.world_size > 1:
            raise AlrunError(
                f"trainer.devices: the {launch.launcher} launcher started {launch.world_size} "
                "processes but trainer.devices x trainer.nodes = 1; pass "
                f"trainer.devices={launch.world_size} (one node) or start one process"
            )
        return None
    present, kind = devices_present(device)
    if devices > present:
        raise AlrunError(
            f"trainer.devices: {devices} asked but this node has {present} {kind} "
            f"(detector.device={device.type}); pass trainer.devices<={present}"
        )
    if launch is None:
        raise AlrunError(
            f"trainer.devices: {devices} x {nodes} nodes needs a distributed launcher (no "
            f"RANK/WORLD_SIZE or multi-task SLURM_PROCID in the environment); {LAUNCH_HINT}"
        )
    if launch.world_size != wanted:
        raise AlrunError(
            f"trainer.devices: trainer.devices x trainer.nodes = {devices} x {nodes} = {wanted} "
            f"but the {launch.launcher} launcher started {launch.world_size} processes"
        )
    return launch


def join(launch: Launch | None, device: torch.device) -> World:
    """Join the launcher's process group (``env://`` rendezvous; gloo on CPU, nccl on CUDA)."""
    if launch is None:
        return World()
    if dist.is_initialized():  # a second run in the same processes (tests, sweeps)
        return World(dist.get_rank(), dist.get_world_size(), launch.local_rank)
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(
        backend, init_method="env://", rank=launch.rank, world_size=launch.world_size
    )
    log.info("distributed: rank %d of %d (%s)", launch.rank, launch.world_size, backend)
    return World(launch.rank, launch.world_size, launch.local_rank)


def leave(world: World) -> None:
    """Leave the process group (nothing for one process)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def current() -> World:
    """This process's place in the running process group (one process when there is none)."""
    if not dist.is_available() or not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    if current().size > 1:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (the object itself for one process)."""
    if current().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of every rank's ``values`` (float64; all ranks get the result)."""
    if current().size == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def concat_over_ranks(items: Sequence[T], device: torch.device | str | None = None) -> list[T]:
    """Every rank's ``items`` (picklable), concatenated in rank order, on every rank. For what
    a training hook collects during a step: rank r computes micro-batches ``r * accumulate``
    onwards (:func:`rank_micro_batches`), so rank order is one process's micro-batch order.

    Tensors inside ``items`` (also in tuples, lists and dicts) travel as CPU tensors and come
    back on ``device`` (default: the CPU): a pickled CUDA tensor would unpickle onto the
    sending rank's GPU. One process gets its own ``items`` back untouched."""
    if current().size == 1:
        return list(items)
    gathered: list[Any] = [None] * current().size
    dist.all_gather_object(gathered, [_tensors_to(item, "cpu") for item in items])
    every = [item for part in gathered for item in part]
    return every if device is None else [_tensors_to(item, device) for item in every]


class StepNotes:
    """What a training hook notes on each micro-batch of a step, read back once the step is
    done as every rank's notes in one process's micro-batch order (:func:`concat_over_ranks`).
    On several devices a hook sees only its own rank's micro-batches, but what it learns from a
    step (a summary, PPAL's class quality, a head's training images) must cover every rank's."""

    def __init__(self) -> None:
        self._items: list[Any] = []

    def note(self, item: Any) -> None:
        self._items.append(item)

    def clear(self) -> None:
        self._items = []

    def drain(self, device: torch.device | str | None = None) -> list[Any]:
        """The step's notes of every rank (tensors on ``device``, see :func:`concat_over_ranks`);
        called by every rank in ``after_step``. Empties this rank's notes."""
        items, self._items = self._items, []
        return concat_over_ranks(items, device)


def _tensors_to(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (through tuples, lists and dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_tensors_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_tensors_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _tensors_to(v, device) for k, v in obj.items()}
    return obj


# --- the per-device share of a batch -------------------------------------------------------
def micro_batches(batch: Sequence[T], parts: int) -> list[list[T]]:
    """``batch`` dealt into ``parts`` micro-batches, ``batch[m::parts]`` for micro-batch m.

    A batch smaller than ``parts`` (the end of an epoch) is first padded by repeating its own
    items from the start, as torch's ``DistributedSampler`` pads, so every device gets at least
    one image and all devices step together.
    """
    items = list(batch)
    if not items:
        raise AlrunError("trainer: an empty batch cannot be split across devices")
    while len(items) < parts:
        items += items[: parts - len(items)]
    return [items[m::parts] for m in range(parts)]


def rank_micro_batches(batch: Sequence[T], world: World, accumulate: int) -> list[list[T]]:
    """This rank's ``accumulate`` micro-batches of a global batch: micro-batch
    ``rank * accumulate + j`` of ``world.size * accumulate``. One process with
    ``accumulate=N`` therefore computes exactly the micro-batches of N processes."""
    parts = micro_batches(batch, world.size * accumulate)
    return parts[world.rank * accumulate : (world.rank + 1) * accumulate]


# --- sharded prediction --------------------------------------------------------------------
def shard(items: Sequence[T], world: World, block: int = 1) -> list[T]:
    """Rank ``r``'s share of ``items``: blocks of ``block`` consecutive items, dealt round-robin
    (block ``b`` to rank ``b % size``). With ``block`` the detector's prediction batch, every
    image is predicted in the same batch as by one process (convolutions give bit-different
    results for other batch compositions)."""
    blocks = [items[i : i + block] for i in range(0, len(items), block)]
    return [item for part in blocks[world.rank :: world.size] for item in part]


def gather_by_id(ids: Sequence[str], local_ids: Sequence[str], local: Sequence[Any]) -> list[Any]:
    """Every rank's ``(id, result)`` pairs gathered and put back in the order of ``ids``."""
    pairs = list(zip(local_ids, local, strict=True))
    if current().size > 1:
        gathered: list[Any] = [None] * current().size
        dist.all_gather_object(gathered, pairs)
        pairs = [pair for part in gathered for pair in part]
    by_id = dict(pairs)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RuntimeError(f"distributed: no prediction gathered for {len(missing)} images")
    return [by_id[i] for i in ids]


def predict_sharded(
    predict: Callable[..., list[T]], records: Sequence[Any], block: int, *args
) -> list[T]:
    """``predict(records, *args)``, each rank predicting its :func:`shard` (blocks of
    ``block``, the detector's prediction batch) and every rank receiving all results in the
    order of ``records``, gathered by ``image_id``.

    Every image goes through the same model in the same batch as in one process, so
    deterministic predictions equal one process's bit for bit; stochastic passes seeded from
    the images of a call (MC dropout) see other calls and differ. The streaming acquisition's
    shard loop can call this per shard.
    """
    world = current()
    if world.size == 1:
        return predict(records, *args)
    mine = shard(records, world, block)
    results = predict(mine, *args) if mine else []
    local = [_to_cpu(result) for result in results]
    return gather_by_id([r.image_id for r in records], [r.image_id for r in mine], local)


def _to_cpu(obj: Any) -> Any:
    """Move a result's tensors to the CPU before pickling them to other ranks."""
    to = getattr(obj, "to", None)
    return to("cpu") if callable(to) and not isinstance(obj, torch.Tensor) else obj
