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


# --- multi-pass scores: (N, T, K) pass distributions, hand-computed answers -----------------
from alrun.acquisition.scores import (  # noqa: E402
    augmentation_inconsistency,
    box_disagreement,
    entropy_of_mean,
    js_divergence,
    localization_instability,
    localization_tightness,
    margin_of_mean,
    mutual_information,
    variation_ratio,
)

#: box 0: two passes that disagree completely; box 1: two passes that agree on (0.5, 0.5)
DISAGREE_AGREE = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
#: one box, four passes: three say (0.9, 0.1), one (0.2, 0.8); mean (0.725, 0.275)
FOUR = torch.tensor([[[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.9, 0.1]]])


def test_entropy_of_mean_and_bald_separate_disagreement_from_shared_doubt():
    # both boxes have mean (0.5, 0.5): entropy of the mean ln 2 for both
    assert entropy_of_mean(DISAGREE_AGREE).tolist() == pytest.approx([math.log(2)] * 2)
    # BALD: box 0: ln 2 - mean(0, 0) = ln 2; box 1: ln 2 - mean(ln 2, ln 2) = 0
    assert mutual_information(DISAGREE_AGREE).tolist() == pytest.approx(
        [math.log(2), 0.0], abs=1e-6
    )


def test_four_pass_example():
    # H(0.725, 0.275) = 0.725 * 0.32158 + 0.275 * 1.29098 = 0.58817
    assert entropy_of_mean(FOUR).tolist() == pytest.approx([0.58817], abs=1e-4)
    # per-pass entropies: H(0.9, 0.1) = 0.32508 (x3), H(0.2, 0.8) = 0.50040
    # BALD = 0.58817 - (3 * 0.32508 + 0.50040) / 4 = 0.58817 - 0.36891 = 0.21926
    assert mutual_information(FOUR).tolist() == pytest.approx([0.21926], abs=1e-4)
    # votes 0, 0, 1, 0: modal class has 3 of 4 -> 1 - 3/4
    assert variation_ratio(FOUR).tolist() == pytest.approx([0.25])
    # margin of the mean: 1 - (0.725 - 0.275)
    assert margin_of_mean(FOUR).tolist() == pytest.approx([0.55])


def test_variation_ratio_and_margin_of_mean_on_two_passes():
    # box 0 votes 0 then 1: 1 - 1/2; box 1 ties -> argmax 0 twice: 0
    assert variation_ratio(DISAGREE_AGREE).tolist() == pytest.approx([0.5, 0.0])
    # both means are (0.5, 0.5): margin 1 - 0 = 1
    assert margin_of_mean(DISAGREE_AGREE).tolist() == pytest.approx([1.0, 1.0])


def test_js_divergence():
    p = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    q = torch.tensor([[0.0, 1.0], [0.3, 0.7]])
    # disjoint: H(0.5, 0.5) - (0 + 0) / 2 = ln 2; identical: 0
    assert js_divergence(p, q).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)


def test_augmentation_inconsistency_weights_the_box_term():
    ref = torch.tensor([[1.0, 0.0]])
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # view 1 agrees, view 2 flips the class
    iou = torch.tensor([[1.0, 0.5]])
    # view 1: JS 0 + w * 0; view 2: JS ln 2 + w * (1 - 0.5); mean over the 2 views
    got = augmentation_inconsistency(ref, views, iou).tolist()
    assert got == pytest.approx([(math.log(2) + 0.5) / 2])
    got = augmentation_inconsistency(ref, views, iou, box_weight=2.0).tolist()
    assert got == pytest.approx([(math.log(2) + 1.0) / 2])
    got = augmentation_inconsistency(ref, views, iou, box_weight=0.0).tolist()
    assert got == pytest.approx([math.log(2) / 2])


def test_localization_instability_is_one_minus_mean_iou():
    iou = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    assert localization_instability(iou).tolist() == pytest.approx([0.5, 0.0])


def test_localization_tightness():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0]] * 2)  # IoU 50 / 100 = 0.5
    confidence = torch.tensor([0.5, 0.9])
    # 1 - |0.5 + 0.5 - 1| = 1; 1 - |0.5 + 0.9 - 1| = 0.6
    assert localization_tightness(proposals, boxes, confidence).tolist() == pytest.approx(
        [1.0, 0.6]
    )


def test_box_disagreement_min_and_mean():
    a, b = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]
    boxes = torch.tensor([[a, b, a], [a, b, a]])
    matched = torch.tensor([[True, True, True], [True, True, False]])
    # box 0: IoU(a,b) 0.5, IoU(a,a) 1, IoU(b,a) 0.5 -> min 0.5, mean 2/3
    # box 1: pass 3 unmatched -> pairs 0.5, 0, 0 -> min 0, mean 1/6
    assert box_disagreement(boxes, matched, "min").tolist() == pytest.approx([0.5, 1.0])
    assert box_disagreement(boxes, matched, "mean").tolist() == pytest.approx([1 / 3, 5 / 6])
    with pytest.raises(ValueError):
        box_disagreement(boxes[:, :1], matched[:, :1])
