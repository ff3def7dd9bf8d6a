"""AL-MDN's mixture-density head on mmdet's RetinaNet (:mod:`alrun.detectors.mmdet`).

The same head, losses and uncertainties as the torchvision backend's
(:mod:`alrun.detectors.mdn`): :class:`~alrun.detectors.mdn.MixtureDensityHead` reads the output
of RetinaHead's last class and box tower convs (before any MC-dropout pre-hook of
``retina_cls`` / ``retina_reg``), its rows are mmdet's anchor rows (location-major,
anchor-minor, as torchvision's), and it is trained on the head's own assignment: what
``AnchorHead.loss_by_feat`` hands each level's ``loss_by_feat_single`` (labels with background
``num_classes``, weight 0 for ignored anchors, box targets encoded by the head's
``bbox_coder``). The head is ``model.bbox_head.mdn``, so it is in the model's ``state_dict``.
The wrappers are objects with bound methods, not closures, so a deep copy of the model (a
teacher) trains and captures into its own copy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alrun.detectors.mdn import (
    COUPLINGS,
    MixtureDensityHead,
    ReparameterNoise,
    TowerCapture,
    mixture_losses,
    uncertainty_of,
)
from alrun.errors import AlrunError


class _LossWithMixture:
    """``head.loss_by_feat`` plus the mixture head's losses (``loss_mdn_*``: mmdet's names
    carry ``loss``), on the assignment its ``loss_by_feat_single`` calls receive."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.capture = TowerCapture(head, head.cls_convs[-1], head.reg_convs[-1])
        self.noise = ReparameterNoise()
        self.original_single, self.original_loss = head.loss_by_feat_single, head.loss_by_feat
        self.levels: list[tuple[Tensor, Tensor, Tensor]] = []

    def single(self, cls_score, bbox_pred, anchors, labels, label_weights, bbox_targets, *a, **k):
        self.levels.append((labels, label_weights, bbox_targets))
        return self.original_single(
            cls_score, bbox_pred, anchors, labels, label_weights, bbox_targets, *a, **k
        )

    def __call__(self, *args, **kwargs) -> dict:
        self.levels = []
        losses = self.original_loss(*args, **kwargs)
        mix = self.head.mdn(*self.capture.take())
        cls_target, reg_target = mixture_targets(self.levels, self.head.num_classes)
        self.levels = []
        found = mixture_losses(mix, cls_target, reg_target, self.noise(mix.cls_mu))
        losses.update({f"loss_{name}": value for name, value in found.items()})
        return losses


def mixture_targets(
    levels: list[tuple[Tensor, Tensor, Tensor]], num_classes: int
) -> tuple[Tensor, Tensor]:
    """Per-level (labels, label weights, encoded box targets) of a batch -> ``mixture_losses``'s
    (B, R) class targets (class, -1 background, -2 ignored) and (B, R, 4) box targets."""
    labels = torch.cat([lab for lab, _, _ in levels], dim=1)
    weights = torch.cat([w for _, w, _ in levels], dim=1)
    boxes = torch.cat([t for _, _, t in levels], dim=1)
    target = torch.where(labels < num_classes, labels, torch.full_like(labels, -1))
    target = torch.where(weights > 0, target, torch.full_like(target, -2))
    return target, boxes


def check_mixture_head(head: nn.Module, components: int, coupling: str) -> None:
    from mmdet.models.dense_heads import RetinaHead

    if coupling not in COUPLINGS:
        raise AlrunError(
            f"strategy.scorer.coupling: expected one of {'|'.join(COUPLINGS)}, got '{coupling}'"
        )
    if not isinstance(head, RetinaHead) or not len(head.cls_convs) or not len(head.reg_convs):
        raise AlrunError(
            "strategy: the mixture-density head (AL-MDN) on mmdet needs RetinaNet's head with "
            f"its towers; this model has {type(head).__name__}"
        )
    if head.reg_decoded_bbox:
        raise AlrunError(
            "strategy: the mixture-density head learns encoded box targets; this mmdet head "
            "regresses decoded boxes (reg_decoded_bbox=True)"
        )
    if int(components) < 1:
        raise AlrunError(f"strategy.scorer.components: expected an integer >= 1, got {components}")


def install_mixture_head(head: nn.Module, components: int, coupling: str = "side") -> None:
    """Add ``head.mdn`` to an mmdet RetinaHead, trained with it; ``coupling``: ``side`` (the
    towers reach it detached) or ``coupled`` (its losses train the towers and backbone)."""
    check_mixture_head(head, components, coupling)
    head.mdn = MixtureDensityHead(
        head.feat_channels,
        head.num_base_priors,
        head.num_classes,
        int(components),
        detach=coupling == "side",
    ).to(next(head.parameters()).device)
    wrapper = _LossWithMixture(head)
    head.loss_by_feat, head.loss_by_feat_single = wrapper, wrapper.single


def has_mixture_head(head: nn.Module) -> bool:
    return isinstance(getattr(head, "mdn", None), MixtureDensityHead)


def mixture_uncertainties(
    head: nn.Module, towers: list[tuple[Tensor, Tensor]], found: list[dict[str, Tensor]]
) -> list[Tensor]:
    """Per image, (N, 4) AL-MDN uncertainties of the kept boxes at their anchors."""
    return uncertainty_of(head.mdn, towers, found)
