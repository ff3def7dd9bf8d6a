"""The acquisition step says when a strategy could not tell the pool's images apart."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from alrun.loop import build_experiment, derive_seed, initial_selection
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.seeding import Purpose
from alrun.selection import select_round, tie_warning
from alrun.supervision.base import LabelRequest
from tests.helpers import compose_config
from tests.test_streaming import TINY


def _first_selection(caplog, *overrides: str):
    """Round 0 trained 2 iterations on the smoke data, then the real acquisition step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = build_experiment(compose_config([*TINY, "strategy=entropy", *overrides]))
        pool = LabelPool(exp.splits.pool.visible())
        picked = initial_selection(exp, pool)
        pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
        seed = derive_seed(exp.seed, 0, Purpose.TRAIN)
        exp.regime.train(exp.detector, pool, exp.schedule, seed, 0, None, strategy=exp.training)
        with caplog.at_level(logging.WARNING, logger="alrun"):
            return select_round(exp, pool, 0, Reporter(True), LabelRequest(1, (), exp.detector))
    finally:
        torch.set_num_threads(threads)


def test_a_model_that_finds_nothing_is_said_to_pick_by_tie_break(caplog):
    # the preset's score threshold on a 2-iteration model: no box kept, every image `empty`
    step = _first_selection(caplog, "strategy.scorer.score_threshold=0.99")
    assert set(step.scores.values()) == {-math.inf}
    assert step.selection.image_ids  # it still picks, by the seeded tie-break
    lines = [r.getMessage() for r in caplog.records if "tie-break" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("strategy=entropy: all 26 candidate images")


def test_scores_that_differ_say_nothing(caplog):
    step = _first_selection(caplog, "strategy.scorer.score_threshold=0.0")
    assert len(set(step.scores.values())) > 1
    assert not [r for r in caplog.records if "tie-break" in r.getMessage()]


@pytest.mark.parametrize(
    ("scores", "picked", "warned"),
    [
        ({"a": 0.5, "b": 0.5, "c": 0.5}, 1, True),
        ({"a": math.nan, "b": math.nan}, 1, True),
        ({"a": 0.5, "b": 0.4, "c": 0.5}, 1, False),
        ({"a": 0.5, "b": 0.5}, 2, False),  # the whole pool is bought: no choice was made
        ({}, 0, False),
    ],
)
def test_tie_warning(scores, picked, warned):
    assert (tie_warning("x", scores, picked) is not None) is warned
