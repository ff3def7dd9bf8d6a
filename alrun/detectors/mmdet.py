"""MMDetection 3.x backend (optional: ``alrun[mmdet]``, built by ``scripts/install_mmdet.sh``).

mmdet, mmcv and mmengine are imported only when an :class:`MMDetDetector` is built, so alrun
works without them; asking for this backend without them is a one-line error saying how to
install them.

Design choices:

* **Training goes through alrun's engine** (``losses`` calls ``model.loss``), not mmengine's
  ``Runner``. Every backend then shares one optimisation loop: the ``trainer.*`` schedule, the
  seeded batch order, the hooks regimes add (consistency, EMA teachers, loss prediction), the
  ``trainer.init`` policy and the run directory's checkpoints and resume. The Runner would bring
  its own loop, dataset pipeline, hooks, checkpointing and work dir, and alrun's rounds would
  have to be rebuilt around it. The price: mmdet's training-time data augmentation beyond
  alrun's horizontal flip is not used.
* **Resizing and normalisation**: images are resized here (keep ratio, shorter side
  ``min_size``, longer side at most ``max_size``, as mmdet's ``Resize(scale=(max, min),
  keep_ratio=True)``) and handed to the model's own ``data_preprocessor`` as BGR 0-255 tensors,
  as mmcv's image loader gives them, so the config's mean/std, ``bgr_to_rgb`` and padding apply.
* **Prediction keeps per-box class-probability vectors and box features** by running the
  model's own modules up to its bbox head and doing the post-processing (score threshold,
  top-k, class-aware NMS with the config's ``test_cfg``) here, where every kept box can carry
  its probability row and its feature row; mmdet's ``predict`` drops both at NMS. Nothing of
  mmdet is forked or patched: dense heads (RetinaNet and other sigmoid anchor heads) use the
  head's forward, ``prior_generator`` and ``bbox_coder``; two-stage models (Faster R-CNN) use
  the RPN's ``predict``, the RoI extractor and the bbox head, whose classifier input (the box
  feature) is read with a forward pre-hook.
* **Checkpoints**: ``detector.pretrained=<file>`` loads an mmdet/mmengine checkpoint. Those
  pickle more than tensors (meta, message hub), so they need ``torch.load(weights_only=False)``
  under torch >= 2.6, which can run code from the file: it is used only for that file, which the
  user names and must trust. ImageNet backbones (``pretrained_backbone``) and alrun's own
  round checkpoints are plain tensors and load with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

import alrun.distributed as distributed
from alrun.data.dataset import ImageRecord
from alrun.detectors.base import (
    ANCHOR_QUALITY,
    BOX_FEATURES,
    DENSE_HEAD,
    EMBEDDINGS,
    FEATURE_MAPS,
    FLIP_VIEWS,
    FPN_FEATURES,
    HEAD_FEATURES,
    IMAGE_VIEWS,
    MC_DROPOUT,
    MIXTURE_HEAD,
    PROPOSALS,
    REBUILD,
    TEACHER,
    AnchorCallback,
    DenseBatch,
    FlipViewOutputs,
    Progress,
    RoIFlipViewOutputs,
    describe_builder,
)
from alrun.detectors.mmdet_mc import (
    Stochastic,
    anchor_rows,
    dense_mc_passes,
    last_layers,
    retina_last,
    retina_towers,
    two_stage_at_sources,
)
from alrun.detectors.mmdet_mdn import (
    check_mixture_head,
    has_mixture_head,
    install_mixture_head,
    mixture_uncertainties,
)
from alrun.detectors.mmdet_quality import head_features, watch_head_loss
from alrun.detectors.mmdet_views import two_stage_flip_views
from alrun.detectors.passes import PASS_NEEDS
from alrun.detectors.predicting import checked_mc_passes, predict_in_batches
from alrun.detectors.torchvision import HeadDropout, resolve_device
from alrun.detectors.torchvision.mc_dropout import mc_rng
from alrun.detectors.torchvision.probs import with_background_last
from alrun.errors import AlrunError
from alrun.params import PositiveInt
from alrun.types import NOTHING, Detections, Needs

log = logging.getLogger("alrun")

INSTALL_HINT = (
    "the MMDetection backend needs mmdet 3.x with mmcv 2.1 (with its compiled ops) and "
    "mmengine, which are not installed in this environment; build them with "
    "`bash scripts/install_mmdet.sh` (creates .venv-mmdet; see the README) and run "
    ".venv-mmdet/bin/alrun, or `pip install 'alrun[mmdet]'` where an mmcv wheel for your torch "
    "exists"
)

#: prefix of configs that ship inside the mmdet package (``mmdet/.mim/configs/...``)
MMDET_PREFIX = "mmdet::"


def require_mmdet() -> None:
    """Import the MMDetection stack or fail with one line saying how to install it."""
    try:
        import mmcv  # noqa: F401
        import mmdet
        import mmengine  # noqa: F401
    except ImportError as err:
        raise AlrunError(f"detector: {INSTALL_HINT} ({err})") from None
    if not mmdet.__version__.startswith("3."):
        raise AlrunError(f"detector: mmdet 3.x is required, found {mmdet.__version__}")
    try:
        from mmcv.ops import RoIAlign, batched_nms  # noqa: F401
    except (ImportError, OSError) as err:
        raise AlrunError(
            f"detector: mmcv is installed without its compiled ops ({err}); rebuild it with "
            "`bash scripts/install_mmdet.sh`"
        ) from None
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)


# --- building -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MMDetBuild:
    """What a builder returns: the mmdet model and the image scale it is fed at."""

    model: nn.Module
    min_size: int
    max_size: int


def resolve_config_path(config: str) -> Path:
    """A config file path; ``mmdet::<path>`` is looked up in the configs mmdet ships."""
    if config.startswith(MMDET_PREFIX):
        require_mmdet()
        import mmdet

        path = Path(mmdet.__file__).parent / ".mim" / "configs" / config[len(MMDET_PREFIX) :]
    else:
        path = Path(config).expanduser()
    if not path.is_file():
        raise AlrunError(
            f"detector.builder.config: mmdet config '{config}' does not exist ({path.resolve()}); "
            "give an mmdet config file, mmdet::<path inside mmdet's configs/> or a dict"
        )
    return path


def load_model_config(config: str | Mapping[str, Any], options: Mapping[str, Any] | None) -> Any:
    """The ``model`` section of an mmdet config (file, ``mmdet::`` path or dict), with
    ``options`` (dotted keys, as mmdet's ``--cfg-options``) merged in."""
    path = resolve_config_path(config) if isinstance(config, str) else None
    require_mmdet()
    from mmengine.config import Config

    if path is not None:
        cfg = Config.fromfile(str(path))
    else:
        cfg = Config(dict(_plain(config)))
    if options:
        cfg.merge_from_dict(dict(_plain(options)))
    if "model" not in cfg:
        raise AlrunError(f"detector.builder.config: '{config}' has no `model` section")
    return cfg.model


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (mmengine's Config wants those)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency of alrun
        pass
    return copy.deepcopy(value)


def _set_num_classes(node: Any, num_classes: int) -> int:
    """Set ``num_classes`` in every head of a model config; returns how many were set."""
    count = 0
    if isinstance(node, Mapping):
        if "num_classes" in node and node.get("type") != "RPNHead":
            node["num_classes"] = num_classes
            count += 1
        for value in node.values():
            count += _set_num_classes(value, num_classes)
    elif isinstance(node, list):
        for value in node:
            count += _set_num_classes(value, num_classes)
    return count


def mmdet_model(
    num_classes: PositiveInt,
    config: str | Mapping[str, Any],
    min_size: PositiveInt = 800,
    max_size: PositiveInt = 1333,
    cfg_options: Mapping[str, Any] | None = None,
    from_scratch: bool = True,
    image_size: PositiveInt | None = None,
) -> MMDetBuild:
    """Build an mmdet model for ``num_classes`` classes from an mmdet config.

    ``image_size`` (the tiny FCOS's key, set by ``experiment=smoke`` and the CPU presets) sets
    both ``min_size`` and ``max_size``, so those presets run with this backend too.

    ``from_scratch``: the backbone gets no ``init_cfg`` (mmdet's would download ImageNet weights)
    and nothing in it is frozen (``frozen_stages=-1``, ``norm_eval=False``: BatchNorm statistics
    of a random backbone must train). With a pretrained backbone the config's freezing stays as
    the paper protocol has it.
    """
    model_cfg = load_model_config(config, cfg_options)
    if _set_num_classes(model_cfg, num_classes) == 0:
        raise AlrunError(
            f"detector.builder.config: no head with num_classes in '{config}'; is it a detector?"
        )
    backbone = model_cfg.get("backbone", {})
    backbone["init_cfg"] = None  # never download; pretrained_backbone loads a local file
    if from_scratch:
        if "frozen_stages" in backbone:
            backbone["frozen_stages"] = -1
        if "norm_eval" in backbone:
            backbone["norm_eval"] = False
    from mmdet.registry import MODELS

    try:
        model = MODELS.build(model_cfg)
    except (KeyError, TypeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AlrunError(f"detector.builder.config: cannot build '{config}' ({first})") from None
    _quiet_init_weights(model)
    declared = declared_kind(config)
    if declared is not None and declared != _model_kind(model):
        raise AlrunError(
            f"detector.builder.config: '{config}' is named as a {declared} model but builds a "
            f"{_model_kind(model)} one (its capabilities are read from the name)"
        )
    if image_size is not None:
        min_size = max_size = image_size
    return MMDetBuild(model, int(min_size), int(max_size))


def _quiet_init_weights(model: Any) -> None:
    """``init_weights`` with mmengine's logger at WARNING: without a log file it writes every
    parameter's init at INFO (~400 lines per RetinaNet build into the run's output)."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


def check_sync_batch_norm(model: nn.Module, device: torch.device, processes: int) -> None:
    """SyncBN (``norm_cfg=dict(type='SyncBN')``, or mmcv's ``MMSyncBN``) averages BatchNorm
    statistics over the process group during training, which torch (and mmcv) do on CUDA only:
    with several processes on the CPU it would fail at the first training step. One line naming
    the layer's ``norm_cfg`` instead, before anything is trained. (On CUDA, several processes
    synchronise it as mmdet's own distributed training does; one process uses it as BatchNorm.)
    """
    if processes == 1 or device.type == "cuda":
        return
    synced = [name for name, m in model.named_modules() if "SyncBatchNorm" in type(m).__name__]
    if synced:
        part = synced[0].split(".")[0]
        raise AlrunError(
            f"detector.builder.config: SyncBN in {synced[0]} ({len(synced)} layers) "
            f"synchronises over CUDA devices only, not {processes} processes on the CPU; set "
            f"its norm_cfg to BN or GN, e.g. "
            f"+detector.builder.cfg_options.model.{part}.norm_cfg.type=BN"
        )


# --- checkpoints ----------------------------------------------------------------------------
def _unwrap(state: Any) -> dict[str, Tensor]:
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise TypeError(f"holds {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_trusted_checkpoint(path: str) -> dict[str, Tensor]:
    """An mmdet/mmengine checkpoint the user named. mmengine pickles meta data beside the
    tensors, so this needs ``weights_only=False`` (which can run code from the file): only
    for files the user gives and trusts, never for anything alrun finds by itself."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        return _unwrap(state)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise AlrunError(
            f"detector.pretrained: cannot read '{path}' as a checkpoint ({err})"
        ) from None


def shape_mismatches(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """``name: file (shape) vs model (shape)`` for every tensor that exists in both."""
    own = model.state_dict()
    return [
        f"{k} is {tuple(v.shape)} in the file, {tuple(own[k].shape)} here"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]


def load_checkpoint(model: nn.Module, state: Mapping[str, Tensor], path: str, num_classes: int):
    """Strict load with a one-line error; a head of another size is named as such."""
    mismatched = shape_mismatches(model, state)
    if mismatched:
        raise AlrunError(
            f"detector.pretrained: {path} does not fit this model: {mismatched[0]} "
            f"({len(mismatched)} tensors differ); a checkpoint for another number of classes? "
            f"this dataset has {num_classes}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AlrunError(
            f"detector.pretrained: {path} does not fit this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


def load_backbone(model: nn.Module, path: str) -> None:
    """An ImageNet backbone (torchvision's resnet50-0676ba61.pth has mmdet ResNet's key names)
    into ``model.backbone``; the classifier (``fc.*``) is the only thing allowed to be left."""
    try:
        state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001
        raise AlrunError(
            f"detector.pretrained_backbone: cannot read '{path}' as a torch state_dict ({err})"
        ) from None
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    backbone = model.backbone
    mismatched = shape_mismatches(backbone, state)
    missing, unexpected = ([], [])
    if not mismatched:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if mismatched or missing or unexpected:
        detail = mismatched[:1] or [f"missing {missing[:3]}, unexpected {unexpected[:3]}"]
        raise AlrunError(
            f"detector.pretrained_backbone: {path} does not fit this backbone ({detail[0]})"
        )


# --- the detector ---------------------------------------------------------------------------
class MMDetDetector:
    """An mmdet 3.x detector behind the :class:`~alrun.detectors.base.Detector` protocol.

    ``builder(num_classes=..., from_scratch=...)`` returns an :class:`MMDetBuild` (a
    ``functools.partial`` of :func:`mmdet_model` from Hydra's ``_partial_: true``).
    ``pretrained``: false or a trusted mmdet checkpoint of this model; ``pretrained_backbone``:
    a local ImageNet backbone state_dict.
    """

    def __init__(
        self,
        builder: Callable[..., MMDetBuild],
        num_classes: PositiveInt,
        pretrained: bool | str = False,
        pretrained_backbone: str | None = None,
        device: str = "auto",
        predict_batch_size: PositiveInt = 8,
    ):
        require_mmdet()
        self.builder = builder
        self.num_classes = int(num_classes)
        self.device = resolve_device(device)
        self.predict_batch_size = int(predict_batch_size)
        if pretrained is True:
            raise AlrunError(
                "detector.pretrained: the mmdet backend downloads nothing; give a checkpoint "
                "file, or an ImageNet backbone file as detector.pretrained_backbone"
            )
        if isinstance(pretrained, str) and not Path(pretrained).is_file():
            raise AlrunError(f"detector.pretrained: checkpoint '{pretrained}' does not exist")
        if pretrained_backbone is not None and not Path(pretrained_backbone).is_file():
            raise AlrunError(
                f"detector.pretrained_backbone: file '{Path(pretrained_backbone).resolve()}' "
                "does not exist"
            )
        self.pretrained = pretrained or None
        self.pretrained_backbone = pretrained_backbone
        self.head_dropout = 0.0  # set by enable_mc_dropout; every rebuild installs it again
        self.mdn_components, self.mdn_coupling = 0, "side"  # set by add_mixture_head, the same
        self._dense_watchers: list[Callable[[DenseBatch], None]] = []  # watch_dense_batches
        self._build(seed=0)

    def _build(self, seed: int) -> None:
        torch.manual_seed(seed)
        from_scratch = self.pretrained is None and self.pretrained_backbone is None
        built = self.builder(num_classes=self.num_classes, from_scratch=from_scratch)
        model = built.model
        if self.pretrained_backbone is not None:
            load_backbone(model, self.pretrained_backbone)
        if self.pretrained is not None:
            state = read_trusted_checkpoint(self.pretrained)
            load_checkpoint(model, state, self.pretrained, self.num_classes)
        self.kind = _model_kind(model)
        check_sync_batch_norm(model, self.device, distributed.current().size)
        self.model = model.to(self.device)
        self.min_size, self.max_size = built.min_size, built.max_size
        if self.head_dropout > 0:
            for layer in last_layers(self.model, self.kind):
                layer.register_forward_pre_hook(HeadDropout(self.head_dropout))
        if self.mdn_components:
            install_mixture_head(self.model.bbox_head, self.mdn_components, self.mdn_coupling)

    @property
    def head_type(self) -> str:
        """``sigmoid`` for dense heads (RetinaNet), ``softmax`` for two-stage RoI heads."""
        return "sigmoid" if self.kind == "dense" else "softmax"

    #: the heads' class labels are the dataset's (``TeacherSource``: nothing to shift)
    label_offset = 0

    @property
    def capabilities(self) -> frozenset[str]:
        """The kind's capabilities, less those whose layers this model's head lacks: MC
        dropout needs RetinaNet's last convs or a shared-FC box head; a dense head's flipped
        views, PPAL's anchor quality and head features and AL-MDN's mixture RetinaNet's head."""
        found = kind_capabilities(self.kind)
        if not last_layers(self.model, self.kind):
            found = found - {MC_DROPOUT}
            if self.kind == "dense":
                found = found - {FLIP_VIEWS, ANCHOR_QUALITY, HEAD_FEATURES, MIXTURE_HEAD}
        return found

    @staticmethod
    def declared_capabilities(config: Any) -> frozenset[str] | None:
        """From the config alone (mmdet is not imported): the model type of a dict config, else
        the config file's name (``*rcnn*``: two-stage, ``*retinanet*``: dense); None otherwise.
        ``_build`` checks the built model against this."""
        kind = declared_kind(config.get("builder", {}).get("config"))
        return None if kind is None else kind_capabilities(kind)

    def reset(self, seed: int) -> None:
        self._build(seed)

    def enable_mc_dropout(self, p: float) -> None:
        """Dropout of ``p`` before the heads' last layers (RetinaNet's ``retina_cls`` /
        ``retina_reg``, channel-wise; Faster R-CNN's ``fc_cls`` / ``fc_reg``, element-wise), as
        forward pre-hooks: the model trains with it and ``state_dict`` keys do not change."""
        if MC_DROPOUT not in self.capabilities:
            raise AlrunError(
                f"strategy: MC dropout needs RetinaNet's head or a shared-FC box head; this "
                f"mmdet model has {type(self.model).__name__}: use an ensemble or test-time views"
            )
        if self.head_dropout == 0:
            self.head_dropout = float(p)
            for layer in last_layers(self.model, self.kind):
                layer.register_forward_pre_hook(HeadDropout(self.head_dropout))

    def rebuilt(self, num_classes: int) -> MMDetDetector:
        """The same model for ``num_classes`` classes, fresh (the ImageNet backbone file
        again, not a checkpoint of this model's classes) and without what a strategy adds at
        start-up (``rebuild``: synthetic pre-training)."""
        return MMDetDetector(
            self.builder,
            num_classes,
            pretrained_backbone=self.pretrained_backbone,
            device=str(self.device),
            predict_batch_size=self.predict_batch_size,
        )

    def build_description(self) -> dict[str, Any]:
        """The builder and its arguments (mmdet config, scale, options) and the backbone file
        (``rebuild``)."""
        return {**describe_builder(self.builder), "pretrained_backbone": self.pretrained_backbone}

    def add_mixture_head(self, components: int, coupling: str = "side") -> None:
        """AL-MDN's mixture-density head of ``components`` beside RetinaNet's head
        (:mod:`alrun.detectors.mmdet_mdn`), its losses stopping at the towers (``side``) or
        training them (``coupled``); the model is built again from seed 0 with it, as the
        torchvision backend does."""
        if MIXTURE_HEAD not in self.capabilities:
            raise AlrunError(
                "strategy: the mixture-density head (AL-MDN) on mmdet needs RetinaNet's head; "
                f"this model is {type(self.model).__name__}"
            )
        check_mixture_head(self.model.bbox_head, components, coupling)  # before the rebuild
        self.mdn_components, self.mdn_coupling = int(components), coupling
        self._build(seed=0)

    def auxiliary_parameters(self) -> list[Tensor]:
        """The mixture head's parameters (the engine clips their gradients as their own
        group); none without one."""
        head = getattr(self.model, "bbox_head", None)
        return list(head.mdn.parameters()) if head is not None and has_mixture_head(head) else []

    def watch_positive_anchors(self, callback: AnchorCallback) -> Callable[[], None]:
        """PPAL's class-quality inputs per training forward of RetinaNet's head
        (:mod:`alrun.detectors.mmdet_quality`)."""
        if ANCHOR_QUALITY not in self.capabilities:
            raise AlrunError(
                "detector: positive-anchor quality (PPAL's class quality) needs an mmdet "
                f"RetinaNet head, not {type(self.model).__name__}"
            )
        return watch_head_loss(self.model.bbox_head, callback)

    def teacher_module(self) -> nn.Module:
        """A module sharing this model's parameters whose forward gives torchvision-style
        post-processed boxes (``TeacherSource``): teachers deep-copy it, EMA updates read it."""
        return MMDetTeacher(self.model, self.kind, self.min_size, self.max_size)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    # --- training ---------------------------------------------------------------------------
    def train_mode(self) -> None:
        self.model.train()

    def parameters(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """mmdet's ``model.loss`` on alrun's batch; per-level lists summed, metrics such as
        ``acc`` (no ``loss`` in the name, as mmengine's ``parse_losses``) dropped."""
        inputs, samples = self._prepare(images, targets)
        if self._dense_watchers:
            raw = self._loss_watched(inputs, samples)
        else:
            raw = self.model.loss(inputs, samples)
        out: dict[str, Tensor] = {}
        for name, value in raw.items():
            if "loss" not in name:
                continue
            out[name] = sum(value) if isinstance(value, (list, tuple)) else value
        return out

    @property
    def anchors_per_location(self) -> int:
        """Anchors at each location of a level (``dense_head``; RetinaNet 9)."""
        return int(self.model.bbox_head.num_base_priors)

    def watch_dense_batches(self, callback: Callable[[DenseBatch], None]) -> Callable[[], None]:
        """Every training forward's FPN levels (the neck's output, with gradients), the head's
        anchors (``prior_generator``, in the resized batch's pixels) and the resized targets
        (``dense_head``: MI-AOD's heads); returns the function that stops watching."""
        if DENSE_HEAD not in self.capabilities:
            raise AlrunError(
                "detector: heads beside a dense head (MI-AOD) need an mmdet dense head, not "
                f"{type(self.model).__name__}"
            )
        self._dense_watchers.append(callback)

        def stop() -> None:
            if callback in self._dense_watchers:
                self._dense_watchers.remove(callback)

        return stop

    def _loss_watched(self, inputs: Tensor, samples: list[Any]) -> dict:
        """``model.loss`` with the neck's output kept, then reported as a DenseBatch."""
        kept: list[tuple[Tensor, ...]] = []
        handle = self.model.neck.register_forward_hook(lambda _m, _i, out: kept.append(out))
        try:
            raw = self.model.loss(inputs, samples)
        finally:
            handle.remove()
        levels = list(kept[0])
        head = self.model.bbox_head
        sizes = [f.shape[-2:] for f in levels]
        with torch.no_grad():
            priors = torch.cat(head.prior_generator.grid_priors(sizes, device=inputs.device))
        targets = [
            {"boxes": s.gt_instances.bboxes, "labels": s.gt_instances.labels} for s in samples
        ]
        batch = DenseBatch(levels, [priors] * len(samples), targets)
        for callback in list(self._dense_watchers):
            callback(batch)
        return raw

    def features(self, images: list[Tensor]) -> dict[str, Tensor]:
        """The neck's feature maps (FPN levels), with gradients in training mode."""
        inputs, _ = self._prepare(images)
        return {str(i): f for i, f in enumerate(self.model.extract_feat(inputs))}

    def feature_module(self) -> nn.Module:
        """The neck (FPN): its output is :meth:`features`'s maps, in the same order."""
        return self.model.neck

    @property
    def feature_width(self) -> int:
        """The neck's width: every FPN level of :meth:`features` has it (``fpn_features``)."""
        return int(self.model.neck.out_channels)

    def flip_view_outputs(self, images: list[Tensor]) -> FlipViewOutputs | RoIFlipViewOutputs:
        """RetinaNet's per-anchor outputs on the batch and on its mirror image, or Faster
        R-CNN's RoI-head outputs on paired proposals (:mod:`.mmdet_views`) (``FlipViews``, for
        CSD): one backbone pass over both views, with gradients in training mode."""
        if FLIP_VIEWS not in self.capabilities:
            raise AlrunError("supervision=consistency: flipped views need an mmdet RetinaNet head")
        inputs, samples = self._prepare(images)
        if self.kind == "two_stage":
            return two_stage_flip_views(self.model, inputs, samples)
        head = self.model.bbox_head
        levels = self.model.extract_feat(torch.cat([inputs, inputs.flip(-1)]))
        cls_scores, bbox_preds = head(tuple(levels))
        width = head.cls_out_channels
        return FlipViewOutputs(
            cls=torch.cat([anchor_rows(c, width) for c in cls_scores], dim=1),
            box=torch.cat([anchor_rows(b, 4) for b in bbox_preds], dim=1),
            shapes=tuple(tuple(c.shape[-2:]) for c in cls_scores),
            per_location=head.num_base_priors,
            encoding="delta",
        )

    # --- input ------------------------------------------------------------------------------
    def _prepare(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[Any]]:
        return preprocess(self.model, images, self.min_size, self.max_size, targets)

    # --- prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        images: Sequence[ImageRecord],
        needs: Needs = NOTHING,
        progress: Progress | None = None,
    ) -> list[Detections]:
        """Detections per record; with ``needs.head_dropout > 0``, ``needs.passes`` MC-dropout
        passes in ``Detections.passes`` (backbone, neck and towers run once, only the last
        layers per pass, read at the reference boxes' anchors or proposals, row for row)."""
        dropout, mixture = self.head_dropout > 0, self.mdn_components > 0
        passes = checked_mc_passes(needs, dropout=dropout, mixture=mixture)
        forward = partial(self._forward, needs=needs, mc_passes=passes)
        return predict_in_batches(self, images, needs, progress, forward)

    @torch.no_grad()
    def predict_images(
        self, records: Sequence[ImageRecord], images: list[Tensor], needs: Needs
    ) -> list[Detections]:
        """Single-pass detections of ``images`` (already loaded, possibly transformed)."""
        self.model.eval()
        return self._forward(records, images, needs)

    def _forward(
        self,
        records: Sequence[ImageRecord],
        tensors: list[Tensor],
        needs: Needs,
        mc_passes: int = 0,
    ) -> list[Detections]:
        inputs, samples = self._prepare(tensors)
        levels = list(self.model.extract_feat(inputs))
        embeddings = torch.cat([f.mean(dim=(2, 3)) for f in levels], dim=1)
        extra: list[list[dict[str, Tensor]]] = []
        if self.kind == "dense":
            head = self.model.bbox_head
            cached = mc_passes or needs.head_feats or needs.mixture_density  # towers run once
            towers = retina_towers(head, levels) if cached else None
            outputs = retina_last(head, towers) if towers else None
            found = _dense(head, levels, samples, outputs)
            if needs.head_feats:  # PPAL's CCMS features: the class tower at the box centre
                cls_maps = [cls for cls, _ in towers]
                padded = tuple(inputs.shape[-2:])
                for kept, feats in zip(
                    found, head_features(cls_maps, found, head.num_base_priors, padded)
                ):
                    kept["feats"] = feats
            if needs.mixture_density:  # AL-MDN's four uncertainties at each box's anchor
                for kept, mdn in zip(found, mixture_uncertainties(head, towers, found)):
                    kept["mdn"] = mdn
            if mc_passes:
                with mc_rng(self.device, records):
                    extra = dense_mc_passes(head, levels, towers, found, samples, mc_passes)
        else:
            found = _two_stage(self.model, levels, samples)
            if mc_passes:
                with mc_rng(self.device, records), Stochastic(self.model, self.kind):
                    extra = [
                        two_stage_at_sources(self.model.roi_head.bbox_head, found, samples)
                        for _ in range(mc_passes)
                    ]
        results = []
        for i, (record, kept) in enumerate(zip(records, found)):
            det = _detections(record, kept, samples[i], needs, embeddings[i], self.head_type)
            passes = tuple(
                _detections(record, p[i], samples[i], PASS_NEEDS, None, self.head_type)
                for p in extra
            )
            results.append(replace(det, passes=passes) if passes else det)
        return results


def preprocess(
    model: nn.Module,
    images: Sequence[Tensor],
    min_size: int,
    max_size: int,
    targets: Sequence[dict[str, Tensor]] | None = None,
) -> tuple[Tensor, list[Any]]:
    """alrun images (3, H, W) RGB in [0, 1] -> the model's preprocessed batch."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        scale = min(min_size / min(height, width), max_size / max(height, width))
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        resized = F.interpolate(
            image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False
        )[0]
        inputs.append((resized.clamp(0, 1) * 255)[[2, 1, 0]])  # BGR 0-255, as mmcv reads
        sx, sy = new_w / width, new_h / height
        sample = DetDataSample(
            metainfo={
                "img_shape": (new_h, new_w),
                "ori_shape": (height, width),
                "scale_factor": (sx, sy),
            }
        )
        if targets is not None:
            factor = torch.tensor([sx, sy, sx, sy], device=targets[i]["boxes"].device)
            sample.gt_instances = InstanceData(
                bboxes=targets[i]["boxes"].float() * factor, labels=targets[i]["labels"]
            )
        samples.append(sample)
    data = model.data_preprocessor(
        {"inputs": inputs, "data_samples": samples}, training=targets is not None
    )
    return data["inputs"], data["data_samples"]


def _post_process(
    model: nn.Module, kind: str, levels: list[Tensor], samples: list[Any]
) -> list[dict[str, Tensor]]:
    if kind == "dense":
        return _dense(model.bbox_head, levels, samples)
    return _two_stage(model, levels, samples)


def _original_pixels(boxes: Tensor, sample: Any) -> Tensor:
    """Boxes of the resized image -> the original image's pixels, clipped to it."""
    sx, sy = sample.metainfo["scale_factor"]
    factor = torch.tensor([sx, sy, sx, sy], device=boxes.device)
    return box_ops.clip_boxes_to_image(boxes / factor, sample.metainfo["ori_shape"])


def _detections(
    record: ImageRecord,
    kept: dict[str, Tensor],
    sample: Any,
    needs: Needs,
    embedding: Tensor | None,
    head: str,
) -> Detections:
    """One image's post-processed outputs as Detections in original-image pixels."""
    wanted = needs.embedding and embedding is not None
    return Detections(
        image_id=record.image_id,
        boxes=_original_pixels(kept["boxes"], sample).cpu(),
        scores=kept["scores"].cpu(),
        labels=kept["labels"].cpu(),
        probs=kept["probs"].cpu() if needs.probs else None,
        class_probs=kept["class_probs"].cpu() if needs.probs else None,
        sources=kept["sources"].cpu(),
        mdn=kept["mdn"].cpu() if "mdn" in kept else None,
        head=head,
        feats=kept["feats"].cpu() if needs.feats else None,
        embedding=embedding.cpu() if wanted else None,
        proposals=_original_pixels(kept["proposals"], sample).cpu()
        if "proposals" in kept
        else None,
    )


class MMDetTeacher(nn.Module):
    """An mmdet model behind torchvision's detection forward: ``teacher(images)`` in eval
    mode -> per image ``boxes`` (original pixels), ``scores``, ``labels`` (dataset classes).

    What pseudo-label and UDA teachers call (:func:`alrun.supervision.pseudo_label.
    teacher_targets`); it holds the model as its only submodule, so a deep copy is a frozen
    teacher and ``state_dict`` keys of teacher and student match for EMA updates."""

    def __init__(self, model: nn.Module, kind: str, min_size: int, max_size: int):
        super().__init__()
        self.model = model
        self.kind, self.min_size, self.max_size = kind, min_size, max_size

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        inputs, samples = preprocess(self.model, images, self.min_size, self.max_size)
        levels = list(self.model.extract_feat(inputs))
        found = _post_process(self.model, self.kind, levels, samples)
        return [
            {
                "boxes": _original_pixels(kept["boxes"], sample),
                "scores": kept["scores"],
                "labels": kept["labels"],
            }
            for kept, sample in zip(found, samples)
        ]


#: what alrun implements for each supported kind of mmdet model
_KIND_CAPABILITIES = {
    "dense": frozenset(
        {
            BOX_FEATURES,
            EMBEDDINGS,
            FEATURE_MAPS,
            FPN_FEATURES,
            IMAGE_VIEWS,
            MC_DROPOUT,
            TEACHER,
            FLIP_VIEWS,
            ANCHOR_QUALITY,
            HEAD_FEATURES,
            MIXTURE_HEAD,
            DENSE_HEAD,
            REBUILD,
        }
    ),
    "two_stage": frozenset(
        {
            BOX_FEATURES,
            EMBEDDINGS,
            FEATURE_MAPS,
            FPN_FEATURES,
            IMAGE_VIEWS,
            PROPOSALS,
            MC_DROPOUT,
            TEACHER,
            FLIP_VIEWS,
            REBUILD,
        }
    ),
}


def kind_capabilities(kind: str) -> frozenset[str]:
    return _KIND_CAPABILITIES.get(kind, frozenset())


def declared_kind(config: Any) -> str | None:
    """``dense`` / ``two_stage`` from an mmdet config without reading it with mmengine."""
    if isinstance(config, Mapping):  # a dict config (OmegaConf's DictConfig is one too)
        model_type = str((config.get("model") or {}).get("type", ""))
        name = model_type.lower()
    elif isinstance(config, str):
        name = Path(config).name.lower()
    else:
        return None
    if "rcnn" in name or "r-cnn" in name:
        return "two_stage"
    if "retinanet" in name:
        return "dense"
    return None


def _model_kind(model: nn.Module) -> str:
    """``two_stage`` (RPN + standard RoI head) or ``dense`` (a sigmoid anchor head)."""
    roi_head = getattr(model, "roi_head", None)
    if roi_head is not None and getattr(model, "rpn_head", None) is not None:
        bbox_head = getattr(roi_head, "bbox_head", None)
        if hasattr(roi_head, "bbox_roi_extractor") and hasattr(bbox_head, "fc_cls"):
            return "two_stage"
    head = getattr(model, "bbox_head", None)
    from mmdet.models.dense_heads import AnchorHead

    centerness = ("atss_centerness", "conv_centerness")  # heads with a third output
    if (
        isinstance(head, AnchorHead)
        and getattr(head, "use_sigmoid_cls", False)
        and not any(hasattr(head, name) for name in centerness)
    ):
        return "dense"
    raise AlrunError(
        f"detector: {type(model).__name__} is not supported by the mmdet backend yet "
        "(supported: two-stage models with a standard RoI head, e.g. Faster R-CNN, and "
        "sigmoid anchor heads, e.g. RetinaNet)"
    )


def _dense(
    head: nn.Module,
    levels: list[Tensor],
    samples: list[Any],
    outputs: tuple[list[Tensor], list[Tensor]] | None = None,
) -> list[dict[str, Tensor]]:
    """RetinaNet-style post-processing that keeps each box's logits row and feature row
    (``outputs``: the head's, when already computed from cached towers).

    Mirrors mmdet's ``_predict_by_feat_single``: per level, scores above ``score_thr``, the
    ``nms_pre`` best (anchor, class) pairs, decoded by the head's ``bbox_coder``; then
    class-aware NMS over all levels and ``max_per_img``.
    """
    cls_scores, bbox_preds = outputs or head(tuple(levels))
    cfg = head.test_cfg
    score_thr = float(cfg.get("score_thr", 0.05))
    nms_pre = int(cfg.get("nms_pre", 1000))
    iou = float(cfg.get("nms", {}).get("iou_threshold", 0.5))
    max_per_img = int(cfg.get("max_per_img", 100))
    min_bbox_size = float(cfg.get("min_bbox_size", -1))
    sizes = [c.shape[-2:] for c in cls_scores]
    priors = head.prior_generator.grid_priors(sizes, dtype=levels[0].dtype, device=levels[0].device)
    num_anchors = head.num_base_priors
    num_classes = head.cls_out_channels
    results = []
    for b, sample in enumerate(samples):
        img_shape = sample.metainfo["img_shape"]
        kept: dict[str, list[Tensor]] = {
            k: [] for k in ("boxes", "scores", "labels", "probs", "class_probs", "feats", "sources")
        }
        offset = 0
        for lvl in range(len(levels)):
            logits = cls_scores[lvl][b].permute(1, 2, 0).reshape(-1, num_classes)
            deltas = bbox_preds[lvl][b].permute(1, 2, 0).reshape(logits.shape[0], -1)
            flat = logits.sigmoid().flatten()
            candidates = torch.where(flat > score_thr)[0]
            scores, order = flat[candidates].topk(min(nms_pre, candidates.numel()))
            candidates = candidates[order]
            anchor = torch.div(candidates, num_classes, rounding_mode="floor")
            boxes = head.bbox_coder.decode(priors[lvl][anchor], deltas[anchor], max_shape=img_shape)
            location_feats = levels[lvl][b].flatten(1).transpose(0, 1)  # (H*W, D)
            kept["boxes"].append(boxes)
            kept["scores"].append(scores)
            kept["labels"].append(candidates % num_classes)
            kept["probs"].append(with_background_last(logits[anchor]))
            kept["class_probs"].append(logits[anchor].sigmoid())
            kept["feats"].append(
                location_feats[torch.div(anchor, num_anchors, rounding_mode="floor")]
            )
            kept["sources"].append(anchor + offset)
            offset += logits.shape[0]
        merged = {k: torch.cat(v) for k, v in kept.items()}
        if min_bbox_size >= 0:  # as mmdet's _bbox_post_process
            wh = merged["boxes"][:, 2:] - merged["boxes"][:, :2]
            valid = (wh > min_bbox_size).all(dim=1)
            merged = {k: v[valid] for k, v in merged.items()}
        keep = box_ops.batched_nms(merged["boxes"], merged["scores"], merged["labels"], iou)
        keep = keep[:max_per_img]
        results.append({k: v[keep] for k, v in merged.items()})
    return results


def _two_stage(
    model: nn.Module, levels: list[Tensor], samples: list[Any]
) -> list[dict[str, Tensor]]:
    """Faster R-CNN post-processing keeping the C+1 softmax (mmdet already puts background
    last), the box feature (input of ``fc_cls``) and the proposal of every kept box."""
    from mmdet.structures.bbox import bbox2roi

    roi_head = model.roi_head
    bbox_head = roi_head.bbox_head
    proposals = [r.bboxes for r in model.rpn_head.predict(tuple(levels), samples, rescale=False)]
    rois = bbox2roi(proposals)
    captured: list[Tensor] = []
    handle = bbox_head.fc_cls.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        extractor = roi_head.bbox_roi_extractor
        roi_feats = extractor(tuple(levels)[: extractor.num_inputs], rois)
        if getattr(roi_head, "with_shared_head", False):  # as StandardRoIHead._bbox_forward
            roi_feats = roi_head.shared_head(roi_feats)
        cls_score, bbox_pred = bbox_head(roi_feats)
    finally:
        handle.remove()
    box_feats = captured[0].flatten(1)
    cfg = roi_head.test_cfg
    score_thr = float(cfg.get("score_thr", 0.05))
    iou = float(cfg.get("nms", {}).get("iou_threshold", 0.5))
    max_per_img = int(cfg.get("max_per_img", 100))
    probs_all = torch.softmax(cls_score, dim=-1)  # (sum N, C+1), background last
    counts = [len(p) for p in proposals]
    results = []
    start = 0
    for b, sample in enumerate(samples):
        n = counts[b]
        rows = slice(start, start + n)
        start += n
        probs = probs_all[rows]
        props = proposals[b]
        num_classes = probs.shape[1] - 1
        decoded = bbox_head.bbox_coder.decode(
            props, bbox_pred[rows], max_shape=sample.metainfo["img_shape"]
        )
        if decoded.shape[-1] == 4:  # class-agnostic regression: one box for every class
            decoded = decoded.repeat(1, num_classes)
        decoded = decoded.reshape(n, num_classes, 4)
        row = torch.arange(n, device=probs.device)[:, None].expand(-1, num_classes).reshape(-1)
        labels = torch.arange(num_classes, device=probs.device)[None].expand(n, -1).reshape(-1)
        cand_boxes = decoded.reshape(-1, 4)
        cand_scores = probs[:, :num_classes].reshape(-1)
        keep = torch.where(cand_scores > score_thr)[0]  # then NMS, as mmdet's multiclass_nms
        keep = keep[box_ops.batched_nms(cand_boxes[keep], cand_scores[keep], labels[keep], iou)]
        keep = keep[:max_per_img]
        results.append(
            {
                "boxes": cand_boxes[keep],
                "scores": cand_scores[keep],
                "labels": labels[keep],
                "probs": probs[row[keep]],
                "class_probs": probs[row[keep]][:, :num_classes],
                "feats": box_feats[rows][row[keep]],
                "proposals": props[row[keep]],
                "sources": row[keep],
            }
        )
    return results
