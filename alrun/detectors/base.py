"""The detector protocol every backend implements (torchvision; mmdet as an optional adapter)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from alrun.data.dataset import ImageRef
from alrun.errors import AlrunError
from alrun.params import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
)
from alrun.types import Detections, Needs

#: ``progress(done, total)`` callback used by fit/predict to report progress.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainSchedule:
    """How long and how hard one round trains. ``iterations`` wins over ``epochs`` when > 0.

    ``first_iterations`` lets training from random init (round 0, or every round with
    ``init: scratch``) run longer than rounds that continue from the last weights.

    ``batch_size`` is the global batch of one step: with ``devices`` x ``nodes`` processes and
    ``accumulate`` micro-batches each, every micro-batch holds ``batch_size / (devices x nodes x
    accumulate)`` images and the gradients are averaged, so ``lr`` needs no scaling
    (:mod:`alrun.distributed`, docs/clusters.md).

    Learning rate: linear warmup from ``warmup_ratio`` x ``lr`` over ``warmup_iters`` (mmcv's
    ``warmup='linear'``), then ``lr_schedule``: ``cosine`` decays to ``min_lr_ratio`` x ``lr``;
    ``step`` multiplies by ``gamma`` at each of ``lr_steps`` (mmcv's ``policy='step'``): a
    milestone in (0, 1) is a fraction of the round's iterations, a whole number >= 1 an
    iteration index (:func:`alrun.engine.step_milestones`).
    """

    epochs: NonNegativeInt = 0
    iterations: NonNegativeInt = 300
    first_iterations: PositiveInt | None = None
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 0.01
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9
    weight_decay: NonNegativeFloat = 1e-4
    grad_clip: NonNegativeFloat = 10.0  # 0: no clipping
    warmup_iters: NonNegativeInt = 50
    min_lr_ratio: Fraction = 0.05
    lr_schedule: Literal["cosine", "step"] = "cosine"
    lr_steps: Sequence[PositiveFloat] = ()
    gamma: Annotated[float, Range(0, 1, low_open=True)] = 0.1
    warmup_ratio: Fraction = 0.1
    hflip: bool = True
    num_workers: NonNegativeInt = 0  # image-decoding worker processes (GPU users: 4-8)
    init: Literal["scratch", "continue"] = "continue"
    #: training processes per node and nodes (alrun.distributed); ``batch_size`` is the global
    #: batch of one SGD step, dealt across them, so ``lr`` stays as it is
    devices: PositiveInt = 1
    nodes: PositiveInt = 1
    #: micro-batches per device and step, gradients averaged (one process with accumulate=N
    #: computes what N devices do)
    accumulate: PositiveInt = 1

    def __post_init__(self) -> None:
        if self.init not in ("scratch", "continue"):
            raise AlrunError(f"trainer.init: expected 'scratch' or 'continue', got '{self.init}'")
        if self.iterations <= 0 and self.epochs <= 0:
            raise AlrunError("trainer: set trainer.iterations or trainer.epochs to a value > 0")
        if self.num_workers < 0:
            raise AlrunError(f"trainer.num_workers: expected >= 0, got {self.num_workers}")
        if self.batch_size <= 0:
            raise AlrunError(f"trainer.batch_size: expected > 0, got {self.batch_size}")
        _check_ranges(self)
        _check_steps(self)
        parts = self.devices * self.nodes * self.accumulate
        if self.batch_size < parts:
            raise AlrunError(
                f"trainer.batch_size: {self.batch_size} is the global batch of one step and must "
                f"give every micro-batch an image: >= trainer.devices x trainer.nodes x "
                f"trainer.accumulate = {parts}"
            )

    def num_iterations(self, num_images: int, from_scratch: bool) -> int:
        if self.iterations > 0:
            if from_scratch and self.first_iterations:
                return self.first_iterations
            return self.iterations
        return self.epochs * max(1, -(-num_images // self.batch_size))


def _check_ranges(schedule: TrainSchedule) -> None:
    """Numbers a negative or out-of-range value of would silently train nonsense."""
    checks = (
        ("lr", schedule.lr > 0, "> 0"),
        ("epochs", schedule.epochs >= 0, ">= 0"),
        ("iterations", schedule.iterations >= 0, ">= 0"),
        (
            "first_iterations",
            schedule.first_iterations is None or schedule.first_iterations > 0,
            "> 0 or null",
        ),
        ("momentum", 0 <= schedule.momentum < 1, "in [0, 1)"),
        ("weight_decay", schedule.weight_decay >= 0, ">= 0"),
        ("grad_clip", schedule.grad_clip >= 0, ">= 0 (0: no clipping)"),
        ("warmup_iters", schedule.warmup_iters >= 0, ">= 0"),
        ("min_lr_ratio", 0 <= schedule.min_lr_ratio <= 1, "in [0, 1]"),
    )
    for key, ok, expected in checks:
        if not ok:
            raise AlrunError(f"trainer.{key}: expected {expected}, got {getattr(schedule, key)}")


# --- optional capabilities -----------------------------------------------------------------
# A detector declares what it can do beyond the protocol as a frozenset of these names
# (``capabilities``); strategies and regimes declare the names they require (``requires``),
# and ``alrun.detectors.capabilities.check_capabilities`` compares the two at start-up, before
# any data is read.
# Names rather than ``runtime_checkable`` protocols alone: a protocol check sees only that a
# method exists, not whether this model has the part (one torchvision class holds one- and
# two-stage models), it cannot be asked of a config without building the model (the matrix in
# docs/reference/capabilities.md is made that way, mmdet included), and a name is what the
# one-line refusal prints. The protocols below say which members each name promises.
MC_DROPOUT = "mc_dropout"
MIXTURE_HEAD = "mixture_head"
PROPOSALS = "proposals"
BOX_FEATURES = "box_features"
EMBEDDINGS = "embeddings"
FEATURE_MAPS = "feature_maps"
FPN_FEATURES = "fpn_features"
TEACHER = "teacher"
FLIP_VIEWS = "flip_views"
IMAGE_VIEWS = "image_views"
REBUILD = "rebuild"
GRADIENTS = "gradients"
ANCHOR_QUALITY = "anchor_quality"
HEAD_FEATURES = "head_features"
DENSE_HEAD = "dense_head"

#: every capability name, with what it means (docs/reference/capabilities.md prints these)
CAPABILITIES: dict[str, str] = {
    MC_DROPOUT: "MC-dropout passes through the last layers of the heads "
    "(`MCDropout.enable_mc_dropout`)",
    MIXTURE_HEAD: "an AL-MDN mixture-density head beside a dense head, trained with it "
    "(`MixtureHead.add_mixture_head`, `auxiliary_parameters`)",
    PROPOSALS: "the region proposal each box was regressed from (two-stage models)",
    BOX_FEATURES: "a fixed-size feature vector per box (`Detections.feats`)",
    EMBEDDINGS: "an image embedding (`Detections.embedding`)",
    FEATURE_MAPS: "feature maps with gradients in training (`FeatureMaps.features`)",
    FPN_FEATURES: "feature maps all of one width (an FPN), for one classifier across levels "
    "(`FPNFeatures.feature_width`)",
    TEACHER: "a torch module (`TeacherSource.teacher_module`) whose forward gives post-processed "
    "boxes of training batches, to copy as a frozen or EMA teacher",
    FLIP_VIEWS: "head outputs on horizontally flipped feature maps (flip consistency; "
    "`FlipViews` or the torchvision heads)",
    IMAGE_VIEWS: "predictions on transformed image tensors (test-time views)",
    REBUILD: "the same architecture built again for another class list (synthetic pre-training)",
    GRADIENTS: "per-box gradient embeddings",
    ANCHOR_QUALITY: "per positive anchor of each training batch, its class, class probability "
    "and the IoU of its predicted box with its assigned box (`AnchorQuality`; PPAL's class "
    "quality)",
    HEAD_FEATURES: "the classification tower's output at each box's centre as the box feature "
    "(`Needs.head_feats`; PPAL's CCMS features)",
    DENSE_HEAD: "a one-stage dense head on FPN levels with anchors that strategy heads can sit "
    "beside and be assigned with (MI-AOD's instance classifiers)",
}


def _check_steps(schedule: TrainSchedule) -> None:
    """Step milestones: only with ``lr_schedule: step``, increasing, each a fraction in (0, 1) or
    a whole iteration index >= 1 (a fraction of 1 or more would never fire)."""
    steps = tuple(float(x) for x in schedule.lr_steps)
    object.__setattr__(schedule, "lr_steps", steps)  # Hydra hands a ListConfig
    if schedule.lr_schedule not in ("cosine", "step"):
        raise AlrunError(
            f"trainer.lr_schedule: expected 'cosine' or 'step', got '{schedule.lr_schedule}'"
        )
    if schedule.lr_schedule == "cosine" and steps:
        raise AlrunError(
            "trainer.lr_steps: milestones need trainer.lr_schedule=step (cosine has none); "
            f"got {list(steps)}"
        )
    if schedule.lr_schedule == "step" and not steps:
        raise AlrunError(
            "trainer.lr_steps: expected at least one milestone for trainer.lr_schedule=step "
            "(a fraction of the round in (0, 1) or an iteration index >= 1)"
        )
    for x in steps:
        if not (0 < x < 1 or (x >= 1 and x.is_integer())):
            raise AlrunError(
                f"trainer.lr_steps: expected fractions in (0, 1) or whole iteration indices "
                f">= 1, got {x:g}"
            )
    shortest = min(schedule.iterations, schedule.first_iterations or schedule.iterations)
    late = [x for x in steps if x >= 1 and schedule.iterations > 0 and x >= shortest]
    if late:
        raise AlrunError(
            f"trainer.lr_steps: milestone {late[0]:g} is past the last iteration of a "
            f"{shortest}-iteration round (trainer.iterations / first_iterations); use a "
            "fraction in (0, 1) or a smaller index"
        )
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise AlrunError(f"trainer.lr_steps: expected increasing milestones, got {list(steps)}")
    if not 0 < schedule.gamma <= 1:
        raise AlrunError(f"trainer.gamma: expected in (0, 1], got {schedule.gamma}")
    if not 0 <= schedule.warmup_ratio <= 1:
        raise AlrunError(f"trainer.warmup_ratio: expected in [0, 1], got {schedule.warmup_ratio}")


@runtime_checkable
class Detector(Protocol):
    """What the loop and the training engine need from a detector backend.

    Classes are indices 0..C-1 of the dataset classes, in targets and in predictions alike (a
    backend whose head reserves class 0 for background shifts them itself). Training goes through
    :mod:`alrun.engine`, which needs only ``device``, ``train_mode``, ``parameters`` and
    ``losses``; the backend owns its model, its losses and its post-processing.
    ``head_type`` is ``sigmoid`` (dense heads without background) or ``softmax``;
    ``capabilities`` the optional capability names above that it implements.
    """

    num_classes: int
    device: torch.device
    head_type: str
    capabilities: frozenset[str]

    def reset(self, seed: int) -> None:
        """Re-initialise weights (``trainer.init: scratch``) deterministically from ``seed``."""

    def train_mode(self) -> None:
        """Put the model in training mode (dropout, BatchNorm statistics)."""

    def parameters(self) -> Iterable[Tensor]:
        """The parameters the optimiser updates."""

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Named scalar training losses for a batch: ``images`` (3, H, W) floats in [0, 1],
        ``targets`` with ``boxes`` (N, 4) xyxy pixels and ``labels`` (N,) class indices."""

    def predict(
        self,
        images: Sequence[ImageRef],
        needs: Needs,
        progress: Progress | None = None,
    ) -> list[Detections]:
        """Detections per image, in input order; fills only the optional fields in ``needs``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class FeatureMaps(Detector, Protocol):
    """``feature_maps``: intermediate features, with gradients, in training mode (for hooks such
    as domain-adversarial alignment or learned scorers' heads)."""

    def features(self, images: list[Tensor]) -> dict[str, Tensor]:
        """Named feature maps (B, C, h, w) of a batch of images (of one width C when the
        detector also declares ``fpn_features``)."""

    def feature_module(self) -> torch.nn.Module:
        """The module whose output, inside the model's own training forward, is what
        :meth:`features` returns (a forward hook there reads them without a second pass)."""


@runtime_checkable
class FPNFeatures(FeatureMaps, Protocol):
    """``fpn_features``: every feature map of :meth:`features` has ``feature_width`` channels
    (one domain classifier or scorer head serves every level)."""

    @property
    def feature_width(self) -> int: ...


#: the former name of :class:`FeatureMaps`
FeatureDetector = FeatureMaps


@runtime_checkable
class MCDropout(Detector, Protocol):
    """``mc_dropout``: dropout of ``p`` before the heads' last layers (the model trains with it);
    ``predict`` then gives ``needs.passes`` stochastic passes when ``needs.head_dropout > 0``."""

    def enable_mc_dropout(self, p: float) -> None: ...


@runtime_checkable
class MixtureHead(Detector, Protocol):
    """``mixture_head``: AL-MDN's mixture-density head beside the dense head; its parameters are
    ``auxiliary_parameters`` (the engine clips their gradients as their own group).
    ``coupling``: ``side`` (the towers' features reach it detached) | ``coupled`` (its losses
    train the towers and backbone too, as in the paper)."""

    def add_mixture_head(self, components: int, coupling: str = "side") -> None: ...

    def auxiliary_parameters(self) -> list[Tensor]: ...


@runtime_checkable
class TeacherSource(Detector, Protocol):
    """``teacher``: a torch module sharing the detector's parameters whose forward in eval mode
    returns torchvision-style post-processed detections (``boxes`` in the images' pixels,
    ``scores``, ``labels`` shifted by ``label_offset``) of a list of image tensors. Teachers
    deep-copy it (frozen, previous round) or EMA-update the copy from it: the torchvision
    backend gives its model, the mmdet one a wrapper around its model."""

    label_offset: int

    def teacher_module(self) -> torch.nn.Module: ...


@dataclass(frozen=True)
class FlipViewOutputs:
    """A dense head's outputs on a batch of N images and on their mirror images, stacked (the
    plain views first): ``cls`` (2N, L, C) logits and ``box`` (2N, L, 4) box offsets per anchor
    row (location-major, ``per_location`` anchors each, over feature levels of ``shapes``);
    ``encoding`` of the offsets: ``delta`` (dx, dy, dw, dh) or ``ltrb``."""

    cls: Tensor
    box: Tensor
    shapes: tuple[tuple[int, int], ...]
    per_location: int
    encoding: str


@runtime_checkable
class FlipViews(Detector, Protocol):
    """``flip_views`` for a backend that is not torchvision's (whose heads the consistency
    regime runs itself): the head outputs CSD compares, with gradients in training mode."""

    def flip_view_outputs(self, images: list[Tensor]) -> FlipViewOutputs | RoIFlipViewOutputs: ...


@runtime_checkable
class ImageViews(Detector, Protocol):
    """``image_views``: predictions on image tensors the caller loaded (and transformed)."""

    def predict_images(
        self, records: Sequence[ImageRef], images: list[Tensor], needs: Needs
    ) -> list[Detections]: ...


#: ``callback(labels, probs, ious)``: one training forward's positive anchors (dataset classes)
AnchorCallback = Callable[[Tensor, Tensor, Tensor], None]


@runtime_checkable
class AnchorQuality(Detector, Protocol):
    """``anchor_quality``: while watched, every training forward of the dense head reports its
    positive anchors (class, sigmoid probability of that class, IoU of the predicted box with
    the assigned ground-truth box), as PPAL's ``RetinaQualityEMAHead.loss_single`` reads them."""

    def watch_positive_anchors(self, callback: AnchorCallback) -> Callable[[], None]:
        """Start reporting to ``callback``; returns the function that stops it."""


@dataclass(frozen=True)
class DenseBatch:
    """One training forward of a dense detector: its FPN ``levels`` (B, D, h, w) with
    gradients, each image's ``anchors`` (sum over levels of h x w x A, 4) in location-major,
    anchor-minor order over the levels, and each image's ``targets`` (``boxes`` in the pixels
    the anchors are in, ``labels`` dataset classes)."""

    levels: list[Tensor]
    anchors: list[Tensor]
    targets: list[dict[str, Tensor]]


@runtime_checkable
class DenseHead(FeatureMaps, Protocol):
    """``dense_head``: what heads beside a one-stage dense head (MI-AOD's instance classifiers)
    read: ``anchors_per_location`` and, while watched, every training forward's
    :class:`DenseBatch`, so they are assigned on the detector's own anchors."""

    @property
    def anchors_per_location(self) -> int: ...

    def watch_dense_batches(self, callback: Callable[[DenseBatch], None]) -> Callable[[], None]:
        """Start reporting to ``callback``; returns the function that stops it."""


@dataclass(frozen=True)
class RoIFlipViewOutputs:
    """A two-stage head's outputs on the plain view's proposals and on the same proposals
    mirrored (``x1' = W - x2``) on the mirrored images, in torchvision's layout (the plain
    view's ``plain`` rows first): ``logits`` (2P, C + 1) with background in column 0,
    ``deltas`` (2P, (C + 1) * 4) class-specific ``(dx, dy, dw, dh)``. What ``FlipViews``
    returns for a two-stage model (CSD's two-stage variant)."""

    logits: Tensor
    deltas: Tensor
    plain: int


@runtime_checkable
class Rebuild(Detector, Protocol):
    """``rebuild``: the same architecture built again, fresh, for another class list (what
    synthetic pre-training trains), and what determines it (the key of caches of its weights)."""

    def rebuilt(self, num_classes: int) -> Detector: ...

    def build_description(self) -> dict[str, Any]: ...


def describe_builder(builder: Callable[..., Any]) -> dict[str, Any]:
    """A builder (a ``functools.partial`` from Hydra's ``_partial_: true``) as plain JSON: its
    function and keyword arguments (what a cache of its weights is keyed by)."""
    import json

    func = getattr(builder, "func", builder)
    keywords = getattr(builder, "keywords", {})
    return {
        "builder": f"{func.__module__}.{func.__qualname__}",
        "arguments": json.loads(json.dumps(dict(keywords), default=str, sort_keys=True)),
    }
