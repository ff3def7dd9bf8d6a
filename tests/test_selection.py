"""The acquisition step says when a strategy could not tell the pool's images apart."""

from __future__ import annotations

import logging
import math

import pytest

from alrun.progress import Reporter
from alrun.selection import select_round, tie_warning
from alrun.supervision.base import LabelRequest
from tests.test_streaming import _trained


def _first_selection(caplog, *overrides: str):
    """Round 0 trained 2 iterations on the smoke data, then the real acquisition step."""
    exp, pool = _trained("entropy", *overrides, keep_every_box=False)
    with caplog.at_level(logging.WARNING, logger="alrun"):
        return select_round(exp, pool, 0, Reporter(True), LabelRequest(1, (), exp.detector))


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
