"""Class distributions in alrun's order (C classes, then background), from either head type."""

from __future__ import annotations

import torch
from torch import Tensor


def with_background_last(logits: Tensor) -> Tensor:
    """Sigmoid-head logits (N, C) -> distribution over C classes + background (N, C+1)."""
    zeros = torch.zeros_like(logits[:, :1])
    return torch.softmax(torch.cat([logits, zeros], dim=1), dim=1)


def move_background_last(probs: Tensor) -> Tensor:
    """Softmax-head distributions (background in column 0) -> alrun's order (background last)."""
    return torch.cat([probs[:, 1:], probs[:, :1]], dim=1)
