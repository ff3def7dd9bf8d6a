"""Per-box uncertainty scores on class distributions. Higher = more informative.

Every score function maps probabilities ``(N, K)`` (rows sum to 1) to scores ``(N,)``. Which
distribution a box is scored on is the scorer's ``distribution`` choice (see
:data:`DISTRIBUTIONS` and :func:`distribution`).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
