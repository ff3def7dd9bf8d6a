"""BADGE for detection (Ash et al. 2020; Haussmann et al. 2020): hallucinated gradient
embeddings, then k-means++ in gradient space.

For a box with feature ``f`` (D,) and class probabilities ``p``, the gradient of the
classification loss with the *predicted* class as label, w.r.t. a linear last layer on ``f``,
is ``(p - onehot(pred)) outer f`` - in closed form, no backward pass:

* softmax heads (Faster R-CNN): ``p`` is the C+1 softmax; ``f`` is the box head's output,
  which *is* the input of ``cls_score`` (a Linear), so this is the exact gradient of the
  cross-entropy w.r.t. that layer's weight;
* sigmoid heads (FCOS, RetinaNet, the tiny FCOS): ``p`` are the C sigmoids, the loss binary
  cross-entropy per class; ``f`` is the FPN feature at the box's anchor, the input of the
  classification *tower*, not of its last conv, so this is the gradient for a linear probe on
  the box features (the last conv's own input would need a forward hook on the tower).

Per image the box gradients (boxes with score >= ``score_threshold``, each anchor/proposal
once) are summed (``aggregate: sum``; ``mean`` for the average); an image without such a box
has the zero embedding (nothing to learn from its detections).

Seeding follows BADGE's reference code (JordanAsh/badge ``init_centers``): the first centre is
the embedding of largest norm, every next one is drawn with probability proportional to its
squared distance to the nearest centre so far (plain D^2 sampling, no greedy local trials).
``seeding: kmeans_plusplus`` uses scikit-learn's k-means++ instead (random first centre,
greedy local trials), alrun's choice before. Where every remaining embedding coincides with a
centre (the reference stops in the debugger there), the rest are taken in a seeded order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import KMeansPlusPlus
from alrun.acquisition.strategies import unique_sources
from alrun.errors import AlrunError
from alrun.params import ScoreThreshold
from alrun.types import Needs

AGGREGATES = ("sum", "mean")
SEEDINGS = ("badge", "kmeans_plusplus")


def badge_seeding_order(x: np.ndarray, k: int, seed: int) -> list[int]:
    """``k`` distinct rows of ``x`` in BADGE's seeding order (see the module docstring)."""
    n = len(x)
    k = min(int(k), n)
    if k <= 0:
        return []
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    first = int(np.argmax(np.linalg.norm(x, axis=1)))
    order = [first]
    dist = np.linalg.norm(x - x[first], axis=1)
    while len(order) < k:
        d2 = dist**2
        d2[order] = 0.0
        total = d2.sum()
        if not total > 0:  # only duplicates of centres left
            rest = [i for i in rng.permutation(n).tolist() if i not in set(order)]
            order.extend(rest[: k - len(order)])
            break
        nxt = int(rng.choice(n, p=d2 / total))
        order.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return order


def box_gradients(probs: Tensor, labels: Tensor, feats: Tensor) -> Tensor:
    """(B, K * D): ``(probs - onehot(labels)) outer feats`` row by row; K = probs' width."""
    residual = probs.double().clone()
    residual[torch.arange(len(labels)), labels.long()] -= 1.0
    return (residual[:, :, None] * feats.double()[:, None, :]).reshape(len(labels), -1)


def gradient_embeddings(
    batch: PredictionBatch,
    rows: Sequence[int],
    score_threshold: float = 0.05,
    aggregate: str = "sum",
    block_boxes: int = 8192,
) -> Tensor:
    """(len(rows), K * D) per-image gradient embeddings of the images at ``rows``."""
    if batch.feats is None:
        raise AlrunError(
            "strategy.selector: BADGE needs box features (needs.feats) but the detector "
            "returned none; choose a detector with box features or another strategy"
        )
    sigmoid = batch.head == "sigmoid"
    probs = batch.class_probs if sigmoid else batch.probs
    if probs is None:
        raise AlrunError("strategy.selector: BADGE needs class probabilities (needs.probs)")
    if aggregate not in AGGREGATES:
        raise AlrunError(f"strategy.selector.aggregate: expected one of {AGGREGATES}")
    position = torch.full((len(batch),), -1, dtype=torch.int64)
    position[torch.as_tensor(list(rows), dtype=torch.int64)] = torch.arange(len(rows))
    keep = unique_sources(batch, (position[batch.segment] >= 0) & (batch.scores >= score_threshold))
    idx = torch.nonzero(keep).flatten()
    width = probs.shape[1] * batch.feats.shape[1]
    out = torch.zeros((len(rows), width), dtype=torch.float64)
    for start in range(0, len(idx), block_boxes):
        block = idx[start : start + block_boxes]
        grads = box_gradients(probs[block], batch.labels[block], batch.feats[block])
        out.index_add_(0, position[batch.segment[block]], grads)
    if aggregate == "mean":
        counts = torch.bincount(position[batch.segment[idx]], minlength=len(rows))
        out /= counts.clamp_min(1)[:, None]
    if not bool(torch.isfinite(out).all()):
        raise AlrunError("strategy.selector: BADGE gradient embeddings contain NaN or inf")
    return out


class Badge(KMeansPlusPlus):
    """k-means++ seeding over per-image gradient embeddings (see the module docstring)."""

    def __init__(
        self,
        score_threshold: ScoreThreshold = 0.05,
        aggregate: Literal[AGGREGATES] = "sum",
        seeding: Literal[SEEDINGS] = "badge",
    ):
        if not 0.0 <= score_threshold < 1.0:
            raise AlrunError(
                f"strategy.selector.score_threshold: expected a number in [0, 1), got "
                f"{score_threshold}"
            )
        if aggregate not in AGGREGATES:
            raise AlrunError(
                f"strategy.selector.aggregate: expected one of {AGGREGATES}, got '{aggregate}'"
            )
        if seeding not in SEEDINGS:
            raise AlrunError(
                f"strategy.selector.seeding: expected one of {'|'.join(SEEDINGS)}, got '{seeding}'"
            )
        self.score_threshold = float(score_threshold)
        self.aggregate = aggregate
        self.seeding = seeding
        super().__init__(self._features, Needs(probs=True, feats=True), name="badge")

    def _features(self, context: AcquisitionContext, ids: Sequence[str]) -> Tensor:
        row = {i: n for n, i in enumerate(context.preds.image_ids)}
        return gradient_embeddings(
            context.preds, [row[i] for i in ids], self.score_threshold, self.aggregate
        )

    def seeding_order(self, x: np.ndarray, k: int, seed: int) -> list[int]:
        if self.seeding == "badge":
            return badge_seeding_order(x, k, seed)
        return super().seeding_order(x, k, seed)

    def describe(self) -> dict[str, Any]:
        return {
            "selector": "badge",
            "badge_score_threshold": self.score_threshold,
            "badge_aggregate": self.aggregate,
            "badge_seeding": self.seeding,
        }
