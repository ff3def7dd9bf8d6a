"""One optimisation loop for every detector backend and every supervision regime.

A round's training is: apply the ``trainer.init`` policy (:func:`train_round`), then run
``schedule``'s iterations (:func:`train`). Every iteration draws one batch from each
:class:`BatchSource`, asks the backend for its losses on the sources that carry targets, adds what
each :class:`TrainingHook` contributes, and takes one SGD step (warmup then cosine or step
learning rate, gradient-norm clipping). The backend only has to expose the training pieces of the
:class:`~alrun.detectors.base.Detector` protocol: ``device``, ``train_mode()``, ``parameters()``
and ``losses(images, targets)``.

Determinism: the global torch seed is ``seed`` and the first source's batches are drawn from a
generator seeded with ``seed`` (so one labelled source trains exactly as ``fit`` always did);
further sources draw from generators seeded by ``(seed, source position)``.

Several devices (``trainer.devices`` x ``trainer.nodes``, :mod:`alrun.distributed`): the batch
plan is the same on every rank and each rank draws its share of every batch
(``trainer.accumulate`` micro-batches of ``batch[m::devices x accumulate]``); the step's losses
are computed through a DistributedDataParallel replica of the trained parameters, which averages
the gradients, and after training every rank takes rank 0's weights and buffers. With several
micro-batches a step, each draws its random numbers from a seed of its own (seed, step,
micro-batch), so N ranks draw what one process with ``accumulate=N`` draws.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

import alrun.distributed as distributed
from alrun.data.dataset import DetectionDataset, ImageRecord, ImageSet
from alrun.data.images import TrainingImages
from alrun.detectors.base import MIXTURE_HEAD, Detector, Progress, TrainSchedule
from alrun.detectors.passes import Ensemble, member_seed
from alrun.errors import AlrunError

log = logging.getLogger("alrun")

#: what a source's targets are: oracle labels, pseudo-labels (loss scaled by ``weight``), none
SOURCE_ROLES = ("labelled", "pseudo", "unlabelled")


class TrainingHookError(AlrunError):
    """A training hook raised; the round is abandoned (the loop discards its directory)."""


@dataclass(frozen=True)
class BatchSource:
    """Images the engine draws one batch from every iteration.

    ``role``: ``labelled`` (boxes from the oracle), ``pseudo`` (boxes a regime made, e.g. from
    clicks or teacher predictions; its losses are multiplied by ``weight``) or ``unlabelled``
    (references without boxes, :class:`ImageSet`; no targets: hooks use the images, e.g. for
    consistency or domain alignment). ``batch_size`` defaults to ``trainer.batch_size``.
    """

    name: str
    dataset: DetectionDataset | ImageSet
    role: str = "labelled"
    weight: float = 1.0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.role not in SOURCE_ROLES:
            raise AlrunError(f"trainer: source '{self.name}' role must be one of {SOURCE_ROLES}")
        if self.weight < 0:
            raise AlrunError(f"trainer: source '{self.name}' weight must be >= 0")
        if self.role != "unlabelled" and not isinstance(self.dataset, DetectionDataset):
            raise AlrunError(
                f"trainer: source '{self.name}' ({self.role}) needs images with boxes "
                f"(a DetectionDataset), got {type(self.dataset).__name__}"
            )


@dataclass(frozen=True)
class Batch:
    """One source's batch of one iteration, on the detector's device."""

    source: BatchSource
    images: list[Tensor]
    targets: list[dict[str, Tensor]] | None  # None for unlabelled sources
    image_ids: tuple[str, ...]
    flipped: tuple[bool, ...]


@dataclass
class Step:
    """What hooks see at one iteration. ``losses`` holds the backend's losses (the first source's
    under their own names, others prefixed ``<source>/``) before hooks add theirs."""

    index: int
    total: int
    lr: float
    detector: Detector
    batches: Mapping[str, Batch]
    losses: dict[str, Tensor] = field(default_factory=dict)


class TrainingHook:
    """Base class for per-round training extensions; override what you need.

    ``before_training`` may build modules (it runs before the optimiser is made);
    ``parameters`` are optimised with the detector's (e.g. a domain classifier, a loss-prediction
    head); ``extra_losses`` returns named loss tensors added to the step's total (e.g.
    consistency, domain-adversarial); ``after_step`` acts after the optimiser step (an EMA teacher);
    ``after_training`` returns summary numbers recorded in the round's metrics.json.
    An exception in any of them abandons the round with a one-line :class:`TrainingHookError`.
    """

    name = "hook"
    #: capability names (``alrun.detectors.base``) the hook needs of the detector
    requires: tuple[str, ...] = ()
    #: the hook reads a batch of the unlabelled pool every iteration (``step.batches``
    #: [:data:`STRATEGY_UNLABELLED`]): the loop adds that source through ``StrategyTraining``
    draws_unlabelled: bool = False

    def before_training(self, detector: Detector, total: int) -> None:
        pass

    def parameters(self) -> Sequence[Tensor]:
        return ()

    def extra_losses(self, step: Step) -> Mapping[str, Tensor]:
        return {}

    def after_step(self, step: Step) -> None:
        pass

    def after_training(self) -> Mapping[str, float]:
        return {}


@dataclass(frozen=True)
class StrategyTraining:
    """What the strategy trains with the detector every round, handed by the loop to the
    regime and by the regime to :func:`train_round`: the hooks of learned scorers (their heads
    train on the run's detector, never on an ensemble member) and the ensemble's members."""

    hooks: tuple[TrainingHook, ...] = ()
    ensemble: Ensemble | None = None
    #: batch sources drawn beside the regime's for the strategy's hooks (MI-AOD: the
    #: unlabelled pool, images only); the ensemble's members never see them
    sources: tuple[BatchSource, ...] = ()

    @property
    def draws_unlabelled(self) -> bool:
        return any(hook.draws_unlabelled for hook in self.hooks)


#: the name of the unlabelled pool source a strategy's hooks draw (``draws_unlabelled``)
STRATEGY_UNLABELLED = "strategy_unlabelled"

#: a strategy that trains nothing beside the detector
NO_STRATEGY_TRAINING = StrategyTraining()


def starts_from_scratch(schedule: TrainSchedule, round_index: int) -> bool:
    """The ``trainer.init`` policy: ``scratch`` re-initialises every round, ``continue`` only in
    round 0 (later rounds fine-tune the previous round's weights)."""
    return schedule.init == "scratch" or round_index == 0


def train_round(
    detector: Detector,
    sources: Sequence[BatchSource],
    schedule: TrainSchedule,
    seed: int,
    round_index: int,
    hooks: Sequence[TrainingHook] = (),
    progress: Progress | None = None,
    strategy: StrategyTraining = NO_STRATEGY_TRAINING,
) -> dict[str, float]:
    """Apply the ``trainer.init`` policy (reset from ``seed``), then :func:`train` with the
    regime's ``hooks`` and the ``strategy``'s; then train an independent ensemble's members."""
    from_scratch = starts_from_scratch(schedule, round_index)
    if from_scratch:
        detector.reset(seed)
    return train_with_strategy(
        detector, sources, schedule, seed, round_index, hooks, progress, strategy
    )


def train_with_strategy(
    detector: Detector,
    sources: Sequence[BatchSource],
    schedule: TrainSchedule,
    seed: int,
    round_index: int,
    hooks: Sequence[TrainingHook] = (),
    progress: Progress | None = None,
    strategy: StrategyTraining = NO_STRATEGY_TRAINING,
) -> dict[str, float]:
    """:func:`train` with the ``strategy``'s hooks and snapshot members, then an independent
    ensemble's members (for regimes that apply ``trainer.init`` themselves)."""
    from_scratch = starts_from_scratch(schedule, round_index)
    hooks = [*hooks, *strategy.hooks]
    ensemble = strategy.ensemble
    if ensemble is not None and ensemble.kind == "snapshot":
        hooks.append(SnapshotHook(ensemble))
    drawn = [*sources, *strategy.sources]
    stats = train(detector, drawn, schedule, seed, from_scratch, hooks, progress)
    if ensemble is not None and ensemble.kind == "independent":
        stats.update(train_members(ensemble.members, sources, schedule, seed, round_index))
    return stats


def train(
    detector: Detector,
    sources: Sequence[BatchSource],
    schedule: TrainSchedule,
    seed: int,
    from_scratch: bool = False,
    hooks: Sequence[TrainingHook] = (),
    progress: Progress | None = None,
) -> dict[str, float]:
    """Run one round's iterations; returns ``iterations``, ``first_loss`` / ``final_loss`` (mean
    of the first / last tenth), ``from_scratch``
    and each hook's ``after_training`` numbers as ``<hook>/<name>``.

    The number of iterations follows the first source (``schedule.num_iterations``).
    """
    if not sources or len(sources[0].dataset) == 0:
        raise AlrunError("trainer: no labelled images to train on")
    for source in sources[1:]:
        if len(source.dataset) == 0:
            raise AlrunError(f"trainer: batch source '{source.name}' has no images")
    if len({s.name for s in sources}) != len(sources):
        raise AlrunError("trainer: batch source names must be unique")
    total = schedule.num_iterations(len(sources[0].dataset), from_scratch)
    world = distributed.current()
    torch.manual_seed(seed)
    streams = [
        _stream(source, schedule, total, _source_seed(seed, i), detector.device, world)
        for i, source in enumerate(sources)
    ]
    detector.train_mode()
    for hook in hooks:
        _call(hook, "before_training", -1, total, detector, total)
    main, auxiliary = _parameter_groups(detector, hooks, total)
    params = main + auxiliary
    replica = _replicate(params, detector.device, world, heads_may_sit_out=bool(auxiliary))
    optimizer = torch.optim.SGD(
        params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )
    lr_at = learning_rate(schedule, total)
    losses: list[float] = []
    parts = schedule.accumulate
    for index, drawn in enumerate(zip(*streams)):
        lr = lr_at(index)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        value = 0.0
        for j, micro in enumerate(zip(*drawn)):  # this device's micro-batches of the step
            step = Step(index, total, lr, detector, {b.source.name: b for b in micro})
            with (
                _gradient_sync(replica, j == parts - 1),
                _micro_batch_rng(seed, index, world.rank * parts + j, world.size * parts, detector),
            ):
                loss = _step_loss(replica, detector, hooks, step, micro, schedule)
                (loss if parts == 1 else loss / parts).backward()  # DDP averages over devices
            value += float(loss.detach()) / parts
        if schedule.grad_clip > 0:  # per group: an auxiliary head never scales the detector's
            torch.nn.utils.clip_grad_norm_(main, schedule.grad_clip)
            if auxiliary:
                torch.nn.utils.clip_grad_norm_(auxiliary, schedule.grad_clip)
        optimizer.step()
        for hook in hooks:
            _call(hook, "after_step", index, total, step)
        losses.append(value)
        if progress:
            progress(index + 1, total)
    if world.size > 1:
        del replica  # its gradient hooks go with it, before the next round's replica
        losses = distributed.sum_over_ranks([v / world.size for v in losses])
        share_leader_state(detector, world)
    tail = losses[-max(1, len(losses) // 10) :]
    head = losses[: max(1, len(losses) // 10)]
    stats = {
        "iterations": float(total),
        "first_loss": sum(head) / len(head),  # mean of the first tenth (alrun.diagnostics)
        "final_loss": sum(tail) / len(tail),
        "from_scratch": float(from_scratch),
    }
    for hook in hooks:
        summary = _call(hook, "after_training", total, total)
        stats.update({f"{hook.name}/{key}": float(value) for key, value in summary.items()})
    return stats


def _step_loss(
    replica: torch.nn.Module | None,
    detector: Detector,
    hooks: Sequence[TrainingHook],
    step: Step,
    drawn: Sequence[Batch],
    schedule: TrainSchedule,
) -> Tensor:
    """One micro-batch's total loss: the backend's and the hooks' (through the DDP replica, so
    that its backward averages the gradients over devices)."""

    def compute() -> dict[str, Tensor]:
        step.losses.update(_backend_losses(detector, drawn))
        step.losses.update(_hook_losses(hooks, step))
        return step.losses

    named = compute() if replica is None else replica(compute)
    loss = sum(named.values())
    if not isinstance(loss, Tensor):
        raise AlrunError("trainer: no loss this iteration (no source with targets, no hook)")
    if not torch.isfinite(loss):
        raise AlrunError(
            f"trainer: loss became {loss.item()} at iteration {step.index}; "
            f"lower trainer.lr (now {schedule.lr})"
        )
    return loss


class _Replica(torch.nn.Module):
    """The trained parameters as one module, for DistributedDataParallel: its forward runs the
    step's loss computation, so any backend and any hook's head is averaged over devices."""

    def __init__(self, params: Sequence[Tensor]):
        super().__init__()
        if not all(isinstance(p, torch.nn.Parameter) for p in params):
            raise AlrunError("trainer.devices: every trained tensor must be an nn.Parameter")
        self.params = torch.nn.ParameterList(params)

    def forward(self, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        return compute()


def _replicate(
    params: Sequence[Tensor],
    device: torch.device,
    world: distributed.World,
    heads_may_sit_out: bool = False,
) -> torch.nn.Module | None:
    """A DistributedDataParallel replica of ``params`` (None for one process). Its constructor
    copies rank 0's values to every rank; buffers (BatchNorm statistics) are rank-local while
    training and rank 0's afterwards (:func:`share_leader_state`).

    ``heads_may_sit_out``: a hook's head can have no loss on a micro-batch (loss prediction's
    ranking needs 2 images; an epoch's last batch can leave one per device), which plain DDP
    refuses on the next step. DDP then looks for unused parameters: one unused on every rank
    keeps no gradient, as in one process, so the optimizer skips it there too."""
    if world.size == 1:
        return None
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.nn.parallel.DistributedDataParallel(
        _Replica(params),
        device_ids=ids,
        broadcast_buffers=False,
        find_unused_parameters=heads_may_sit_out,
    )


def _gradient_sync(replica: torch.nn.Module | None, sync: bool):
    """DDP's ``no_sync`` for all but a device's last micro-batch of a step."""
    if replica is None or sync:
        return contextlib.nullcontext()
    return replica.no_sync()


def _micro_batch_rng(
    seed: int, index: int, micro: int, parts: int, detector: Detector
) -> contextlib.AbstractContextManager:
    """Micro-batch ``micro`` of step ``index`` draws its random numbers (Faster R-CNN's box
    samplers, dropout masks, AL-MDN's noise) from a seed of its own, ``(seed, index, micro)``,
    when a step has ``parts`` > 1 micro-batches (``trainer.devices`` x ``trainer.nodes`` x
    ``trainer.accumulate``): rank r's micro-batch then draws what one process with
    ``accumulate=N`` draws for it (the same micro-batch index), not what the micro-batches
    before it left in the stream, which another rank never sees. The global stream is restored
    after each micro-batch, so it is the same on every rank after training. One micro-batch a
    step draws from the global stream (seeded with ``seed``), as always."""
    if parts == 1:
        return contextlib.nullcontext()
    return _seeded(_micro_seed(seed, index, micro), detector.device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global random streams (the CPU's and ``device``'s) seeded with ``seed`` inside,
    as they were outside."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def share_leader_state(detector: Detector, world: distributed.World) -> None:
    """Every rank takes rank 0's weights and buffers after training: the parameters already
    agree (same averaged gradients), BatchNorm statistics saw only each rank's images."""
    state = distributed.broadcast(detector.state_dict() if world.leader else None)
    if not world.leader:
        detector.load_state_dict(state)


def _parameter_groups(
    detector: Detector, hooks: Sequence[TrainingHook], total: int
) -> tuple[list[Tensor], list[Tensor]]:
    """(the detector's own trainable parameters, auxiliary ones): hooks' heads (learned
    scorers, UDA's domain classifier) and the detector's ``auxiliary_parameters()`` (AL-MDN's
    mixture head). The gradient-norm clip treats the groups separately, so a head trained
    beside the detector leaves the detector's updates exactly as without it."""
    extra = detector.auxiliary_parameters() if MIXTURE_HEAD in detector.capabilities else ()
    aux_ids = {id(p) for p in extra}
    own = [p for p in detector.parameters() if p.requires_grad]
    main = [p for p in own if id(p) not in aux_ids]
    auxiliary = [p for p in own if id(p) in aux_ids]
    for hook in hooks:
        auxiliary += [p for p in _call(hook, "parameters", -1, total) if p.requires_grad]
    return main, auxiliary


def _backend_losses(detector: Detector, drawn: Sequence[Batch]) -> dict[str, Tensor]:
    """The backend's losses on every source with targets: the first source's under their own
    names, the others' as ``<source>/<name>`` scaled by the source's weight."""
    losses: dict[str, Tensor] = {}
    for n, batch in enumerate(drawn):
        if batch.targets is None:
            continue
        weight = batch.source.weight
        for key, value in detector.losses(batch.images, batch.targets).items():
            name = key if n == 0 else f"{batch.source.name}/{key}"
            losses[name] = value if weight == 1.0 else value * weight
    return losses


def _hook_losses(hooks: Sequence[TrainingHook], step: Step) -> dict[str, Tensor]:
    """Every hook's extra losses as ``<hook>/<name>``; hooks all see the backend's losses only."""
    extra: dict[str, Tensor] = {}
    for hook in hooks:
        added = _call(hook, "extra_losses", step.index, step.total, step)
        extra.update({f"{hook.name}/{key}": value for key, value in added.items()})
    return extra


def _call(hook: TrainingHook, method: str, index: int, total: int, *args):
    """Run one hook method; any exception becomes a one-line error naming hook and iteration."""
    try:
        return getattr(hook, method)(*args)
    except Exception as err:  # noqa: BLE001 - reported as a user-facing one-liner
        log.debug("hook %s.%s failed", hook.name, method, exc_info=True)
        where = f"at iteration {index + 1} of {total}" if 0 <= index < total else f"in {method}"
        raise TrainingHookError(
            f"trainer: hook '{hook.name}' failed {where}: {type(err).__name__}: {err} "
            "(round discarded; hydra.verbose=alrun shows the traceback)"
        ) from err


def _source_seed(seed: int, position: int) -> int:
    if position == 0:
        return seed
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0] >> 1)


def _micro_seed(seed: int, index: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, index, micro]).generate_state(1)[0] >> 1)


def _collate(batch):
    return tuple(zip(*batch))


def _stream(
    source: BatchSource,
    schedule: TrainSchedule,
    total: int,
    seed: int,
    device: torch.device,
    world: distributed.World,
) -> Iterator[list[Batch]]:
    """``total`` steps of ``source`` in a seeded order (the same whatever ``num_workers``), each
    this device's ``trainer.accumulate`` micro-batches of the global batch."""
    records = source.dataset.images
    if source.role == "unlabelled":  # whatever it was given, train on the images only
        records = tuple(r.ref if isinstance(r, ImageRecord) else r for r in records)
    plan = batch_plan(
        len(records),
        source.batch_size or schedule.batch_size,
        total,
        torch.Generator().manual_seed(seed),
    )
    parts = schedule.accumulate
    if world.size * parts > 1:  # the distributed sampler: each rank's share of every batch
        plan = [m for batch in plan for m in distributed.rank_micro_batches(batch, world, parts)]
    loader = torch.utils.data.DataLoader(
        TrainingImages(records, 0, schedule.hflip),
        batch_sampler=plan,
        num_workers=schedule.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    batches = (
        Batch(
            source,
            [im.to(device) for im in images],
            None
            if source.role == "unlabelled"
            else [{k: v.to(device) for k, v in t.items()} for t in targets],
            tuple(records[i].image_id for i, _ in drawn),
            tuple(flip and schedule.hflip for _, flip in drawn),
        )
        for drawn, (images, targets) in zip(plan, loader)
    )
    for _ in range(total):
        yield [next(batches) for _ in range(parts)]


def batch_plan(
    num_images: int, batch_size: int, total: int, generator: torch.Generator
) -> list[list[tuple[int, bool]]]:
    """Exactly ``total`` batches of (image index, flip) drawn epoch by epoch from ``generator``.

    Drawn up front, so the order is the same whatever ``trainer.num_workers`` is. A batch size
    below 1 (or no image to draw from) would never fill the plan: an error, not a hang.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise AlrunError(f"trainer: batch size must be an integer >= 1, got {batch_size!r}")
    if total > 0 and num_images < 1:
        raise AlrunError("trainer: no images to draw batches from")
    batches: list[list[tuple[int, bool]]] = []
    while len(batches) < total:
        order = torch.randperm(num_images, generator=generator).tolist()
        flips = torch.rand(num_images, generator=generator).lt(0.5).tolist()
        for start in range(0, num_images, batch_size):
            if len(batches) == total:
                break
            batches.append([(i, flips[i]) for i in order[start : start + batch_size]])
    return batches


def learning_rate(schedule: TrainSchedule, total: int) -> Callable[[int], float]:
    """``trainer.lr_schedule``'s learning rate at each of ``total`` steps."""
    if schedule.lr_schedule == "step":
        return warmup_step(schedule, total)
    return warmup_cosine(schedule, total)


def _warmup_factor(schedule: TrainSchedule, step: int, warmup: int) -> float:
    """mmcv's linear warmup: from ``warmup_ratio`` at step 0 up to 1 at step ``warmup``."""
    if step >= warmup:
        return 1.0
    return schedule.warmup_ratio + (1 - schedule.warmup_ratio) * step / warmup


def warmup_cosine(schedule: TrainSchedule, total: int) -> Callable[[int], float]:
    """Learning rate at each step: linear warmup from ``warmup_ratio`` then cosine decay to
    ``min_lr_ratio``."""
    warmup = min(schedule.warmup_iters, max(total - 1, 0))

    def lr_at(step: int) -> float:
        if step < warmup:
            return schedule.lr * _warmup_factor(schedule, step, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        low = schedule.min_lr_ratio
        return schedule.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def step_milestones(schedule: TrainSchedule, total: int) -> list[int]:
    """``trainer.lr_steps`` as iteration indices of a ``total``-step round: a fraction ``f``
    becomes ``round(f * total)`` (so epoch 20 of 26 is ``20 / 26``), a whole number stays an
    index. An index at or past the round's end would never fire: one line naming the key."""
    milestones = [round(x * total) if x < 1 else int(x) for x in schedule.lr_steps]
    for given, at in zip(schedule.lr_steps, milestones):
        if given >= 1 and at >= total:
            raise AlrunError(
                f"trainer.lr_steps: milestone {at} is past this round's last iteration "
                f"({total} iterations); use a fraction in (0, 1) or a smaller index"
            )
    return milestones


def warmup_step(schedule: TrainSchedule, total: int) -> Callable[[int], float]:
    """mmcv's ``StepLrUpdaterHook`` with linear warmup: ``lr * gamma^(milestones passed)``,
    times the warmup factor during the first ``warmup_iters`` steps."""
    warmup = min(schedule.warmup_iters, max(total - 1, 0))
    milestones = step_milestones(schedule, total)

    def lr_at(step: int) -> float:
        passed = sum(step >= m for m in milestones)
        return schedule.lr * schedule.gamma**passed * _warmup_factor(schedule, step, warmup)

    return lr_at


# --- ensembles (strategies that compare K models: alrun.acquisition.multipass) --------------
def train_members(
    members: Sequence[Detector],
    sources: Sequence[BatchSource],
    schedule: TrainSchedule,
    seed: int,
    round_index: int,
) -> dict[str, float]:
    """Independent ensemble: each member trains like the main model, with its own seed (its own
    init under ``trainer.init``, its own batch order). Regime and strategy hooks (EMA teachers,
    extra losses, learned scorers' heads) belong to the main model and are not applied to
    members."""
    stats: dict[str, float] = {}
    for k, member in enumerate(members, start=1):
        result = train_round(member, sources, schedule, member_seed(seed, k), round_index)
        stats[f"member{k}/final_loss"] = result["final_loss"]
    return stats


class SnapshotHook(TrainingHook):
    """Snapshot ensemble: copies the weights into member k (of ``count`` extra members) after
    ``k / (count + 1)`` of the round's iterations; the final weights are member 0 itself."""

    name = "snapshot"

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble
        self.count = len(ensemble.members)
        self.taken: list[int] = []

    def after_step(self, step: Step) -> None:
        k = len(self.taken) + 1
        if k <= self.count and step.index + 1 >= round(step.total * k / (self.count + 1)):
            self.ensemble.snapshot(step.detector, k)
            self.taken.append(step.index + 1)

    def after_training(self) -> Mapping[str, float]:
        return {"members": float(len(self.taken))}
