"""Per-box uncertainty scores on class distributions. Higher = more informative.

Every function maps probabilities ``(N, K)`` (rows sum to 1) to scores ``(N,)``.
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
