"""torchvision detection backend: the adapter behind the
:class:`~alrun.detectors.base.Detector` protocol.

It owns post-processing so that every kept box carries its full class-probability vector and
its feature vector, and every image an embedding (the concatenation of every feature level's
global average). One module per job: :mod:`.weights` (pretrained files),
:mod:`.families` (capabilities per model family), :mod:`.postprocess_dense` (FCOS,
RetinaNet), :mod:`.postprocess_rcnn` (Faster R-CNN), :mod:`.postprocess_ssd`,
:mod:`.mc_dropout`, and AL-MDN's mixture head in :mod:`alrun.detectors.mdn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import resize_boxes

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.detectors.base import (
    AnchorCallback,
    DenseBatch,
    Progress,
    TrainSchedule,
    describe_builder,
)
from alrun.detectors.mdn import (
    check_mixture_density,
    has_mixture_density,
    install_mixture_density,
    uncertainty_at,
)
from alrun.detectors.passes import PASS_NEEDS
from alrun.detectors.predicting import checked_mc_passes, predict_in_batches
from alrun.detectors.torchvision.dense_batches import DenseBatchWatch
from alrun.detectors.torchvision.families import annotated_family, family_capabilities
from alrun.detectors.torchvision.mc_dropout import (
    dense_mc_passes,
    head_dropouts,
    install_head_dropout,
    mc_rng,
    stochastic,
)
from alrun.detectors.torchvision.postprocess_dense import (
    centre_features,
    dense_detections,
    head_last,
    head_towers,
)
from alrun.detectors.torchvision.postprocess_rcnn import (
    two_stage_at_sources,
    two_stage_detections,
    two_stage_features,
)
from alrun.detectors.torchvision.postprocess_ssd import ssd_detections
from alrun.detectors.torchvision.quality import watch_head_loss
from alrun.detectors.torchvision.weights import build_with_weights
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
        self.mdn_coupling = "side"  # side | coupled: the mixture losses reach the towers
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
        model = build_with_weights(self.builder, kwargs, self.pretrained, self.pretrained_backbone)
        if not isinstance(model, (FCOS, RetinaNet, FasterRCNN, SSD)):
            raise AlrunError(
                f"detector: {type(model).__name__} is not supported by the torchvision backend "
                "(supported: FCOS, RetinaNet, FasterRCNN and SSD families)"
            )
        if self.head_dropout > 0:
            if not isinstance(model, (FCOS, RetinaNet, FasterRCNN)):
                raise AlrunError(
                    "detector.head_dropout: head dropout (MC dropout) is implemented for FCOS, "
                    f"RetinaNet and Faster R-CNN heads, not {type(model).__name__}; set it to 0"
                )
            install_head_dropout(model, self.head_dropout)
        if self.mdn_components:
            install_mixture_density(model, self.mdn_components, self.mdn_coupling)
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
        family = annotated_family(config.get("builder"))
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
            self.add_mixture_head(needs.mixture_density, needs.mixture_coupling)

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

    def add_mixture_head(self, components: int, coupling: str = "side") -> None:
        """AL-MDN's mixture-density head of ``components`` beside the dense head, its losses
        stopping at the head towers (``side``) or training them (``coupled``)."""
        check_mixture_density(self.model, components, coupling)  # before the rebuild
        self.mdn_components = int(components)
        self.mdn_coupling = coupling
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

    def watch_positive_anchors(self, callback: AnchorCallback) -> Callable[[], None]:
        """PPAL's class-quality inputs per training forward (:mod:`.quality`; dense heads)."""
        if not isinstance(self.model, (FCOS, RetinaNet)):
            raise AlrunError(
                "detector: positive-anchor quality (PPAL's class quality) needs a dense head "
                f"(FCOS, RetinaNet), not {type(self.model).__name__}"
            )
        return watch_head_loss(self.model, self.label_offset, callback)

    def rebuilt(self, num_classes: int) -> TorchvisionDetector:
        """The same architecture for ``num_classes`` classes, fresh and without what a
        strategy adds at start-up (``rebuild``: synthetic pre-training)."""
        return TorchvisionDetector(
            builder=self.builder,
            num_classes=num_classes,
            device=str(self.device),
            label_offset=self.label_offset,
        )

    def build_description(self) -> dict[str, Any]:
        """The builder and its arguments, and the label offset (``rebuild``)."""
        return {**describe_builder(self.builder), "label_offset": self.label_offset}

    @property
    def anchors_per_location(self) -> int:
        """Anchors at each location of a level (``dense_head``; FCOS 1, RetinaNet 9)."""
        return int(self.model.anchor_generator.num_anchors_per_location()[0])

    def watch_dense_batches(self, callback: Callable[[DenseBatch], None]) -> Callable[[], None]:
        """Every training forward's levels, anchors and resized targets (``dense_head``,
        :mod:`.dense_batches`); returns the function that stops watching."""
        if not isinstance(self.model, (FCOS, RetinaNet)):
            raise AlrunError(
                "detector: heads beside a dense head (MI-AOD) need FCOS or RetinaNet, not "
                f"{type(self.model).__name__}"
            )
        return DenseBatchWatch(self.model, self.label_offset, callback).stop

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
        mixture = has_mixture_density(self.model)
        passes = checked_mc_passes(needs, dropout=bool(head_dropouts(self.model)), mixture=mixture)
        forward = partial(self._forward, needs=needs, mc_passes=passes)
        return predict_in_batches(self, images, needs, progress, forward)

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
            cached = two_stage_features(model, batch, features)
            per_image = two_stage_detections(model, batch, features, cached)
            if mc_passes:
                with mc_rng(self.device, records), stochastic(model):
                    for _ in range(mc_passes):
                        extra.append(two_stage_at_sources(model, batch, *cached, per_image))
        elif isinstance(model, SSD):
            if needs.feats:
                raise AlrunError(
                    "detector: SSD has no fixed-size box feature; choose a strategy without "
                    "box features or another detector"
                )
            per_image = ssd_detections(model, batch, levels)
        else:
            anchors = model.anchor_generator(batch, levels)
            towers = head_towers(model, levels)  # run once, whatever the number of passes
            per_image = dense_detections(model, batch, levels, head_last(model, towers), anchors)
            if needs.head_feats:  # PPAL's CCMS features: the class tower at the box centre
                padded = tuple(batch.tensors.shape[-2:])
                cls_maps = [cls for cls, _ in towers]
                for found, feats in zip(
                    per_image, centre_features(cls_maps, per_image, len(anchors[0]), padded)
                ):
                    found["feats"] = feats
            if needs.mixture_density:  # checked by checked_mc_passes: the head has a mixture head
                for found, mdn in zip(per_image, uncertainty_at(model, towers, per_image)):
                    found["mdn"] = mdn
            if mc_passes:
                p = head_dropouts(model)[0].p
                with mc_rng(self.device, records):
                    extra = dense_mc_passes(
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
