"""Mixture-density heads for dense detectors (AL-MDN, Choi et al. ICCV 2021).

AL-MDN replaces SSD's class and box outputs by mixtures of K Gaussians and reads four
uncertainties off one forward pass: for localisation and classification each, an *aleatoric*
part (the mixture's expected variance, ``sum_k pi_k var_k``) and an *epistemic* part (the spread
of the component means, ``sum_k pi_k (mu_k - sum_j pi_j mu_j)^2``).

Here the mixture head sits *beside* the last layers of a torchvision FCOS / RetinaNet head: it
reads the same tower features, is trained with the detector on the detector's own anchor
assignment, and its state lives in the model's ``state_dict`` (``head.mdn.*``). Two couplings
(``strategy.scorer.coupling``): ``side`` (default) reads the towers detached, so the detector's
boxes, scores and training are the ones every other strategy gets and an AL-MDN run differs
from an entropy run only in *which* images it picks - the comparison the runner exists for;
``coupled`` lets the mixture losses' gradient reach the towers and backbone, as the paper's
detector (whose head *is* the mixture) is trained. The boxes and scores still come from the
dense head in both.

Outputs per anchor, as in the paper: classification - K component means ``mu_k`` (C logits),
variances ``var_k`` (C) and one weight ``pi_k``; regression - K components of 4 coordinates,
each coordinate with its own weights (K, 4). Training: classification draws logits
``mu_k + sqrt(var_k) eps`` (reparameterised, so the variance is learned), mixes the K sigmoid
probabilities with ``pi`` and takes the focal loss of the mixed probability (the detector's
own loss family for sigmoid heads); regression is the mixture's negative log-likelihood of the
encoded box targets of foreground anchors. Both are normalised by the number of foreground
anchors, as the detector's losses are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet

from alrun.errors import AlrunError

#: floor of every predicted variance: keeps the regression NLL bounded below
MIN_VARIANCE = 1e-2

#: how the mixture head's losses reach the detector: ``side`` stops them at the towers' outputs,
#: ``coupled`` trains the towers and backbone with them (the paper)
COUPLINGS = ("side", "coupled")

#: the four uncertainties per box, in this order (``Detections.mdn`` columns)
UNCERTAINTIES = ("loc_aleatoric", "loc_epistemic", "cls_aleatoric", "cls_epistemic")


@dataclass(frozen=True)
class Mixture:
    """Mixture parameters per anchor row (the rows of torchvision's head outputs)."""

    cls_mu: Tensor  # (..., K, C) logits
    cls_var: Tensor  # (..., K, C)
    cls_pi: Tensor  # (..., K), sums to 1
    reg_mu: Tensor  # (..., K, 4) encoded box targets
    reg_var: Tensor  # (..., K, 4)
    reg_pi: Tensor  # (..., K, 4), sums to 1 over K

    def rows(self, index) -> Mixture:
        return Mixture(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def _variance(raw: Tensor) -> Tensor:
    return F.softplus(raw) + MIN_VARIANCE


class MixtureDensityHead(nn.Module):
    """Two 3x3 convolutions on the head towers' outputs: the class mixture on the
    classification tower, the box mixture on the regression tower."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        components: int = 4,
        detach: bool = True,
        prior_probability: float = 0.01,
    ):
        super().__init__()
        self.num_anchors, self.num_classes, self.components = num_anchors, num_classes, components
        self.detach = detach
        k, c = components, num_classes
        self.cls = nn.Conv2d(in_channels, num_anchors * k * (2 * c + 1), 3, padding=1)
        self.reg = nn.Conv2d(in_channels, num_anchors * k * 4 * 3, 3, padding=1)
        for conv in (self.cls, self.reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # class means start at the focal-loss prior (RetinaNet's), so training starts stable
        with torch.no_grad():
            bias = self.cls.bias.view(num_anchors, k, 2 * c + 1)
            bias[:, :, :c] = -math.log((1 - prior_probability) / prior_probability)

    def forward(self, cls_towers: list[Tensor], reg_towers: list[Tensor]) -> Mixture:
        """Per level tower outputs (B, D, H, W) -> mixture rows (B, sum HWA, ...)."""
        k, c = self.components, self.num_classes
        cls_rows, reg_rows = [], []
        for cls_x, reg_x in zip(cls_towers, reg_towers):
            if self.detach:
                cls_x, reg_x = cls_x.detach(), reg_x.detach()
            cls_rows.append(_to_rows(self.cls(cls_x), self.num_anchors))
            reg_rows.append(_to_rows(self.reg(reg_x), self.num_anchors))
        cls = torch.cat(cls_rows, dim=1)
        reg = torch.cat(reg_rows, dim=1)
        cls = cls.reshape(*cls.shape[:2], k, 2 * c + 1)
        reg = reg.reshape(*reg.shape[:2], k, 4, 3)
        return Mixture(
            cls_mu=cls[..., :c],
            cls_var=_variance(cls[..., c : 2 * c]),
            cls_pi=torch.softmax(cls[..., 2 * c], dim=-1),
            reg_mu=reg[..., 0],
            reg_var=_variance(reg[..., 1]),
            reg_pi=torch.softmax(reg[..., 2], dim=-2),
        )


def _to_rows(t: Tensor, num_anchors: int) -> Tensor:
    """(B, A*W, H, W') -> (B, HWA, W), the row order of torchvision's dense heads."""
    b, _, h, w = t.shape
    return (
        t.view(b, num_anchors, -1, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, -1)
    )


def mixture_uncertainty(mix: Mixture, labels: Tensor) -> Tensor:
    """(N, 4) per box: localisation aleatoric / epistemic (max over the 4 coordinates, as the
    paper's scoring does) and classification aleatoric / epistemic of the box's class.

    Classification uses the components' probabilities ``sigmoid(mu_k)`` (sigmoid heads: one
    independent probability per class), as AL-MDN uses their softmax."""
    labels = labels.long().reshape(-1, 1, 1)
    loc_mean = (mix.reg_pi * mix.reg_mu).sum(dim=-2, keepdim=True)
    loc_al = (mix.reg_pi * mix.reg_var).sum(dim=-2).amax(dim=-1)
    loc_ep = (mix.reg_pi * (mix.reg_mu - loc_mean) ** 2).sum(dim=-2).amax(dim=-1)
    k = mix.cls_mu.shape[-2]
    probs = torch.sigmoid(mix.cls_mu.gather(-1, labels.expand(-1, k, 1))).squeeze(-1)  # (N, K)
    var = mix.cls_var.gather(-1, labels.expand(-1, k, 1)).squeeze(-1)
    mean = (mix.cls_pi * probs).sum(dim=-1, keepdim=True)
    cls_al = (mix.cls_pi * var).sum(dim=-1)
    cls_ep = (mix.cls_pi * (probs - mean) ** 2).sum(dim=-1)
    return torch.stack([loc_al, loc_ep, cls_al, cls_ep], dim=1)


def mixture_probability(mix: Mixture, noise: Tensor | None = None) -> Tensor:
    """(..., C): the mixture's class probabilities ``sum_k pi_k sigmoid(mu_k + sqrt(var_k) eps)``
    (``noise`` = eps, same shape as ``mu``; None: eps = 0)."""
    logits = mix.cls_mu if noise is None else mix.cls_mu + mix.cls_var.sqrt() * noise
    return (mix.cls_pi.unsqueeze(-1) * torch.sigmoid(logits)).sum(dim=-2)


def focal_loss_on_probs(p: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """torchvision's sigmoid focal loss, written on probabilities (the mixture's), summed."""
    p = p.clamp(1e-6, 1 - 1e-6)
    pos = -alpha * (1 - p) ** gamma * torch.log(p)
    neg = -(1 - alpha) * p**gamma * torch.log(1 - p)
    return torch.where(target > 0.5, pos, neg).sum()


def mixture_nll(mix: Mixture, target: Tensor) -> Tensor:
    """Per row and coordinate ``-log sum_k pi_k N(target; mu_k, var_k)``, summed."""
    log_normal = -0.5 * (
        math.log(2 * math.pi)
        + mix.reg_var.log()
        + (target.unsqueeze(-2) - mix.reg_mu) ** 2 / mix.reg_var
    )
    return -torch.logsumexp(mix.reg_pi.clamp_min(1e-12).log() + log_normal, dim=-2).sum()


def mixture_losses(
    mix: Mixture, cls_target: Tensor, reg_target: Tensor, noise: Tensor | None = None
) -> dict[str, Tensor]:
    """The two training losses over a batch's anchor rows.

    ``cls_target`` (B, R): class index for foreground rows, -1 background, -2 ignored (between
    RetinaNet's IoU thresholds); ``reg_target`` (B, R, 4): encoded targets (read at foreground
    rows only). Normalised by the number of foreground rows (at least 1)."""
    valid = cls_target >= -1
    fg = cls_target >= 0
    num_fg = max(1, int(fg.sum()))
    onehot = torch.zeros_like(mix.cls_mu[..., 0, :])
    onehot[fg, cls_target[fg]] = 1.0
    if noise is None:
        noise = torch.randn_like(mix.cls_mu)  # tests pass their own; training passes a seeded draw
    p = mixture_probability(mix, noise)
    cls_loss = focal_loss_on_probs(p[valid], onehot[valid]) / num_fg
    reg_loss = mixture_nll(mix.rows(fg), reg_target[fg]) / num_fg
    return {"mdn_classification": cls_loss, "mdn_regression": reg_loss}


class TowerCapture:
    """Forward hooks that keep the head towers' outputs of the latest head forward (bound
    methods, not closures, so a deep copy of the model - an EMA teacher - captures into its
    own copy). ``cls_tower`` / ``reg_tower``: the modules whose outputs are the towers' (the
    backend names them; the torchvision and mmdet heads call them differently)."""

    def __init__(self, head: nn.Module, cls_tower: nn.Module, reg_tower: nn.Module):
        self.cls: list[Tensor] = []
        self.reg: list[Tensor] = []
        head.register_forward_pre_hook(self._reset)
        cls_tower.register_forward_hook(self._keep_cls)
        reg_tower.register_forward_hook(self._keep_reg)

    def _reset(self, _module, _args) -> None:
        self.cls.clear()
        self.reg.clear()

    def _keep_cls(self, module, _inputs, output) -> None:
        if module.training:  # training forwards only (predictions run the towers themselves)
            self.cls.append(output)

    def _keep_reg(self, module, _inputs, output) -> None:
        if module.training:
            self.reg.append(output)

    def take(self) -> tuple[list[Tensor], list[Tensor]]:
        """The captured outputs, emptying the capture (no graph is held between steps)."""
        out = (list(self.cls), list(self.reg))
        self._reset(None, None)
        return out


class ReparameterNoise:
    """The reparameterisation noise, from a generator of its own seeded by the training run's
    seed (``torch.initial_seed()``, set by the engine): the global random stream the detector's
    training draws from is left exactly as without the mixture head."""

    def __init__(self):
        self._generator: torch.Generator | None = None
        self._seed: int | None = None

    def __call__(self, like: Tensor) -> Tensor:
        seed = torch.initial_seed()
        if self._generator is None or self._seed != seed or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device)
            self._generator.manual_seed(seed)
            self._seed = seed
        return torch.randn(like.shape, generator=self._generator, device=like.device)


class _LossWithMixture:
    """``head.compute_loss`` plus the mixture head's losses, on the same anchor assignment."""

    def __init__(self, model: FCOS | RetinaNet, original, capture: TowerCapture):
        self.model, self.original, self.capture = model, original, capture
        self._noise = ReparameterNoise()

    def __call__(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        losses = self.original(targets, head_outputs, anchors, matched_idxs)
        head = self.model.head
        mix = head.mdn(*self.capture.take())
        cls_target, reg_target = [], []
        for t, a, m in zip(targets, anchors, matched_idxs):
            labels = t["labels"][m.clamp_min(0)] if len(t["labels"]) else torch.zeros_like(m)
            boxes = t["boxes"][m.clamp_min(0)] if len(t["boxes"]) else torch.zeros_like(a)
            cls_target.append(torch.where(m >= 0, labels, m.clamp(-2, -1)))
            reg_target.append(_encode(self.model, boxes, a))
        noise = self._noise(mix.cls_mu)
        losses.update(mixture_losses(mix, torch.stack(cls_target), torch.stack(reg_target), noise))
        return losses


def _encode(model: FCOS | RetinaNet, boxes: Tensor, anchors: Tensor) -> Tensor:
    """Box targets in the detector's own regression encoding."""
    if isinstance(model, FCOS):
        return model.head.box_coder.encode(anchors, boxes)
    return model.head.regression_head.box_coder.encode_single(boxes, anchors)


def check_mixture_density(model: nn.Module, components: int, coupling: str = "side") -> None:
    """Whether ``model`` can take a mixture head of ``components`` (one-line errors)."""
    if coupling not in COUPLINGS:
        raise AlrunError(
            f"strategy.scorer.coupling: expected one of {'|'.join(COUPLINGS)}, got '{coupling}'"
        )
    if not isinstance(model, (FCOS, RetinaNet)):
        raise AlrunError(
            "strategy: the mixture-density head (AL-MDN) is implemented for FCOS and RetinaNet "
            f"heads; this detector is {type(model).__name__}: choose detector=tiny_fcos, "
            "fcos_* or retinanet_*"
        )
    if int(components) < 1:
        raise AlrunError(f"strategy.scorer.components: expected an integer >= 1, got {components}")


def install_mixture_density(model: nn.Module, components: int, coupling: str = "side") -> None:
    """Add ``model.head.mdn`` (trained with the detector) to an FCOS / RetinaNet model;
    ``coupling`` (:data:`COUPLINGS`) decides whether its losses train the towers too."""
    check_mixture_density(model, components, coupling)
    head = model.head
    cls_head = head.classification_head
    head.mdn = MixtureDensityHead(
        cls_head.cls_logits.in_channels,
        cls_head.num_anchors,
        cls_head.num_classes,
        int(components),
        detach=coupling == "side",
    )
    capture = TowerCapture(head, head.classification_head.conv, head.regression_head.conv)
    head.compute_loss = _LossWithMixture(model, head.compute_loss, capture)


def has_mixture_density(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "head", None), "mdn", None), MixtureDensityHead)


def uncertainty_at(
    model: FCOS | RetinaNet, towers: list[tuple[Tensor, Tensor]], found: list[dict[str, Tensor]]
) -> list[Tensor]:
    """Per image, (N, 4) uncertainties of the kept boxes, read at their anchors (``sources``)."""
    return uncertainty_of(model.head.mdn, towers, found)


def uncertainty_of(
    mdn: MixtureDensityHead, towers: list[tuple[Tensor, Tensor]], found: list[dict[str, Tensor]]
) -> list[Tensor]:
    """:func:`uncertainty_at` of a mixture head on any backend's (class, box) tower outputs
    whose anchor rows are location-major, anchor-minor (torchvision's and mmdet's order)."""
    mix = mdn([c for c, _ in towers], [r for _, r in towers])
    return [
        mixture_uncertainty(mix.rows(b).rows(f["sources"]), f["labels"])
        for b, f in enumerate(found)
    ]
