"""Parity with CALD's code (github.com/we1pingyu/CALD, ``cald_train.py``):

* ``get_uncertainty``: per view ``min(1, min over reference boxes of |max IoU + 0.5 (1 - JS)
  (prob_max_ref + prob_max_view) - bp|)`` (bp 1.3; a view without boxes 0), mean over views;
  an image without boxes 0. :func:`_reference` transcribes it (JS as ``scipy.stats.entropy``
  computes it: normalised inputs, natural log); alrun's score is ``1 - consistency``.
* ``cls_kldiv``: candidates whose class vector is all zero first, then by descending
  JS(softmax(mean labelled class counts), softmax(class vector)).
"""

from __future__ import annotations

import math

import pytest
import torch

from alrun.acquisition.cald import CaldClassDiversity, CaldConsistency, js_of_softmax
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.errors import AlrunError
from alrun.types import Detections
from tests.helpers import compose_config


def _iou(a, b):
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if w < 0 or h < 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _kl(p, q):
    p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    return sum(x * math.log(x / y) for x, y in zip(p, q) if x > 0)


def _js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def _reference(ref, views, bp=1.3):
    """CALD get_uncertainty for one image: rows are (box, softmax row with background last)."""
    if not ref:
        return 0.0
    per_view = []
    for view in views:
        if not view:
            per_view.append(0.0)
            continue
        c = 1.0
        for box, p in ref:
            ious = [_iou(box, b) for b, _ in view]
            j = max(range(len(view)), key=ious.__getitem__)
            q = view[j][1]
            js = max(_js(p, q), 0.0)
            c = min(c, abs(ious[j] + 0.5 * (1 - js) * (max(p[:-1]) + max(q[:-1])) - bp))
        per_view.append(c)
    return sum(per_view) / len(per_view)


REF = [([0, 0, 20, 20], [0.7, 0.2, 0.1]), ([40, 40, 60, 60], [0.3, 0.5, 0.2])]
FLIP = [([1, 0, 21, 20], [0.6, 0.3, 0.1]), ([40, 40, 60, 62], [0.2, 0.6, 0.2])]
SCALE = [([0, 0, 20, 20], [0.7, 0.2, 0.1])]  # B's best match is A's box, IoU 0


def _det(image_id, rows, passes=()):
    n = len(rows)
    probs = torch.tensor([p for _, p in rows], dtype=torch.float32).reshape(n, 3)
    labels = probs[:, :-1].argmax(dim=1) if n else torch.zeros(0, dtype=torch.int64)
    return Detections(
        image_id=image_id,
        boxes=torch.tensor([b for b, _ in rows], dtype=torch.float32).reshape(n, 4),
        scores=probs[:, :-1].max(dim=1).values if n else torch.zeros(0),
        labels=labels,
        probs=probs,
        class_probs=probs[:, :-1],
        passes=passes,
    )


def _image(image_id, ref, views):
    return _det(image_id, ref, tuple(_det(image_id, v) for v in views))


def test_consistency_matches_cald_get_uncertainty():
    batch = PredictionBatch.from_detections(
        [
            _image("a", REF, [FLIP, SCALE]),
            _image("b", REF, [FLIP, []]),  # a view without boxes adds 0
            _image("c", [], [[], []]),  # no box: consistency 0, score 1 (CALD picks it first)
        ]
    )
    scores = CaldConsistency(views=["hflip", "scale:0.8"]).batch_scores(batch)
    expected = [1 - _reference(REF, [FLIP, SCALE]), 1 - _reference(REF, [FLIP, []]), 1.0]
    assert scores == pytest.approx(expected, abs=1e-6)
    # by hand, the scale view: A matches itself, |1 + 0.5 * 1 * (0.7 + 0.7) - 1.3| = 0.4 < B's
    # 0.73; the flip view 0.1551 -> consistency 0.2775
    assert scores[0] == pytest.approx(1 - 0.2775, abs=5e-4)
    assert scores[1] == pytest.approx(1 - 0.0775, abs=5e-4)


def _flat(image_id, label, score):
    """An image with one box of ``label`` at ``score`` (or none with label None)."""
    if label is None:
        return _det(image_id, [])
    p = [0.0, 0.0, 1.0 - score]
    p[label] = score
    return _det(image_id, [([0, 0, 20, 20], p)])


def test_class_diversity_matches_cald_cls_kldiv():
    pool = [_flat("x", 0, 0.9), _flat("y", 1, 0.9), _flat("z", None, 0)]
    labelled = {  # mean class counts (2, 0)
        "L1": (torch.zeros(3, 4), torch.tensor([0, 0, 0])),
        "L2": (torch.zeros(1, 4), torch.tensor([0])),
    }
    ctx = AcquisitionContext(
        ("x", "y", "z"),
        0,
        0,
        budget=3,
        preds=PredictionBatch.from_detections(pool),
        labelled_targets=labelled,
    )
    picked = CaldClassDiversity()({"x": 0.5, "y": 0.5, "z": 0.5}, ctx)
    # z has no detection: first; y's vector (0, 0.9) is further from softmax(2, 0) than x's
    assert picked == ["z", "y", "x"]
    js = js_of_softmax(
        torch.tensor([[2.0, 0.0]], dtype=torch.float64),
        torch.tensor([[0.9, 0.0], [0.0, 0.9]], dtype=torch.float64),
    )
    p, qx, qy = _softmax([2, 0]), _softmax([0.9, 0]), _softmax([0, 0.9])
    assert js.tolist() == pytest.approx([_js(p, qx), _js(p, qy)])


def _softmax(x):
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def test_cald_preset_and_bad_options():
    cfg = compose_config(["strategy=cald"])
    assert cfg.strategy.scorer.base_point == 1.3
    assert cfg.strategy.selector.expand_ratio == 1.2
    with pytest.raises(AlrunError, match=r"strategy\.scorer\.base_point"):
        CaldConsistency(base_point=-1.0)
    with pytest.raises(AlrunError, match=r"strategy\.scorer\.views"):
        CaldConsistency(views=[])


@pytest.mark.integration
def test_cald_runs_one_round(tmp_path):
    import json

    from alrun.loop import run_experiment

    cfg = compose_config(["experiment=smoke", "quiet=true", "budget.rounds=1", "strategy=cald"])
    run_experiment(cfg, tmp_path)
    selection = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert selection["scorer"] == "cald_consistency"
    assert selection["diversity"] == "cald_class_diversity"
    assert len(selection["selected"]) == 10
    assert all(0.0 <= s["score"] <= 1.0 for s in selection["selected"])
