"""Named random streams: every seeded draw in alrun says what it is for.

A stream is fixed by ``(run seed, round, purpose)``; two purposes must never share a value, or
two decisions (say the random baseline's scores and the tie-break order) would draw the same
numbers. The values are the hex constants the modules used before this enum, kept so that
selections stay bit-identical across the change.
"""

from __future__ import annotations

import enum


@enum.unique
class Purpose(enum.IntEnum):
    """What a seeded stream draws (the third entry of its ``SeedSequence``)."""

    TRAIN = 1  # a round's training: init, batch order, augmentation (loop.derive_seed)
    RANDOM_SCORE = 0x5E1EC7  # RandomScore: the random baseline's scores
    TIE_BREAK = 0x71E  # AcquisitionContext.tie_order: ties broken by a seeded permutation
    DIVERSITY = 0xD1CE  # k-center's first centre, k-means++ seeding
    CCMS = 0xCC35  # CCMS k-centroid's first centre
    BOX_IN_BOX = 0xB1B  # BiB's k-means++ over box-in-box pairs
    LOSS_SUBSET = 0x1055  # learning loss: the random pool subset it ranks
    ENSEMBLE_MEMBER = 0xE45E  # an ensemble member's own seed (init and batch order)
