"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, gradient times ``-lambda`` back.

Put between a feature extractor and a domain classifier, it makes one optimiser step train the
classifier to tell the domains apart and the features to make them indistinguishable.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.strength, None


def reverse_gradient(x: Tensor, strength: float = 1.0) -> Tensor:
    """``x`` unchanged; the gradient flowing back through it is multiplied by ``-strength``."""
    return _GradientReversal.apply(x, float(strength))


def grl_schedule(progress: float, gamma: float = 10.0) -> float:
    """Ganin's ramp of the reversal strength from 0 to 1 over training (``progress`` in [0, 1]):
    ``2 / (1 + exp(-gamma p)) - 1``, so the noisy early domain signal barely moves the features."""
    return float(2.0 / (1.0 + torch.exp(torch.tensor(-gamma * progress))) - 1.0)
