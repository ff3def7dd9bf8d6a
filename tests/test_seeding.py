"""Named random streams: unique purposes, and the same draws as the hex constants they replaced."""

from __future__ import annotations

import ast

import numpy as np

from alrun.acquisition.diversity import KCenterGreedy, KMeansPlusPlus
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import RandomScore
from alrun.detectors.passes import member_seed
from alrun.loop import derive_seed
from alrun.seeding import Purpose
from tests.acquisition.test_diversity import embedded_context, uniform
from tests.helpers import REPO


def test_purposes_are_unique_and_keep_their_old_values():
    values = [p.value for p in Purpose]
    assert len(values) == len(set(values)) == len(Purpose.__members__)
    assert Purpose.RANDOM_SCORE == 0x5E1EC7 and Purpose.TIE_BREAK == 0x71E
    assert Purpose.DIVERSITY == 0xD1CE and Purpose.ENSEMBLE_MEMBER == 0xE45E


def test_every_rng_call_names_a_purpose():
    """``context.rng(...)`` and ``derive_seed(...)`` take a Purpose member, never a bare number."""
    bare = []
    for path in sorted((REPO / "alrun").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("rng", "derive_seed") and isinstance(node.args[-1], ast.Constant):
                bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bare == []


def test_a_demo_selection_is_unchanged_by_the_enum():
    """Pinned from the code before the enum (hex constants): bit-identical selections."""
    pool = np.random.default_rng(0).normal(size=(30, 3))
    ctx = embedded_context(pool, budget=4, seed=7)
    assert TopK()(RandomScore()(ctx), ctx) == ["img14", "img29", "img4", "img7"]
    kcenter = KCenterGreedy(from_labelled=False)(uniform(ctx.pool_ids), ctx)
    assert kcenter == ["img16", "img4", "img20", "img19"]
    assert KMeansPlusPlus()(uniform(ctx.pool_ids), ctx) == ["img4", "img6", "img5", "img29"]
    assert [ctx.tie_rank()[f"img{i}"] for i in range(5)] == [12, 17, 9, 4, 16]
    assert member_seed(7, 1) == 748333640
    assert derive_seed(7, 2, Purpose.TRAIN) == 530400660
