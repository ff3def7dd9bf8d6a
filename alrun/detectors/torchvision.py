"""torchvision detection backend.

Owns post-processing so that every kept box carries its full class-probability vector and its
feature vector (torchvision's stock ``postprocess_detections`` drops both), and every image an
embedding. Two families are handled:

* dense heads (FCOS, RetinaNet): per-anchor class logits are independent sigmoids, kept as
  ``class_probs``; ``probs`` is the constructed ``softmax([logits, 0])`` (background last with
  logit 0, for one class exactly the sigmoid) - see ``alrun.types.Detections``. Box features
  are the FPN feature at the anchor's location.
* two-stage heads (Faster R-CNN): ``softmax`` over C+1 classes, background moved to the last
  column; box features are the box head's output; ``proposals`` are the RPN boxes.

* SSD: ``softmax`` over C+1 classes as in two-stage heads. SSD's feature maps differ in width
  per level, so there is no fixed-size box feature: ``needs.feats`` is a clear error.

The image embedding is the concatenation of every feature level's global average.
"""

from __future__ import annotations

import contextlib
import typing
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.data.images import load_image
from alrun.detectors import base
from alrun.detectors.base import Progress, TrainSchedule
from alrun.detectors.mdn import (
    check_mixture_density,
    has_mixture_density,
    install_mixture_density,
    uncertainty_at,
)
from alrun.detectors.passes import PASS_NEEDS, with_views
from alrun.engine import BatchSource, train
from alrun.errors import AlrunError
from alrun.params import PositiveInt, Range
from alrun.types import NOTHING, Detections, Needs


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AlrunError(f"detector.device: '{device}' requested but CUDA is not available")
    return torch.device(device)


class TorchvisionDetector:
    """A torchvision detection model behind the :class:`~alrun.detectors.base.Detector` protocol.

    ``builder(num_classes=..., **weights)`` builds the model (a ``functools.partial`` from Hydra's
    ``_partial_: true``). ``pretrained``: ``false`` (random init), ``true`` (ImageNet backbone via
    ``weights_backbone="DEFAULT"``, needs the network once or the file in torch's hub cache) or a
    path to a local checkpoint of the whole model (a ``state_dict`` or a dict with a ``model``
    key). ``pretrained_backbone``: a local ImageNet backbone ``state_dict`` (what the paper
    protocols start from), loaded exactly where torchvision would load its download, so the model
    is built as with ``pretrained=true`` (frozen BatchNorm, frozen early stages).
    """

    def __init__(
        self,
        builder: Callable[..., nn.Module],
        num_classes: PositiveInt,
        pretrained: bool | str = False,
        device: str = "auto",
        pretrained_backbone: str | None = None,
        label_offset: Literal[0, 1] = 0,
        predict_batch_size: PositiveInt = 16,
        head_dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.0,
    ):
        self.builder = builder
        self.num_classes = int(num_classes)
        self.pretrained = pretrained
        self.device = resolve_device(device)
        self.label_offset = int(label_offset)
        self.predict_batch_size = int(predict_batch_size)
        if not 0.0 <= float(head_dropout) < 1.0:
            raise AlrunError(
                f"detector.head_dropout: expected a number in [0, 1), got {head_dropout}"
            )
        self.head_dropout = float(head_dropout)
        self.mdn_components = 0  # > 0: AL-MDN's mixture head beside the dense head (prepare())
        if isinstance(pretrained, str) and not Path(pretrained).is_file():
            raise AlrunError(f"detector.pretrained: checkpoint '{pretrained}' does not exist")
        if pretrained_backbone is not None and not Path(pretrained_backbone).is_file():
            raise AlrunError(
                f"detector.pretrained_backbone: file '{Path(pretrained_backbone).resolve()}' "
                "does not exist"
            )
        if pretrained_backbone is not None and pretrained is True:
            raise AlrunError(
                "detector.pretrained_backbone: set either pretrained=true (download) or a local "
                "pretrained_backbone file, not both"
            )
        self.pretrained_backbone = pretrained_backbone
        self.model = self._build(seed=0)

    # --- construction ---------------------------------------------------------------------
    def _build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"num_classes": self.num_classes + self.label_offset}
        if self.pretrained is True:
            kwargs["weights_backbone"] = "DEFAULT"
            try:
                model = self.builder(**kwargs)
            except OSError as err:  # urllib's URLError is an OSError
                raise AlrunError(_offline_message(self.builder, err)) from None
        elif self.pretrained_backbone is not None:
            model = _build_with_local_backbone(self.builder, kwargs, self.pretrained_backbone)
        else:
            model = self.builder(**kwargs)
        if not isinstance(model, (FCOS, RetinaNet, FasterRCNN, SSD)):
            raise AlrunError(
                f"detector: {type(model).__name__} is not supported by the torchvision backend "
                "(supported: FCOS, RetinaNet, FasterRCNN and SSD families)"
            )
        if isinstance(self.pretrained, str):
            state = torch.load(self.pretrained, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                first = str(err).splitlines()[0]
                raise AlrunError(
                    f"detector.pretrained: {self.pretrained} does not fit this model ({first})"
                ) from None
        if self.head_dropout > 0:
            if not isinstance(model, (FCOS, RetinaNet, FasterRCNN)):
                raise AlrunError(
                    "detector.head_dropout: head dropout (MC dropout) is implemented for FCOS, "
                    f"RetinaNet and Faster R-CNN heads, not {type(model).__name__}; set it to 0"
                )
            install_head_dropout(model, self.head_dropout)
        if self.mdn_components:
            install_mixture_density(model, self.mdn_components)
        return model.to(self.device)

    @property
    def head_type(self) -> str:
        """``sigmoid`` for dense heads (FCOS, RetinaNet), ``softmax`` otherwise."""
        return "sigmoid" if isinstance(self.model, (FCOS, RetinaNet)) else "softmax"

    @property
    def capabilities(self) -> frozenset[str]:
        """The optional capabilities of this model's family (:func:`family_capabilities`)."""
        return family_capabilities(type(self.model))

    @staticmethod
    def declared_capabilities(config: Any) -> frozenset[str] | None:
        """The capabilities a detector config gives, read from the return annotation of its
        builder's ``_target_`` without building anything (None: not known before building)."""
        family = _annotated_family(config.get("builder"))
        return None if family is None else family_capabilities(family)

    def reset(self, seed: int) -> None:
        self.model = self._build(seed)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    # --- multi-pass set-up (MC dropout, mixture head), before any training -------------------
    def prepare(self, needs: Needs) -> None:
        """Build what ``needs`` asks of this model at start-up (before any training): dropout
        in the heads for MC dropout (the model trains with it), AL-MDN's mixture head. The
        loop does this through :func:`alrun.detectors.capabilities.set_up_detector`; this is the
        shortcut for scripts and tests."""
        if needs.head_dropout > 0:
            self.enable_mc_dropout(needs.head_dropout)
        if needs.mixture_density:
            self.add_mixture_head(needs.mixture_density)

    def enable_mc_dropout(self, p: float) -> None:
        """Dropout of ``p`` before the class/box logits of the heads; ``detector.head_dropout``
        wins when set."""
        if not isinstance(self.model, (FCOS, RetinaNet, FasterRCNN)):
            raise AlrunError(
                "strategy: MC dropout is implemented for FCOS, RetinaNet and Faster R-CNN "
                f"heads; this detector is {type(self.model).__name__}: use an ensemble or "
                "test-time views"
            )
        if self.head_dropout == 0:
            self.head_dropout = float(p)
            self.model = self._build(seed=0)

    def add_mixture_head(self, components: int) -> None:
        """AL-MDN's mixture-density head of ``components`` beside the dense head."""
        check_mixture_density(self.model, components)  # before the rebuild
        self.mdn_components = int(components)
        self.model = self._build(seed=0)

    def teacher_module(self) -> nn.Module:
        """The model itself: its forward in eval mode gives post-processed boxes
        (``TeacherSource``), labels shifted by ``label_offset``."""
        return self.model

    # --- training (the loop itself is alrun.engine) -------------------------------------------
    def train_mode(self) -> None:
        self.model.train()

    def parameters(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def auxiliary_parameters(self) -> list[Tensor]:
        """Parameters of heads trained beside the detector (AL-MDN's mixture head): the engine
        clips their gradients as their own group."""
        return list(self.model.head.mdn.parameters()) if has_mixture_density(self.model) else []

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if self.label_offset:
            targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        return self.model(images, targets)

    @property
    def feature_width(self) -> int:
        """The FPN's width: every level of :meth:`features` has it (``fpn_features``)."""
        return int(self.model.backbone.out_channels)

    def feature_module(self) -> nn.Module:
        """The backbone (with its FPN): its output is :meth:`features`'s maps."""
        return self.model.backbone

    def features(self, images: list[Tensor]) -> dict[str, Tensor]:
        """Backbone (+ FPN) feature maps of ``images``, with gradients in training mode."""
        batch, _ = self.model.transform(images)
        features = self.model.backbone(batch.tensors)
        return {"0": features} if isinstance(features, Tensor) else dict(features)

    def fit(
        self,
        dataset: DetectionDataset,
        schedule: TrainSchedule,
        seed: int,
        from_scratch: bool = False,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        """Train on every image of ``dataset`` (one labelled source through the engine)."""
        source = BatchSource("labelled", dataset)
        return train(self, [source], schedule, seed, from_scratch, progress=progress)

    # --- prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        images: Sequence[ImageRecord],
        needs: Needs = NOTHING,
        progress: Progress | None = None,
    ) -> list[Detections]:
        """Detections per record; extra passes only when ``needs`` asks for them:

        * ``head_dropout > 0``: ``passes`` MC-dropout passes. The backbone, FPN and the head
          towers run once; only the last layers (dropout + class / box logits) run per pass,
          read at the reference boxes' anchors (row i of a pass = row i of the reference).
        * ``augment``: one pass per test-time view (:func:`alrun.detectors.passes.with_views`),
          boxes mapped back to the original image.

        The returned ``Detections`` are the deterministic, un-augmented pass; the extra ones are
        in ``Detections.passes`` (probabilities always kept).
        """
        if needs.grads:
            raise AlrunError(
                "detector: gradient outputs are not implemented by the torchvision backend yet"
            )
        if needs.passes > 1 and not needs.head_dropout:
            raise AlrunError(
                f"detector: {needs.passes} multi-pass predictions asked without MC dropout "
                "(needs.head_dropout > 0); ensembles are alrun.detectors.passes.Ensemble"
            )
        mc_passes = needs.passes if needs.head_dropout > 0 else 0
        if mc_passes and not _head_dropouts(self.model):
            raise AlrunError(
                "detector: MC-dropout passes asked but the heads have no dropout (the strategy "
                "sets it up at start-up through detector.prepare, or set detector.head_dropout)"
            )
        if needs.augment:  # the backend-independent views, as any detector gets them
            plain = self.predict(images, replace(needs, augment=()), progress)
            return with_views(self, list(images), plain, needs.augment)
        self.model.eval()
        out: list[Detections] = []
        records = list(images)
        for start in range(0, len(records), self.predict_batch_size):
            chunk = records[start : start + self.predict_batch_size]
            tensors = [load_image(r).to(self.device) for r in chunk]
            found = self._forward(chunk, tensors, needs, mc_passes)
            out.extend(found)
            if progress:
                progress(len(out), len(records))
        return out

    @torch.no_grad()
    def predict_images(
        self, records: Sequence[ImageRecord], images: list[Tensor], needs: Needs
    ) -> list[Detections]:
        """Single-pass detections of ``images`` (already loaded, possibly transformed)."""
        self.model.eval()
        return self._forward(records, images, needs, 0)

    def _forward(
        self,
        records: Sequence[ImageRecord],
        tensors: list[Tensor],
        needs: Needs,
        mc_passes: int = 0,
    ) -> list[Detections]:
        model = self.model
        original_sizes = [tuple(t.shape[-2:]) for t in tensors]
        batch, _ = model.transform(tensors)
        features = model.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        levels = list(features.values())
        embeddings = torch.cat([f.mean(dim=(2, 3)) for f in levels], dim=1)  # (B, sum D)
        extra: list[list[dict[str, Tensor]]] = []
        if isinstance(model, FasterRCNN):
            cached = _two_stage_features(model, batch, features)
            per_image = _two_stage(model, batch, features, cached)
            if mc_passes:
                with _mc_rng(self.device, records), _stochastic(model):
                    for _ in range(mc_passes):
                        extra.append(_two_stage_at_sources(model, batch, *cached, per_image))
        elif isinstance(model, SSD):
            if needs.feats:
                raise AlrunError(
                    "detector: SSD has no fixed-size box feature; choose a strategy without "
                    "box features or another detector"
                )
            per_image = _ssd(model, batch, levels)
        else:
            anchors = model.anchor_generator(batch, levels)
            towers = _head_towers(model, levels)  # run once, whatever the number of passes
            per_image = _dense(model, batch, levels, _head_last(model, towers), anchors)
            if needs.mixture_density:
                if not has_mixture_density(model):
                    raise AlrunError(
                        "detector: mixture-density uncertainties asked but the head has no "
                        "mixture head (the strategy sets it up at start-up through "
                        "detector.prepare)"
                    )
                for found, mdn in zip(per_image, uncertainty_at(model, towers, per_image)):
                    found["mdn"] = mdn
            if mc_passes:
                p = _head_dropouts(model)[0].p
                with _mc_rng(self.device, records):
                    extra = _dense_mc_passes(
                        model, batch, levels, towers, anchors, per_image, p, mc_passes
                    )
        geometry = (batch.image_sizes, original_sizes)
        results = []
        for i, (record, found) in enumerate(zip(records, per_image)):
            det = self._detections(record, found, i, geometry, needs, embeddings[i])
            passes = tuple(
                self._detections(record, p[i], i, geometry, PASS_NEEDS, None) for p in extra
            )
            results.append(replace(det, passes=passes) if passes else det)
        return results

    def _detections(
        self,
        record: ImageRecord,
        found: dict[str, Tensor],
        i: int,
        geometry: tuple[list, list],
        needs: Needs,
        embedding: Tensor | None,
    ) -> Detections:
        """One image's post-processed outputs as Detections in original-image pixels."""
        image_sizes, original_sizes = geometry
        boxes = resize_boxes(found["boxes"], image_sizes[i], original_sizes[i])
        proposals = found.get("proposals")
        return Detections(
            image_id=record.image_id,
            boxes=boxes.cpu(),
            scores=found["scores"].cpu(),
            labels=(found["labels"] - self.label_offset).cpu(),
            probs=found["probs"].cpu() if needs.probs else None,
            class_probs=found["class_probs"].cpu() if needs.probs else None,
            sources=found["sources"].cpu(),
            mdn=found["mdn"].cpu() if "mdn" in found else None,
            head=self.head_type,
            feats=found["feats"].cpu() if needs.feats else None,
            embedding=embedding.cpu() if needs.embedding and embedding is not None else None,
            proposals=(
                resize_boxes(proposals, image_sizes[i], original_sizes[i]).cpu()
                if proposals is not None
                else None
            ),
        )


#: the optional capabilities (``alrun.detectors.base``) of each supported model family
_DENSE = frozenset(
    {
        base.MC_DROPOUT,
        base.MIXTURE_HEAD,
        base.BOX_FEATURES,
        base.EMBEDDINGS,
        base.FEATURE_MAPS,
        base.FPN_FEATURES,
        base.TEACHER,
        base.FLIP_VIEWS,
        base.IMAGE_VIEWS,
        base.REBUILD,
    }
)
_TWO_STAGE = (_DENSE - {base.MIXTURE_HEAD}) | {base.PROPOSALS}
#: SSD: levels of different widths (no box feature, no one-width feature maps), no dropout site
_SSD = frozenset({base.EMBEDDINGS, base.FEATURE_MAPS, base.TEACHER, base.IMAGE_VIEWS, base.REBUILD})


def family_capabilities(family: type) -> frozenset[str]:
    """What alrun implements for a torchvision model class (FCOS, RetinaNet, FasterRCNN, SSD)."""
    if issubclass(family, (FCOS, RetinaNet)):
        return _DENSE
    if issubclass(family, FasterRCNN):
        return _TWO_STAGE
    if issubclass(family, SSD):
        return _SSD
    return frozenset()


def _annotated_family(builder: Any) -> type | None:
    """The model class a builder config's ``_target_`` says it returns (its annotation)."""
    from hydra.utils import get_method

    target = builder.get("_target_") if isinstance(builder, Mapping) else None
    if not isinstance(target, str):
        return None
    try:
        returned = typing.get_type_hints(get_method(target)).get("return")
    except Exception:  # noqa: BLE001 - an unknown target is reported when the model is built
        return None
    return returned if isinstance(returned, type) else None


class HeadDropout:
    """Forward pre-hook: dropout on the input of a head's last layer (the class / box logits).

    On feature maps it is channel-wise (spatial) dropout (Tompson et al. 2015: one mask per
    image and channel, the usual choice for conv features, whose neighbours are correlated), so
    an MC pass can be evaluated exactly at just the locations of the reference boxes
    (:func:`_dense_mc_passes`); on box features (Faster R-CNN) element-wise. Active in training
    (the model trains with it) and, for MC-dropout passes, in evaluation while ``active`` is
    set. A hook keeps the module tree and ``state_dict`` keys unchanged, so checkpoints load
    with or without it.
    """

    def __init__(self, p: float):
        self.p = float(p)
        self.active = False

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        on = module.training or self.active
        x = args[0]
        dropped = F.dropout2d(x, self.p, on) if x.dim() == 4 else F.dropout(x, self.p, on)
        return (dropped, *args[1:])


def _last_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that produce the class and box logits: of a dense head, or the box predictor
    of a two-stage head (one dropout on the box features feeds both its outputs)."""
    if isinstance(model, (FCOS, RetinaNet)):
        return [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
    if isinstance(model, FasterRCNN):
        return [model.roi_heads.box_predictor]
    return []


def install_head_dropout(model: nn.Module, p: float) -> None:
    """Insert dropout of probability ``p`` before the class and box logits of a dense head."""
    for layer in _last_layers(model):
        layer.register_forward_pre_hook(HeadDropout(p))


def _head_dropouts(model: nn.Module) -> list[HeadDropout]:
    return [
        hook
        for layer in _last_layers(model)
        for hook in layer._forward_pre_hooks.values()
        if isinstance(hook, HeadDropout)
    ]


@contextlib.contextmanager
def _mc_rng(device: torch.device, records: Sequence[ImageRecord]):
    """MC-dropout masks from a generator seeded by the batch's image ids (same images, same
    passes), without touching the global random state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32("|".join(r.image_id for r in records).encode()))
        yield


class _stochastic:
    """Context manager: head dropout active in evaluation (MC-dropout passes)."""

    def __init__(self, model: nn.Module):
        self.hooks = _head_dropouts(model)

    def __enter__(self) -> None:
        for hook in self.hooks:
            hook.active = True

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.active = False


def _head_towers(model: FCOS | RetinaNet, levels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per level, the classification and regression towers' outputs (deterministic)."""
    heads = model.head
    return [(heads.classification_head.conv(x), heads.regression_head.conv(x)) for x in levels]


def _to_anchor_rows(t: Tensor, width: int) -> Tensor:
    """(N, A*width, H, W) -> (N, HWA, width), as torchvision's heads reshape."""
    n, _, h, w = t.shape
    return t.view(n, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, width)


def _head_last(model: FCOS | RetinaNet, towers: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """The head's outputs from cached tower features: what ``model.head(levels)`` returns,
    running only the last layers (so MC-dropout passes re-run only those)."""
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    cls, reg, ctr = [], [], []
    for cls_feat, reg_feat in towers:
        cls.append(_to_anchor_rows(cls_head.cls_logits(cls_feat), cls_head.num_classes))
        regression = reg_head.bbox_reg(reg_feat)
        if isinstance(model, FCOS):
            regression = F.relu(regression)
            ctr.append(_to_anchor_rows(reg_head.bbox_ctrness(reg_feat), 1))
        reg.append(_to_anchor_rows(regression, 4))
    out = {"cls_logits": torch.cat(cls, dim=1), "bbox_regression": torch.cat(reg, dim=1)}
    if ctr:
        out["bbox_ctrness"] = torch.cat(ctr, dim=1)
    return out


def _backbone_weights_enum(builder: Callable[..., nn.Module]) -> Any:
    """The torchvision ``WeightsEnum`` class of a builder's ``weights_backbone``, or None."""
    fn = getattr(builder, "func", builder)
    try:
        hint = typing.get_type_hints(fn).get("weights_backbone")
    except Exception:  # noqa: BLE001 - introspection is best effort, for a message only
        return None
    for arg in typing.get_args(hint) or (hint,):
        if isinstance(arg, type) and hasattr(arg, "DEFAULT"):
            return arg
    return None


def _offline_message(builder: Callable[..., nn.Module], err: BaseException) -> str:
    """Say which file ``pretrained=true`` needs, where torchvision looks for it, and the
    offline alternative, instead of a bare ``urlopen`` error."""
    enum = _backbone_weights_enum(builder)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if enum is None:
        what = "the ImageNet backbone weights"
    else:
        url = enum.DEFAULT.url
        what = f"{url.rsplit('/', 1)[-1]} ({url})"
    return (
        f"detector.pretrained=true: could not download {what}: {err}. Put that file in {cache}/ "
        "or pass a local copy with detector.pretrained_backbone=<path> (and pretrained=false)"
    )


def _read_state_dict(path: str, key: str) -> dict[str, Tensor]:
    """A state_dict from a file; unwraps ``{"state_dict"|"model": ...}`` and ``module.``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise AlrunError(f"{key}: cannot read '{path}' as a torch state_dict ({err})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise AlrunError(f"{key}: '{path}' holds {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_error(err: RuntimeError) -> str:
    """The gist of a ``load_state_dict`` error: its first two lines, shortened."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]


def _build_with_local_backbone(
    builder: Callable[..., nn.Module], kwargs: dict[str, Any], path: str
) -> nn.Module:
    """Build as ``weights_backbone="DEFAULT"`` would, but read the weights from ``path``.

    torchvision's builders call ``WeightsEnum.get_state_dict`` to download; patching that one
    call for the duration of the build makes torchvision load the local file with its own
    strict ``load_state_dict`` and build the pretrained variant (frozen BatchNorm, trainable
    layers) exactly as online. Builders without published backbones (tiny_fcos) get the file
    loaded strictly into ``model.backbone``.
    """
    from torchvision.models._api import WeightsEnum

    state = _read_state_dict(path, "detector.pretrained_backbone")
    if _backbone_weights_enum(builder) is None:
        model = builder(**kwargs)
        target = model.backbone
    else:
        with mock.patch.object(WeightsEnum, "get_state_dict", lambda *_a, **_k: state):
            try:
                return builder(**{**kwargs, "weights_backbone": "DEFAULT"})
            except RuntimeError as err:
                raise AlrunError(
                    f"detector.pretrained_backbone: {path} does not fit this backbone "
                    f"({_load_error(err)})"
                ) from None
    try:
        target.load_state_dict(state)
    except RuntimeError as err:
        raise AlrunError(
            f"detector.pretrained_backbone: {path} does not fit this backbone ({_load_error(err)})"
        ) from None
    return model


def _with_background_last(logits: Tensor) -> Tensor:
    """Sigmoid-head logits (N, C) -> distribution over C classes + background (N, C+1)."""
    zeros = torch.zeros_like(logits[:, :1])
    return torch.softmax(torch.cat([logits, zeros], dim=1), dim=1)


def _move_background_last(probs: Tensor) -> Tensor:
    """Softmax-head distributions (background in column 0) -> alrun's order (background last)."""
    return torch.cat([probs[:, 1:], probs[:, :1]], dim=1)


def _dense(
    model: FCOS | RetinaNet,
    batch,
    levels: list[Tensor],
    head_outputs: dict[str, Tensor] | None = None,
    anchors: list[Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """FCOS / RetinaNet post-processing that keeps each box's logits row and feature row.

    Locations in the batch's padding (torchvision pads every image at the bottom / right to
    the batch's largest size, a multiple of 32) see no image, yet the head scores them; their
    boxes, clipped to the image, used to lie along its bottom or right edge (a tiny FCOS on
    640x480 photos: most confident boxes touched the bottom edge, scripts/bottom_edge.py). They
    are not candidates, and boxes left with no area by the clipping are dropped.

    ``head_outputs`` / ``anchors`` may be passed in (computed once for several passes)."""
    if head_outputs is None:
        head_outputs = model.head(levels)
    if anchors is None:
        anchors = model.anchor_generator(batch, levels)
    num_per_level = [f.shape[2] * f.shape[3] for f in levels]
    num_anchors_per_loc = head_outputs["cls_logits"].shape[1] // sum(num_per_level)
    num_per_level = [n * num_anchors_per_loc for n in num_per_level]
    is_fcos = isinstance(model, FCOS)
    # (B, HW, D) per level, so anchor index // A gives the location's feature
    flat_feats = [f.flatten(2).transpose(1, 2) for f in levels]
    results = []
    for b in range(len(batch.image_sizes)):
        logits = head_outputs["cls_logits"][b].split(num_per_level)
        regress = head_outputs["bbox_regression"][b].split(num_per_level)
        ctr = head_outputs["bbox_ctrness"][b].split(num_per_level) if is_fcos else None
        anchors_b = anchors[b].split(num_per_level)
        height, width = batch.image_sizes[b]
        kept = {
            "boxes": [],
            "scores": [],
            "labels": [],
            "probs": [],
            "class_probs": [],
            "feats": [],
            "sources": [],
        }
        level_start = 0
        for lvl in range(len(levels)):
            num_classes = logits[lvl].shape[-1]
            if is_fcos:
                scores = torch.sqrt(torch.sigmoid(logits[lvl]) * torch.sigmoid(ctr[lvl])).flatten()
            else:
                scores = torch.sigmoid(logits[lvl]).flatten()
            centres = (anchors_b[lvl][:, :2] + anchors_b[lvl][:, 2:]) / 2
            on_image = (centres[:, 0] < width) & (centres[:, 1] < height)
            scores = scores * on_image.repeat_interleave(num_classes)  # padding: never > thresh
            candidates = torch.where(scores > model.score_thresh)[0]
            scores = scores[candidates]
            k = min(int(candidates.numel()), model.topk_candidates)
            scores, order = scores.topk(k)
            candidates = candidates[order]
            anchor_idx = torch.div(candidates, num_classes, rounding_mode="floor")
            if is_fcos:
                boxes = model.box_coder.decode(regress[lvl][anchor_idx], anchors_b[lvl][anchor_idx])
            else:
                boxes = model.box_coder.decode_single(
                    regress[lvl][anchor_idx], anchors_b[lvl][anchor_idx]
                )
            kept["boxes"].append(box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b]))
            kept["scores"].append(scores)
            kept["labels"].append(candidates % num_classes)
            kept["probs"].append(_with_background_last(logits[lvl][anchor_idx]))
            kept["class_probs"].append(torch.sigmoid(logits[lvl][anchor_idx]))
            kept["feats"].append(flat_feats[lvl][b][anchor_idx // num_anchors_per_loc])
            kept["sources"].append(anchor_idx + level_start)
            level_start += num_per_level[lvl]
        merged = {k: torch.cat(v) for k, v in kept.items()}
        has_area = box_ops.remove_small_boxes(merged["boxes"], 1e-3)
        merged = {k: v[has_area] for k, v in merged.items()}
        keep = box_ops.batched_nms(
            merged["boxes"], merged["scores"], merged["labels"], model.nms_thresh
        )[: model.detections_per_img]
        results.append({k: v[keep] for k, v in merged.items()})
    return results


def _dense_at_sources(
    model: FCOS | RetinaNet,
    batch,
    head_outputs: dict[str, Tensor],
    anchors: list[Tensor],
    found: list[dict[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """One pass of full-map head outputs read at the anchors the reference boxes came from
    (the reference that :func:`_dense_mc_passes` computes more cheaply; tests compare them).

    Under MC dropout the anchors do not move, only the head's outputs do: each reference box's
    anchor gives its class probabilities, score and regressed box in this pass, row for row
    (same ``sources``, same labels), without a new top-k and NMS. That keeps T passes cheap and
    the correspondence exact; :func:`alrun.acquisition.multipass.match_passes` then compares
    row i with row i (and still applies the overlap threshold).
    """
    is_fcos = isinstance(model, FCOS)
    results = []
    for b, ref in enumerate(found):
        src, labels = ref["sources"], ref["labels"]
        logits = head_outputs["cls_logits"][b][src]
        regress = head_outputs["bbox_regression"][b][src]
        if is_fcos:
            boxes = model.box_coder.decode(regress, anchors[b][src])
        else:
            boxes = model.box_coder.decode_single(regress, anchors[b][src])
        class_probs = torch.sigmoid(logits)
        p = class_probs.gather(1, labels.reshape(-1, 1)).reshape(-1)
        if is_fcos:
            p = torch.sqrt(p * torch.sigmoid(head_outputs["bbox_ctrness"][b][src].reshape(-1)))
        results.append(
            {
                "boxes": box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b]),
                "scores": p,
                "labels": labels,
                "probs": _with_background_last(logits),
                "class_probs": class_probs,
                "feats": ref["feats"],
                "sources": src,
            }
        )
    return results


def _channel_mask(batch_size: int, channels: int, p: float, device) -> Tensor:
    """(B, C) channel-dropout mask, scaled by 1 / (1 - p) as in training."""
    keep = torch.rand(batch_size, channels, device=device) >= p
    return keep.float() / (1.0 - p)


def _patches(feature: Tensor, b: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """(n, C, 3, 3) neighbourhoods of locations (b, y, x) of ``feature`` (B, C, H, W), zero
    padded as a 3x3 convolution with padding 1 sees them."""
    padded = F.pad(feature, (1, 1, 1, 1))
    offsets = torch.arange(3, device=feature.device)
    ys = (y[:, None] + offsets)[:, :, None]  # (n, 3, 1)
    xs = (x[:, None] + offsets)[:, None, :]  # (n, 1, 3)
    return padded[b[:, None, None], :, ys, xs].permute(0, 3, 1, 2)  # (n, C, 3, 3)


class _ConvAt:
    """A 3x3 ``conv`` (padding 1) at gathered locations, output channels ``channels`` (n, k)
    per location, for any channel mask of its input.

    The convolution is linear in its input channels, so ``out[n, k] = sum_c mask[n, c] *
    Q[n, c, k] + bias`` with ``Q`` (each input channel's contribution) computed once; every
    MC pass is then one batched mask-vector product."""

    def __init__(self, patches: Tensor, conv: nn.Conv2d, channels: Tensor):
        weight = conv.weight.flatten(2)  # (out, C, 9)
        # per input channel c: (n, 9) @ (9, out), batched over c -> (n, C, out)
        per_channel = torch.bmm(patches.flatten(2).transpose(0, 1), weight.permute(1, 2, 0))
        contrib = per_channel.transpose(0, 1)  # (n, C, out)
        index = channels[:, None, :].expand(-1, contrib.shape[1], -1)
        self.contrib = contrib.gather(2, index)  # (n, C, k)
        self.bias = conv.bias[channels]  # (n, k)

    def __call__(self, mask: Tensor) -> Tensor:
        return (mask[:, :, None] * self.contrib).sum(dim=1) + self.bias


def _dense_mc_passes(
    model: FCOS | RetinaNet,
    batch,
    levels: list[Tensor],
    towers: list[tuple[Tensor, Tensor]],
    anchors: list[Tensor],
    found: list[dict[str, Tensor]],
    p: float,
    passes: int,
) -> list[list[dict[str, Tensor]]]:
    """``passes`` MC-dropout passes of a dense head at the reference boxes' anchors.

    With channel-wise dropout a pass is a (B, C) mask per tower; the last layers (3x3 convs)
    are evaluated only at the reference locations, on tower features computed once. Exactly
    what a full pass with those masks gives there (a test checks it), at a tiny fraction of
    its cost.
    """
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    num_classes, is_fcos = cls_head.num_classes, isinstance(model, FCOS)
    sizes = [(f.shape[2], f.shape[3]) for f in levels]
    per_loc = len(anchors[0]) // sum(h * w for h, w in sizes)  # anchors per location
    starts = torch.tensor([0] + [h * w * per_loc for h, w in sizes]).cumsum(0)
    counts = [len(f["sources"]) for f in found]
    if sum(counts) == 0:  # no reference box in the whole batch
        return [[dict(f) for f in found] for _ in range(passes)]
    device = levels[0].device
    total = int(starts[-1])
    b = torch.repeat_interleave(
        torch.arange(len(found), device=device), torch.tensor(counts, device=device)
    )
    src = torch.cat([f["sources"] for f in found]).to(device)
    labels = torch.cat([f["labels"] for f in found]).to(device)
    # per-class NMS keeps several rows per anchor: compute each (image, anchor) once
    keys, inverse = torch.unique(b * total + src, return_inverse=True)
    ub, usrc = torch.div(keys, total, rounding_mode="floor"), keys % total
    level = torch.searchsorted(starts[1:].to(device), usrc, right=True)
    rows = {"cls": [], "reg": [], "index": []}
    for lvl, (_h, w) in enumerate(sizes):
        at = torch.nonzero(level == lvl).flatten()
        if at.numel() == 0:
            continue
        loc = torch.div(usrc[at] - int(starts[lvl]), per_loc, rounding_mode="floor")
        y, x = torch.div(loc, w, rounding_mode="floor"), loc % w
        rows["cls"].append(_patches(towers[lvl][0], ub[at], y, x))
        rows["reg"].append(_patches(towers[lvl][1], ub[at], y, x))
        rows["index"].append(at)
    order = torch.cat(rows["index"])
    cls_patch, reg_patch = torch.cat(rows["cls"]), torch.cat(rows["reg"])
    b_o, src_o = ub[order], usrc[order]
    a = (src_o - starts.to(device)[level[order]]) % per_loc  # anchor index at the location
    cls_channels = (a * num_classes)[:, None] + torch.arange(num_classes, device=device)
    reg_channels = (a * 4)[:, None] + torch.arange(4, device=device)
    anchor_boxes = torch.stack(anchors)[b_o, src_o]
    limits = torch.tensor([[w, h, w, h] for h, w in batch.image_sizes], device=device)[b_o]
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=device)
    row_at = back[inverse]  # each box row's position among the computed anchors
    cls_at = _ConvAt(cls_patch, cls_head.cls_logits, cls_channels)
    reg_at = _ConvAt(reg_patch, reg_head.bbox_reg, reg_channels)
    ctr_at = _ConvAt(reg_patch, reg_head.bbox_ctrness, a[:, None]) if is_fcos else None
    passes_out = []
    for _ in range(passes):
        cls_mask = _channel_mask(len(found), cls_patch.shape[1], p, device)[b_o]
        reg_mask = _channel_mask(len(found), reg_patch.shape[1], p, device)[b_o]
        logits, regress = cls_at(cls_mask), reg_at(reg_mask)
        if is_fcos:
            boxes = model.box_coder.decode(F.relu(regress), anchor_boxes)
        else:
            boxes = model.box_coder.decode_single(regress, anchor_boxes)
        boxes = torch.minimum(boxes.clamp_min(0), limits)[row_at]
        logits = logits[row_at]
        class_probs = torch.sigmoid(logits)
        score = class_probs.gather(1, labels.reshape(-1, 1)).reshape(-1)
        if is_fcos:
            ctr = ctr_at(reg_mask).reshape(-1)[row_at]
            score = torch.sqrt(score * torch.sigmoid(ctr))
        out = {
            "boxes": boxes,
            "scores": score,
            "probs": _with_background_last(logits),
            "class_probs": class_probs,
        }
        split = {k: v.split(counts) for k, v in out.items()}
        passes_out.append(
            [
                {
                    **{k: split[k][i] for k in out},
                    "labels": f["labels"],
                    "feats": f["feats"],
                    "sources": f["sources"],
                }
                for i, f in enumerate(found)
            ]
        )
    return passes_out


def _two_stage_features(
    model: FasterRCNN, batch, features: dict[str, Tensor]
) -> tuple[list[Tensor], Tensor]:
    """RPN proposals and their box-head features (what MC-dropout passes reuse)."""
    proposals, _ = model.rpn(batch, features)
    heads = model.roi_heads
    return proposals, heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))


def _two_stage_at_sources(
    model: FasterRCNN,
    batch,
    proposals: list[Tensor],
    box_feats: Tensor,
    found: list[dict[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """One MC-dropout pass of the box predictor, read at the reference boxes' proposals (row i
    of the pass = row i of the reference: same proposal, same class)."""
    heads = model.roi_heads
    class_logits, box_regression = heads.box_predictor(box_feats)
    decoded = heads.box_coder.decode(box_regression, proposals)  # (sum N, C+1, 4)
    counts = [len(p) for p in proposals]
    results = []
    for b, (boxes, logits, ref) in enumerate(
        zip(decoded.split(counts), class_logits.split(counts), found)
    ):
        rows, labels = ref["sources"], ref["labels"]
        probs = torch.softmax(logits[rows], -1)
        results.append(
            {
                "boxes": box_ops.clip_boxes_to_image(boxes[rows, labels], batch.image_sizes[b]),
                "scores": probs.gather(1, labels.reshape(-1, 1)).reshape(-1),
                "labels": labels,
                "probs": _move_background_last(probs),
                "class_probs": probs[:, 1:],
                "feats": ref["feats"],
                "proposals": ref["proposals"],
                "sources": rows,
            }
        )
    return results


def _two_stage(
    model: FasterRCNN,
    batch,
    features: dict[str, Tensor],
    cached: tuple[list[Tensor], Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """Faster R-CNN post-processing that keeps probs (background last), box features, proposals."""
    proposals, box_feats = cached or _two_stage_features(model, batch, features)
    heads = model.roi_heads
    class_logits, box_regression = heads.box_predictor(box_feats)
    decoded = heads.box_coder.decode(box_regression, proposals)  # (sum N, C+1, 4)
    probs_all = torch.softmax(class_logits, -1)
    counts = [len(p) for p in proposals]
    results = []
    for b, (boxes, probs, feats, props) in enumerate(
        zip(decoded.split(counts), probs_all.split(counts), box_feats.split(counts), proposals)
    ):
        boxes = box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b])
        num_cls = probs.shape[1]
        # every (proposal, foreground class) pair is a candidate, as in torchvision
        row = torch.arange(len(probs), device=probs.device)[:, None].expand(-1, num_cls - 1)
        labels = torch.arange(1, num_cls, device=probs.device)[None].expand(len(probs), -1)
        cand_boxes = boxes[:, 1:].reshape(-1, 4)
        cand_scores = probs[:, 1:].reshape(-1)
        row, labels = row.reshape(-1), labels.reshape(-1)
        keep = torch.where(cand_scores > heads.score_thresh)[0]
        keep = keep[box_ops.remove_small_boxes(cand_boxes[keep], 1e-2)]
        keep = keep[
            box_ops.batched_nms(cand_boxes[keep], cand_scores[keep], labels[keep], heads.nms_thresh)
        ][: heads.detections_per_img]
        dist = _move_background_last(probs)
        results.append(
            {
                "boxes": cand_boxes[keep],
                "scores": cand_scores[keep],
                "labels": labels[keep],
                "probs": dist[row[keep]],
                "class_probs": probs[row[keep]][:, 1:],
                "feats": feats[row[keep]],
                "proposals": props[row[keep]],
                "sources": row[keep],
            }
        )
    return results


def _ssd(model: SSD, batch, levels: list[Tensor]) -> list[dict[str, Tensor]]:
    """SSD post-processing that keeps each box's softmax row (background moved last)."""
    head_outputs = model.head(levels)
    anchors = model.anchor_generator(batch, levels)
    probs_all = torch.softmax(head_outputs["cls_logits"], dim=-1)
    results = []
    for b, (regress, probs) in enumerate(zip(head_outputs["bbox_regression"], probs_all)):
        boxes = model.box_coder.decode_single(regress, anchors[b])
        boxes = box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b])
        rows, labels, scores = [], [], []
        for label in range(1, probs.shape[1]):
            score = probs[:, label]
            idx = torch.where(score > model.score_thresh)[0]
            k = min(int(idx.numel()), model.topk_candidates)
            top, order = score[idx].topk(k)
            rows.append(idx[order])
            scores.append(top)
            labels.append(torch.full_like(top, label, dtype=torch.int64))
        row, label, score = torch.cat(rows), torch.cat(labels), torch.cat(scores)
        keep = box_ops.batched_nms(boxes[row], score, label, model.nms_thresh)
        keep = keep[: model.detections_per_img]
        dist = _move_background_last(probs)
        results.append(
            {
                "boxes": boxes[row[keep]],
                "scores": score[keep],
                "labels": label[keep],
                "probs": dist[row[keep]],
                "class_probs": probs[row[keep]][:, 1:],
                "feats": None,
                "sources": row[keep],
            }
        )
    return results
