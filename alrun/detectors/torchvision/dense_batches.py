"""``dense_head`` on torchvision's FCOS and RetinaNet: every training forward's FPN levels,
anchors and resized targets (:class:`~alrun.detectors.base.DenseBatch`), read with forward
hooks on the model's ``transform`` (the resized batch and targets) and ``backbone`` (the
levels), and anchors from the model's own ``anchor_generator``: what MI-AOD's heads beside the
dense head are trained on (:mod:`alrun.acquisition.miaod`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from alrun.detectors.base import DenseBatch


class DenseBatchWatch:
    """The hooks; bound methods, so a deep copy of the model (a teacher) keeps its own."""

    def __init__(self, model: nn.Module, label_offset: int, callback: Callable[[DenseBatch], None]):
        self.model, self.label_offset, self.callback = model, label_offset, callback
        self.inputs = None
        self.handles = [
            model.transform.register_forward_hook(self._keep_inputs),
            model.backbone.register_forward_hook(self._deliver),
        ]

    def _keep_inputs(self, module, _inputs, output) -> None:
        self.inputs = output if module.training else None

    def _deliver(self, module, _inputs, output) -> None:
        inputs, self.inputs = self.inputs, None
        if not module.training or inputs is None or inputs[1] is None:
            return  # not a training forward with targets (e.g. ``features`` of unlabelled images)
        image_list, targets = inputs
        levels = [output] if isinstance(output, Tensor) else list(output.values())
        with torch.no_grad():
            anchors = self.model.anchor_generator(image_list, levels)
        shifted = [
            {"boxes": t["boxes"], "labels": t["labels"] - self.label_offset} for t in targets
        ]
        self.callback(DenseBatch(levels, anchors, shifted))

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
