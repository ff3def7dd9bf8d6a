"""Per-box uncertainty scores on class distributions. Higher = more informative.

Every score function maps probabilities ``(N, K)`` (rows sum to 1) to scores ``(N,)``. Which
distribution a box is scored on is the scorer's ``distribution`` choice (see
:data:`DISTRIBUTIONS` and :func:`distribution`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from alrun.acquisition.match import paired_iou
from alrun.params import NonNegativeFloat


def foreground(probs: Tensor) -> Tensor:
    """Drop the background column (last, by alrun's convention) and renormalise the rest.

    Uncertainty *between object classes* is what these scores are about; how likely a box is
    background is the detector's confidence, used as the score threshold and aggregator weight.
    """
    fg = probs[:, :-1]
    return fg / fg.sum(dim=1, keepdim=True).clamp_min(1e-12)


def binary(class_probs: Tensor, labels: Tensor) -> Tensor:
    """The box's own detection probability as a Bernoulli ``(p, 1 - p)``, ``p`` the head's
    probability of the predicted class (DCUS / ALDD view, what PPAL scores).

    Meaningful for any number of classes, one included: a box the detector is unsure is an
    object at all scores high.
    """
    p = class_probs.gather(1, labels.long().reshape(-1, 1)).clamp(0.0, 1.0)
    return torch.cat([p, 1.0 - p], dim=1)


#: ``strategy.scorer.distribution`` choices.
DISTRIBUTIONS = ("binary", "with_background", "foreground")


def distribution(name: str, probs: Tensor, class_probs: Tensor | None, labels: Tensor) -> Tensor:
    """The per-box distribution ``name`` from a detector's outputs (alrun.types.Detections):

    * ``binary``: :func:`binary` on ``class_probs`` (the head's own probabilities);
    * ``with_background``: the C+1 distribution ``probs`` (softmax heads only);
    * ``foreground``: :func:`foreground` - class-vs-class confusion only. With one class it is
      constant (every box scores 0), which is why it is not the default.
    """
    if name == "binary":
        return binary(class_probs if class_probs is not None else probs[:, :-1], labels)
    if name == "with_background":
        return probs
    if name == "foreground":
        return foreground(probs)
    raise ValueError(f"unknown distribution '{name}'")


def least_confidence(probs: Tensor) -> Tensor:
    """1 - max_c p_c (Lewis & Gale 1994; for detection: Brust et al. 2019)."""
    return 1.0 - probs.max(dim=1).values


def margin(probs: Tensor) -> Tensor:
    """1 - (p_(1) - p_(2)): small margin between the two best classes = high score
    (Scheffer et al. 2001). With a single class the margin is p_(1) itself."""
    if probs.shape[1] < 2:
        return 1.0 - probs[:, 0]
    top2 = probs.topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy -sum p log p in nats (Settles 2009; Roy et al. 2018 for detection)."""
    logp = torch.log(probs.clamp_min(1e-12))
    return -(probs * logp).sum(dim=1)


# --- multi-pass scores (MC dropout, ensembles, test-time views) ---------------------------
# Each is a plain function of tensors. ``PassUncertainty`` (alrun.acquisition.strategies)
# calls it with the arguments its parameter names ask for:
#   pass_probs (N, T, K)  each reference box's distribution in each of T passes, taken from the
#                         matched box of that pass (alrun.acquisition.match: unmatched =
#                         background)
#   ref_probs  (N, K)     the reference (deterministic, un-augmented) pass's distribution
#   iou        (N, T)     overlap of the matched box with the reference box (0: unmatched)
#   pass_boxes (N, T, 4)  the matched boxes (xyxy; unmatched rows are zeros)
#   matched    (N, T)     bool, whether the pass had a matching box
#   boxes, proposals (N, 4), confidence (N,): the reference box, the proposal it was regressed
#                         from (two-stage heads only) and its max class probability


def _entropy_last(probs: Tensor) -> Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)


def entropy_of_mean(pass_probs: Tensor) -> Tensor:
    """Entropy of the mean distribution over passes (MC-dropout / ensemble entropy)."""
    return entropy(pass_probs.mean(dim=1))


def mutual_information(pass_probs: Tensor) -> Tensor:
    """BALD: entropy of the mean minus the mean of the per-pass entropies (Houlsby et al. 2011;
    for detection Haussmann et al. 2020). The epistemic part; 0 when every pass agrees."""
    mean_of_entropies = _entropy_last(pass_probs).mean(dim=1)
    return (entropy_of_mean(pass_probs) - mean_of_entropies).clamp_min(0.0)


def variation_ratio(pass_probs: Tensor) -> Tensor:
    """1 - (passes voting for the modal class) / T (Freeman 1965; Gal et al. 2017)."""
    votes = pass_probs.argmax(dim=-1)  # (N, T)
    counts = torch.nn.functional.one_hot(votes, pass_probs.shape[-1]).sum(dim=1)  # (N, K)
    return 1.0 - counts.max(dim=1).values.to(pass_probs.dtype) / pass_probs.shape[1]


def margin_of_mean(pass_probs: Tensor) -> Tensor:
    """:func:`margin` of the mean distribution over passes."""
    return margin(pass_probs.mean(dim=1))


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between rows of ``p`` and ``q`` (..., K)."""
    m = 0.5 * (p + q)
    return _entropy_last(m) - 0.5 * (_entropy_last(p) + _entropy_last(q))


def augmentation_inconsistency(
    ref_probs: Tensor, pass_probs: Tensor, iou: Tensor, box_weight: NonNegativeFloat = 1.0
) -> Tensor:
    """Mean over views of ``JS(ref, view) + box_weight * (1 - IoU(ref box, view box))``:
    alrun's own disagreement of the class distribution and of the box under test-time
    augmentation (after Elezi et al. 2022). Not CALD's formula: that is ``strategy=cald``
    (:mod:`alrun.acquisition.cald`)."""
    js = js_divergence(ref_probs.unsqueeze(1).expand_as(pass_probs), pass_probs)  # (N, T)
    return (js + box_weight * (1.0 - iou)).mean(dim=1)


def localization_instability(iou: Tensor) -> Tensor:
    """1 - localization stability (Kao et al. 2018): 1 - mean IoU between the reference box and
    its matches under Gaussian input noise. Kao's image score weights boxes by their max class
    probability: use it with ``aggregator: weighted``."""
    return 1.0 - iou.mean(dim=1)


def localization_tightness(proposals: Tensor, boxes: Tensor, confidence: Tensor) -> Tensor:
    """1 - |T + P - 1| with T = IoU(proposal, final box) and P the max class probability (Kao et
    al. 2018): high when tightness and confidence disagree. Kao select the image of the
    smallest |T + P - 1|: ``aggregator: max``. Two-stage detectors only (needs proposals)."""
    tightness = paired_iou(proposals, boxes)
    return 1.0 - (tightness + confidence - 1.0).abs()


def box_disagreement(
    pass_boxes: Tensor, matched: Tensor, reduce: Literal["min", "mean"] = "min"
) -> Tensor:
    """1 - the ``min`` or ``mean`` pairwise IoU of the matched boxes of the passes (ensemble
    localization disagreement, Schmidt et al. 2020). A pass without a match overlaps every
    other pass by 0. Needs T >= 2."""
    t = pass_boxes.shape[1]
    if t < 2:
        raise ValueError("box_disagreement needs at least 2 passes")
    pairs = paired_iou(pass_boxes.unsqueeze(2), pass_boxes.unsqueeze(1))  # (N, T, T)
    both = matched.unsqueeze(2) & matched.unsqueeze(1)
    pairs = torch.where(both, pairs, torch.zeros_like(pairs))
    upper = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    values = pairs[:, upper]  # (N, T(T-1)/2)
    if reduce == "min":
        return 1.0 - values.min(dim=1).values
    if reduce == "mean":
        return 1.0 - values.mean(dim=1)
    raise ValueError(f"box_disagreement: reduce must be 'min' or 'mean', got '{reduce}'")
