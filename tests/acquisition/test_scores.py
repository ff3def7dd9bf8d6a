import math

import pytest
import torch

from alrun.acquisition.scores import entropy, foreground, least_confidence, margin

UNIFORM4 = torch.full((1, 4), 0.25)
ONE_HOT = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
SKEWED = torch.tensor([[0.7, 0.2, 0.1]])


def test_uniform_over_four_classes():
    # entropy: -4 * 0.25 * ln 0.25 = ln 4; least confidence: 1 - 0.25; margin: 1 - (0.25 - 0.25)
    assert entropy(UNIFORM4).tolist() == pytest.approx([math.log(4)])
    assert least_confidence(UNIFORM4).tolist() == pytest.approx([0.75])
    assert margin(UNIFORM4).tolist() == pytest.approx([1.0])


def test_one_hot_is_certain():
    # entropy 0 (0 log 0 := 0), least confidence 1 - 1, margin 1 - (1 - 0)
    assert entropy(ONE_HOT).tolist() == pytest.approx([0.0], abs=1e-6)
    assert least_confidence(ONE_HOT).tolist() == pytest.approx([0.0])
    assert margin(ONE_HOT).tolist() == pytest.approx([0.0])


def test_skewed_distribution():
    # least confidence 1 - 0.7 = 0.3; margin 1 - (0.7 - 0.2) = 0.5
    # entropy -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) = 0.80182
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert entropy(SKEWED).tolist() == pytest.approx([expected])
    assert expected == pytest.approx(0.801819, abs=1e-6)
    assert least_confidence(SKEWED).tolist() == pytest.approx([0.3])
    assert margin(SKEWED).tolist() == pytest.approx([0.5])


def test_rows_are_scored_independently():
    probs = torch.cat([UNIFORM4, ONE_HOT, torch.tensor([[0.1, 0.2, 0.3, 0.4]])])
    # last row: least confidence 1 - 0.4, margin 1 - (0.4 - 0.3)
    assert least_confidence(probs).tolist() == pytest.approx([0.75, 0.0, 0.6])
    assert margin(probs).tolist() == pytest.approx([1.0, 0.0, 0.9])
    assert entropy(probs).shape == (3,)


def test_margin_single_class():
    # one class: the runner-up probability is 0, so the score is 1 - p_(1)
    probs = torch.tensor([[0.8], [1.0]])
    assert margin(probs).tolist() == pytest.approx([0.2, 0.0])


def test_foreground_drops_background_and_renormalises():
    # (0.3, 0.1 | bg 0.6) -> (0.3, 0.1) / 0.4 = (0.75, 0.25)
    probs = torch.tensor([[0.3, 0.1, 0.6], [0.5, 0.5, 0.0]])
    fg = foreground(probs)
    assert fg.shape == (2, 2)
    assert fg[0].tolist() == pytest.approx([0.75, 0.25])
    assert fg[1].tolist() == pytest.approx([0.5, 0.5])
    assert fg.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_foreground_all_background_row_stays_finite():
    fg = foreground(torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.isfinite(fg).all()
    assert fg.tolist() == [[0.0, 0.0]]
