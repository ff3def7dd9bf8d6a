"""Parity with BiB's reference code (github.com/huyvvo/BiB, commit 0509718):

* pairs: ``active_strategy/box_in_box_sampler.py`` ``BoxInBoxSampler.box_in_box_same_class``
  (``min_cover`` 0.8 on wetectron's ``boxlist_iou_async``, +1-pixel intersection over the small
  box's area; ``bib_min_area_ratio`` 3 on plain areas; ``ids[0]``: the first large box per small
  box) with ``find_confident_predictions_all_classes`` (score > ``score_thresh`` 0.5);
* selection: ``active_strategy/utils/kmeans_2plus_init_BiB.py`` ``_kmeans_plusplus`` (first the
  image with most pairs; then ``2 + int(log(n_groups))`` D^2-sampled candidates, the one whose
  image lowers the potential most wins).
Expected values are worked out by hand from those rules in the comments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alrun.acquisition.bib import BoxInBoxKMeansPP, bib_kmeanspp
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.heuristics import BoxInBox, bib_pairs
from alrun.errors import AlrunError
from alrun.types import Detections
from tests.helpers import compose_config


def _t(boxes):
    return torch.tensor(boxes, dtype=torch.float32)


def test_issue_19_small_box_in_slightly_larger_box_is_no_pair():
    # 10x10 inside 12x12: contained, but area 144 < 3 * 100 -> no pair (alrun before: 1)
    boxes = _t([[1, 1, 11, 11], [0, 0, 12, 12]])
    assert bib_pairs(boxes, torch.tensor([0, 0])) == []
    # the previous rule as options: containment 0.9, no area ratio
    assert bib_pairs(boxes, torch.tensor([0, 0]), 0.9, 1.0) == [(0, 1)]


def test_containment_uses_the_plus_one_pixel_convention():
    # small [0, 0, 9, 9], large [1, 0, 40, 40]: +1 intersection (9 - 1 + 1) * (9 - 0 + 1) = 90,
    # +1 area of the small box 10 * 10 = 100 -> 0.9 covered (plain: 8 * 9 / 81 = 0.889)
    boxes = _t([[0, 0, 9, 9], [1, 0, 40, 40]])
    assert bib_pairs(boxes, torch.tensor([0, 0]), containment=0.9) == [(0, 1)]
    # 4 px off: (9 - 4 + 1) * 10 / 100 = 0.6 < 0.8
    assert bib_pairs(_t([[0, 0, 9, 9], [4, 0, 40, 40]]), torch.tensor([0, 0])) == []


def test_first_large_box_only_and_same_class_only():
    # a part inside two wholes (rows 1 and 2) and a whole of another class (row 3)
    boxes = _t([[10, 10, 20, 20], [0, 0, 40, 40], [5, 5, 35, 35], [0, 0, 50, 50]])
    labels = torch.tensor([0, 0, 0, 1])
    assert bib_pairs(boxes, labels) == [(0, 1)]  # the reference keeps ids[0]
    assert bib_pairs(boxes, labels, pairs="all") == [(0, 1), (0, 2)]


def _image(image_id, boxes, scores, feats, labels=None):
    n = len(scores)
    return Detections(
        image_id=image_id,
        boxes=_t(boxes).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.zeros(n, dtype=torch.int64) if labels is None else torch.tensor(labels),
        feats=torch.tensor(feats, dtype=torch.float32).reshape(n, -1),
    )


WHOLE, PART, PART2 = [0, 0, 40, 40], [10, 10, 20, 20], [22, 22, 32, 32]


def test_score_threshold_is_strict():
    det = _image("a", [WHOLE, PART], [0.9, 0.5], [[0.0], [0.0]])
    ctx = AcquisitionContext(("a",), 0, 0, preds=PredictionBatch.from_detections([det]))
    assert BoxInBox()(ctx) == {"a": 0.0}  # 0.5 is not > 0.5
    assert BoxInBox(threshold=0.49)(ctx) == {"a": 1.0}


def test_first_image_is_the_one_with_most_pairs():
    # groups 0 (2 points), 1 and 2 (1 point each): group 0 first whatever the seed
    x = np.array([[0.0], [0.0], [1.0], [5.0]])
    groups = np.array([0, 0, 1, 2])
    assert {bib_kmeanspp(x, groups, 1, np.random.default_rng(s))[0] for s in range(30)} == {0}


def test_greedy_local_trials_over_image_groups():
    # after group F (2 pairs at 0): group A at -sqrt(3) (D^2 = 3), group B at 1 (D^2 = 1).
    # Taking A leaves potential 1, taking B leaves 3, so A wins whenever one of the
    # 2 + int(log 2) = 2 candidates is A: P(A) = 1 - (1/4)^2 = 0.9375 (plain D^2: 0.75)
    x = np.array([[0.0], [0.0], [-math.sqrt(3.0)], [1.0]])
    groups = np.array([0, 0, 1, 2])
    seconds = [bib_kmeanspp(x, groups, 2, np.random.default_rng(s))[1] for s in range(2000)]
    assert np.mean(np.array(seconds) == 1) == pytest.approx(0.9375, abs=0.02)


def test_seeds_from_earlier_rounds_replace_the_first_image_rule():
    x = np.array([[0.0], [0.0], [10.0]])
    groups = np.array([0, 0, 1])
    # a seed at 0 covers group 0: group 1 is the only one with potential left
    order = bib_kmeanspp(x, groups, 1, np.random.default_rng(0), seeds=np.array([[0.0]]))
    assert order == [1]


def _pool():
    return [
        # a: two pairs (two parts in one whole); b: one pair; c: no pair; d: one pair far away
        _image("a", [WHOLE, PART, PART2], [0.9, 0.8, 0.8], [[0, 0], [0, 0], [0, 1]]),
        _image("b", [WHOLE, PART], [0.9, 0.8], [[0, 0], [0, 0.5]]),
        _image("c", [WHOLE], [0.9], [[0, 0]]),
        _image("d", [WHOLE, PART], [0.9, 0.8], [[9, 9], [9, 9]]),
    ]


def test_selector_end_to_end_on_predictions():
    dets = _pool()
    ids = tuple(d.image_id for d in dets)
    for budget, expected in [(1, ["a"]), (4, None)]:
        ctx = AcquisitionContext(
            ids, 0, 0, budget=budget, preds=PredictionBatch.from_detections(dets)
        )
        scores = BoxInBox()(ctx)
        assert scores == {"a": 2.0, "b": 1.0, "c": 0.0, "d": 1.0}
        selector = BoxInBoxKMeansPP()
        picked = selector(scores, ctx)
        if expected is not None:
            assert picked == expected
        else:
            # a first (most pairs), then d (far: D^2 = 2 * 81 + ...) or b, c (no pair) last
            assert picked[0] == "a" and picked[-1] == "c" and sorted(picked) == list(ids)
        assert selector.describe()["bib_pairs"] == 4


def test_box_in_box_preset_is_faithful():
    cfg = compose_config(["strategy=box_in_box"])
    assert (cfg.strategy.scorer.threshold, cfg.strategy.scorer.containment) == (0.5, 0.8)
    assert cfg.strategy.scorer.min_area_ratio == 3.0
    assert cfg.strategy.selector._target_ == "alrun.acquisition.bib.BoxInBoxKMeansPP"


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ({"min_area_ratio": 0.5}, "strategy.scorer.min_area_ratio"),
        ({"pairs": "every"}, "strategy.scorer.pairs"),
        ({"containment": 0.0}, "strategy.scorer.containment"),
    ],
)
def test_bad_box_in_box_options_name_the_key(option, key):
    with pytest.raises(AlrunError, match=key.replace(".", r"\.")):
        BoxInBox(**option)


@pytest.mark.integration
def test_second_round_starts_from_the_pairs_of_earlier_picks(tmp_path):
    import json

    from alrun.loop import run_experiment

    overrides = ["experiment=smoke", "quiet=true", "budget.rounds=2", "strategy=box_in_box"]
    # the smoke detector is rarely > 0.5 sure: a low threshold gives it pairs
    cfg = compose_config([*overrides, "strategy.scorer.threshold=0.05"])
    run_experiment(cfg, tmp_path)
    first = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    second = json.loads((tmp_path / "round_01" / "selection.json").read_text())
    assert first["selector"] == "bib_kmeans_pp" and first["bib_seeded"] == 0
    assert first["bib_images_with_pairs"] > 0
    # round 1 is seeded with the pairs of the round-0 picks that still have pairs
    assert 0 < second["bib_seeded"] <= 10
    assert not {s["image_id"] for s in second["selected"]} & {
        s["image_id"] for s in first["selected"]
    }
