"""What scorers and selectors see: one :class:`AcquisitionContext` per acquisition step.

Pool predictions arrive as a :class:`PredictionBatch`, a ragged batch (flat per-box tensors +
per-image offsets) built once, so no scorer or selector flattens a list of Detections by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from alrun.seeding import Purpose
from alrun.types import PER_BOX_FIELDS, Detections, Needs

_RAGGED = PER_BOX_FIELDS


@dataclass(frozen=True)
class PredictionBatch:
    """Detections of many images as flat per-box tensors; image i owns rows
    ``offsets[i]:offsets[i+1]``. Optional fields are None unless every image has them."""

    image_ids: tuple[str, ...]
    offsets: Tensor  # (I + 1,) int64
    boxes: Tensor  # (B, 4)
    scores: Tensor  # (B,)
    labels: Tensor  # (B,)
    probs: Tensor | None = None  # (B, C+1)
    class_probs: Tensor | None = None  # (B, C)
    feats: Tensor | None = None  # (B, D)
    proposals: Tensor | None = None  # (B, 4)
    sources: Tensor | None = None  # (B,)
    mdn: Tensor | None = None  # (B, 4) AL-MDN uncertainties (Detections.mdn)
    embeddings: Tensor | None = None  # (I, D)
    head: str = "softmax"
    # extra prediction passes (MC dropout, ensemble members, test-time views), each a batch of
    # the same images in the same order; () unless every image has the same number of passes
    passes: tuple[PredictionBatch, ...] = ()

    @classmethod
    def from_detections(cls, preds: Sequence[Detections]) -> PredictionBatch:
        counts = torch.tensor([len(d) for d in preds], dtype=torch.int64)
        offsets = torch.zeros(len(preds) + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)
        fields: dict[str, Any] = {}
        for name in _RAGGED:
            parts = [getattr(d, name) for d in preds]
            if preds and all(p is not None for p in parts):
                fields[name] = torch.cat(parts)
        for name in ("boxes", "scores", "labels"):
            fields.setdefault(name, torch.zeros((0, 4) if name == "boxes" else (0,)))
        embeddings = [d.embedding for d in preds]
        if preds and all(e is not None for e in embeddings):
            fields["embeddings"] = torch.stack(embeddings)
        heads = {d.head for d in preds}
        num_passes = {len(d.passes) for d in preds}
        if len(num_passes) == 1 and (t := num_passes.pop()) > 0:
            fields["passes"] = tuple(
                cls.from_detections([d.passes[i] for d in preds]) for i in range(t)
            )
        return cls(
            image_ids=tuple(d.image_id for d in preds),
            offsets=offsets,
            head=heads.pop() if len(heads) == 1 else "softmax",
            **fields,
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_boxes(self) -> int:
        return int(self.offsets[-1])

    @property
    def counts(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @cached_property  # read by every scorer of a round; computed once per batch
    def segment(self) -> Tensor:
        """(B,) image index of every box."""
        return torch.repeat_interleave(torch.arange(len(self)), self.counts)


@dataclass(frozen=True)
class AcquisitionContext:
    """Everything an acquisition step may use, handed to scorers *and* selectors.

    ``pool_ids``: the unlabelled images that may be picked. ``preds``: their predictions (None
    when the strategy needs no detections, e.g. random). ``budget`` / ``cost_of`` / ``fill``:
    this round's amount, the cost of one image in the budget unit, and the fill policy.
    ``labelled_ids`` / ``labelled_embeddings``: the labelled set (embeddings only when the
    strategy's ``needs.labelled_embeddings`` asks). ``history``: results rows of earlier rounds;
    ``selections``: ids picked in earlier rounds, oldest first.
    """

    pool_ids: tuple[str, ...]
    seed: int
    round: int
    budget: float = math.inf
    cost_of: Callable[[str], float] = field(default=lambda _id: 1.0)
    fill: str = "stop"
    preds: PredictionBatch | None = None
    labelled_ids: tuple[str, ...] = ()
    labelled_embeddings: Tensor | None = None
    history: tuple[Mapping[str, Any], ...] = ()
    selections: tuple[tuple[str, ...], ...] = ()
    #: predictions on the labelled images that have boxes, and those boxes (from the oracle, not
    #: hidden ground truth): ``{image_id: (boxes (N, 4) xyxy, labels (N,))}``; only when the
    #: strategy's ``needs.labelled_detections`` asks (per-class difficulty, missed objects)
    labelled_preds: PredictionBatch | None = None
    labelled_targets: Mapping[str, tuple[Tensor, Tensor]] | None = None
    #: the pixels of pool images, (3, H, W) in [0, 1], for scorers that run their own heads on
    #: them (MI-AOD); pixels only, never labels
    load_images: Callable[[Sequence[str]], list[Tensor]] | None = None
    #: box-level queries: the regions already asked in partly labelled pool images (queries and
    #: answers, (A, 4) xyxy), which may be asked about again elsewhere (alrun.regions)
    asked: Mapping[str, np.ndarray] | None = None

    def rng(self, purpose: Purpose) -> np.random.Generator:
        """A generator fixed by ``(seed, round, purpose)``; round -1 is the initial set."""
        return np.random.default_rng([self.seed, self.round + 1, int(purpose)])

    def tie_rank(self) -> dict[str, int]:
        """A seeded random order of the pool ids used to break score ties.

        Ties broken by image id would follow capture order on many datasets (file names are
        timestamps or sequence numbers), which is a systematic bias; a permutation drawn from
        ``(seed, round)`` is deterministic per seed and unrelated to names.
        """
        ordered, perm = self.tie_order()
        return {ordered[i]: rank for rank, i in enumerate(perm.tolist())}

    def tie_order(self) -> tuple[list[str], np.ndarray]:
        """:meth:`tie_rank` as the sorted pool ids and the seeded permutation of them:
        ``ordered[perm[r]]`` has tie rank r (no per-image dict, for a pool held in arrays)."""
        ordered = sorted(self.pool_ids)
        return ordered, self.rng(Purpose.TIE_BREAK).permutation(len(ordered))


@runtime_checkable
class Scorer(Protocol):
    """Scores the pool: image id -> score (higher = more worth labelling). Images left out of
    the mapping are never selected."""

    needs: Needs

    def __call__(self, context: AcquisitionContext) -> dict[str, float]: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class Selector(Protocol):
    """Turns scores into an ordered pick within ``context.budget``."""

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...
