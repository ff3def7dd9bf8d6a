"""Diversity selectors in feature space: k-center greedy core-set, k-means++ seeding.

Both work on image embeddings (``context.preds.embeddings``) by default; the candidates are the
images present in ``scores`` (so a scorer's ``empty: skip`` and the two-phase pre-selection
restrict them). Memory is O(N * d): distances are computed in row chunks, never as an N x N
matrix.

k-center greedy (Sener & Savarese 2018) repeatedly picks the point farthest from every centre so
far, starting from the labelled set. Done naively, each pick is one pass over the N x d matrix
(memory-bound: ~66 ms for 10^6 x 256 on 2 cores, so 10,000 picks take > 11 min).
:func:`k_center_greedy` makes the same picks with far fewer passes: it keeps the ``candidates``
points of largest current distance, picks greedily among them while the best updated candidate
still beats the largest distance outside them (distances only ever shrink, so it is then the
true farthest point), and updates all N points for the whole batch of picks at once (one GEMM
per pass instead of one matrix-vector product per pick).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import numpy as np
import torch
from torch import Tensor

from alrun.acquisition.context import AcquisitionContext, Selector
from alrun.acquisition.select import fill_budget, pool_ranking
from alrun.errors import AlrunError
from alrun.params import PositiveInt, Range
from alrun.seeding import Purpose
from alrun.types import Needs

log = logging.getLogger("alrun")


# --------------------------------------------------------------------------------------------
# squared Euclidean distances, chunked
# --------------------------------------------------------------------------------------------


def _sq_norms(x: Tensor, chunk_rows: int) -> Tensor:
    out = torch.empty(len(x), dtype=x.dtype)
    for start in range(0, len(x), chunk_rows):
        rows = x[start : start + chunk_rows]
        out[start : start + chunk_rows] = (rows * rows).sum(dim=1)
    return out


def min_sq_dist_update(
    x: Tensor, x_norms: Tensor, centers: Tensor, mind: Tensor, chunk_rows: int = 65536
) -> None:
    """``mind = min(mind, min_c ||x - c||^2)`` in place, ``chunk_rows`` rows of ``x`` at a time
    (peak extra memory ``chunk_rows x len(centers)`` floats)."""
    if len(centers) == 0:
        return
    c_norms = (centers * centers).sum(dim=1)
    centers_t = centers.t().contiguous()
    for start in range(0, len(x), chunk_rows):
        stop = min(start + chunk_rows, len(x))
        d2 = torch.addmm(c_norms[None, :], x[start:stop], centers_t, alpha=-2.0)
        d2.add_(x_norms[start:stop, None])
        torch.minimum(mind[start:stop], d2.amin(dim=1).clamp_min_(0.0), out=mind[start:stop])


def k_center_greedy(
    x: Tensor,
    k: int,
    start: Tensor | None = None,
    first: int = 0,
    candidates: int = 4096,
    max_batch: int = 256,
    chunk_rows: int = 65536,
) -> list[int]:
    """Indices of ``k`` rows of ``x`` (N, d) picked by greedy k-center (farthest-first).

    ``start`` (L, d): centres already chosen (the labelled set); when it is empty the first pick
    is row ``first``. Returns the picks in order; identical to :func:`naive_k_center_greedy` up
    to floating-point ties. Memory: ``x`` plus O(N) vectors plus a ``chunk_rows x max_batch``
    block; never N x N.
    """
    n = len(x)
    k = min(int(k), n)
    if k <= 0:
        return []
    if candidates < 1 or max_batch < 1 or chunk_rows < 1:
        raise AlrunError("strategy.selector: candidates, max_batch and chunk_rows must be >= 1")
    x = x.contiguous()
    norms = _sq_norms(x, chunk_rows)
    mind = torch.full((n,), math.inf, dtype=x.dtype)
    picked: list[int] = []
    if start is not None and len(start) > 0:
        start = start.to(x.dtype)
        for s in range(0, len(start), max_batch):
            min_sq_dist_update(x, norms, start[s : s + max_batch], mind, chunk_rows)
    else:
        picked.append(int(first))
        min_sq_dist_update(x, norms, x[first : first + 1], mind, chunk_rows)
        mind[first] = -1.0
    while len(picked) < k:
        m = min(candidates, n)
        top = torch.topk(mind, min(m + 1, n))
        idx, vals = top.indices[:m], top.values[:m].clone()
        outside = float(top.values[m]) if m < n else -math.inf
        cand_x = x[idx]
        cand_norms = norms[idx]
        batch: list[int] = []
        while len(batch) < max_batch and len(picked) + len(batch) < k:
            j = int(torch.argmax(vals))
            if batch and float(vals[j]) <= outside:
                break  # a point outside the candidates may now be farther: refresh
            if float(vals[j]) < 0:
                break  # every candidate is picked already
            batch.append(j)
            c = cand_x[j : j + 1]
            d2 = torch.addmm((c * c).sum(dim=1)[None, :], cand_x, c.t(), alpha=-2.0)
            d2 = d2[:, 0].add_(cand_norms).clamp_min_(0.0)
            torch.minimum(vals, d2, out=vals)
            vals[j] = -1.0
        if not batch:  # only already-picked points left (cannot happen while len(picked) < n)
            break
        chosen = idx[torch.tensor(batch)]
        min_sq_dist_update(x, norms, x[chosen], mind, chunk_rows)
        mind[chosen] = -1.0
        picked.extend(int(i) for i in chosen)
    return picked


def naive_k_center_greedy(
    x: Tensor, k: int, start: Tensor | None = None, first: int = 0
) -> list[int]:
    """Reference: one full pass over ``x`` per pick (O(N d) memory, O(k N d) time)."""
    n = len(x)
    k = min(int(k), n)
    norms = (x * x).sum(dim=1)
    mind = torch.full((n,), math.inf, dtype=x.dtype)
    picked: list[int] = []
    if start is not None and len(start) > 0:
        min_sq_dist_update(x, norms, start.to(x.dtype), mind, n)
    else:
        picked.append(int(first))
        min_sq_dist_update(x, norms, x[first : first + 1], mind, n)
        mind[first] = -1.0
    while len(picked) < k:
        j = int(torch.argmax(mind))
        picked.append(j)
        min_sq_dist_update(x, norms, x[j : j + 1], mind, n)
        mind[j] = -1.0
    return picked


def kmeans_plusplus_order(x: np.ndarray, k: int, seed: int) -> list[int]:
    """``k`` distinct row indices of ``x`` in k-means++ seeding order (D^2 sampling, greedy
    local trials: scikit-learn's :func:`~sklearn.cluster.kmeans_plusplus`).

    When ``x`` has fewer distinct rows than ``k``, sampling can return a row twice; repeats are
    dropped and the order is completed with the not-yet-picked rows in a seeded order.
    """
    from sklearn.cluster import kmeans_plusplus

    n = len(x)
    k = min(int(k), n)
    if k <= 0:
        return []
    x = np.ascontiguousarray(x, dtype=np.float64)
    _, indices = kmeans_plusplus(x, n_clusters=k, random_state=int(seed))
    order = list(dict.fromkeys(int(i) for i in indices))
    if len(order) < k:
        rest = [i for i in np.random.default_rng(seed).permutation(n).tolist() if i not in order]
        order.extend(rest[: k - len(order)])
    return order


# --------------------------------------------------------------------------------------------
# selectors
# --------------------------------------------------------------------------------------------


def check_scores(scores: Mapping[str, float]) -> None:
    for image_id, score in scores.items():
        if math.isnan(score):
            raise AlrunError(f"strategy: score of image '{image_id}' is NaN")


def affordable_count(ids: Sequence[str], context: AcquisitionContext) -> int:
    """The most images of ``ids`` the budget can buy (cheapest first): how many picks a
    diversity selector needs to order before :func:`fill_budget` takes its share."""
    if math.isinf(context.budget):
        return len(ids)
    spent, count = 0.0, 0
    for cost in sorted(context.cost_of(i) for i in ids):
        if spent + cost > context.budget + 1e-9:
            break
        spent += cost
        count += 1
    return count


def candidate_ids(scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
    """Images with a score that the predictions cover, in prediction order."""
    if context.preds is None:
        raise AlrunError("strategy.selector: needs pool predictions, the loop passed none")
    return [i for i in context.preds.image_ids if i in scores]


def embeddings_of(ids: Sequence[str], context: AcquisitionContext) -> Tensor:
    emb = None if context.preds is None else context.preds.embeddings
    if emb is None:
        raise AlrunError(
            "strategy.selector: needs image embeddings but the detector returned none; "
            "choose a detector with the embeddings capability or another strategy"
        )
    row = {i: n for n, i in enumerate(context.preds.image_ids)}
    out = emb[[row[i] for i in ids]].float()
    if not bool(torch.isfinite(out).all()):
        raise AlrunError("strategy.selector: image embeddings contain NaN or inf")
    return out


class KCenterGreedy:
    """Greedy k-center core-set on image embeddings, started from the labelled set
    (``from_labelled``); the first pick without a labelled set is a seeded random image.

    Costs: the greedy order is computed for as many images as the budget could buy, then
    filled by the budget's ``fill`` policy (with unit costs: exactly the greedy picks).
    """

    def __init__(
        self,
        from_labelled: bool = True,
        candidates: PositiveInt = 4096,
        max_batch: PositiveInt = 256,
        chunk_rows: PositiveInt = 65536,
    ):
        self.from_labelled = bool(from_labelled)
        self.candidates = int(candidates)
        self.max_batch = int(max_batch)
        self.chunk_rows = int(chunk_rows)
        self.needs = Needs(detections=False, embedding=True, labelled_embeddings=self.from_labelled)

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        check_scores(scores)
        ids = candidate_ids(scores, context)
        if not ids:
            return []
        x = embeddings_of(ids, context)
        start = context.labelled_embeddings if self.from_labelled else None
        if start is not None and start.shape[1:] != x.shape[1:]:
            raise AlrunError(
                f"strategy.selector: labelled embeddings have shape {tuple(start.shape)}, "
                f"pool embeddings {tuple(x.shape)}"
            )
        first = int(context.rng(Purpose.DIVERSITY).integers(len(ids)))
        order = k_center_greedy(
            x,
            affordable_count(ids, context),
            start,
            first,
            self.candidates,
            self.max_batch,
            self.chunk_rows,
        )
        return fill_budget([ids[i] for i in order], context.budget, context.cost_of, context.fill)

    def describe(self) -> dict[str, Any]:
        return {"selector": "k_center_greedy", "from_labelled": self.from_labelled}


class KMeansPlusPlus:
    """k-means++ seeding over per-image features: image embeddings, or ``features(context,
    ids) -> (len(ids), D)`` (e.g. BADGE gradient embeddings); picks in seeding order."""

    def __init__(
        self,
        features: Callable[[AcquisitionContext, Sequence[str]], Tensor] | None = None,
        needs: Needs | None = None,
        name: str = "kmeans_pp",
    ):
        self.features = features
        self.name = name
        self.needs = needs or Needs(detections=False, embedding=True)

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        check_scores(scores)
        ids = candidate_ids(scores, context)
        if not ids:
            return []
        if self.features is None:
            x = embeddings_of(ids, context)
        else:
            x = self.features(context, ids)
        if not bool(torch.isfinite(x).all()):
            raise AlrunError(f"strategy.selector: {self.name} features contain NaN or inf")
        seed = int(context.rng(Purpose.DIVERSITY).integers(2**31 - 1))
        order = self.seeding_order(x.double().numpy(), affordable_count(ids, context), seed)
        return fill_budget([ids[i] for i in order], context.budget, context.cost_of, context.fill)

    def seeding_order(self, x: np.ndarray, k: int, seed: int) -> list[int]:
        """The pick order over the rows of ``x`` (subclasses may seed differently)."""
        return kmeans_plusplus_order(x, k, seed)

    def describe(self) -> dict[str, Any]:
        return {"selector": self.name}


class TwoPhase:
    """Score, keep the best ``expand_ratio x budget`` (by cost, in the budget unit), then let
    ``diversity`` pick inside that candidate set (PPAL's scheme; expand ratio 4 by default)."""

    def __init__(self, diversity: Selector, expand_ratio: Annotated[float, Range(1)] = 4.0):
        if not expand_ratio >= 1.0:
            raise AlrunError(
                f"strategy.selector.expand_ratio: expected a number >= 1, got {expand_ratio}"
            )
        self.diversity = diversity
        self.expand_ratio = float(expand_ratio)
        self.needs = getattr(diversity, "needs", Needs(detections=False))
        self.last_candidates = 0

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        keep = self.candidates(scores, context)
        return self.diversity({i: scores[i] for i in keep}, context)

    def candidates(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        """The first phase: the best-scored images within ``expand_ratio x budget`` (a
        streamed pool predicts what the diversity stage reads for these only)."""
        check_scores(scores)
        order = pool_ranking(scores, context)
        wide = context.budget * self.expand_ratio
        keep = fill_budget(order, wide, context.cost_of, "skip")
        if len(keep) == len(order) and math.isfinite(context.budget):
            log.info(
                "two-phase: the candidate set (%d images) is the whole scored pool: the "
                "budget x expand_ratio covers it, so diversity alone decides",
                len(keep),
            )
        self.last_candidates = len(keep)
        return keep

    def describe(self) -> dict[str, Any]:
        inner = self.diversity.describe()
        return {
            "selector": "two_phase",
            "expand_ratio": self.expand_ratio,
            "candidates": self.last_candidates,
            "diversity": inner.get("selector", inner),
        }


class DistanceToLabelled:
    """Scorer: squared distance of each pool image's embedding to its nearest labelled image
    (the quantity k-center greedy maximises first); +inf with an empty labelled set."""

    needs = Needs(detections=False, embedding=True, labelled_embeddings=True)

    def __init__(self, chunk_rows: PositiveInt = 65536):
        self.chunk_rows = int(chunk_rows)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        if context.preds is None:
            raise AlrunError("strategy.scorer: needs pool embeddings, the loop passed none")
        ids = list(context.preds.image_ids)
        x = embeddings_of(ids, context)
        mind = torch.full((len(x),), math.inf, dtype=x.dtype)
        start = context.labelled_embeddings
        if start is not None and len(start):
            min_sq_dist_update(x, _sq_norms(x, self.chunk_rows), start.float(), mind)
        return dict(zip(ids, mind.tolist()))

    def describe(self) -> dict[str, Any]:
        return {"scorer": "distance_to_labelled"}
