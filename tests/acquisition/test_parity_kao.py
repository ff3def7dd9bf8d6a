"""Parity with Kao et al.'s localization stability + classification term as CALD re-implements
it (github.com/we1pingyu/CALD, ``ls_c_train.py`` ``get_uncertainty``): per reference box the
raw max IoU with any box of each noisy view (views without boxes add 0), divided by the 6 views;
image value ``sum(p_i S_i) / sum(p_i) - U`` with ``U = max(1 - p_i)`` (the reference sorts it
ascending; alrun scores ``U - ...`` so higher is more informative). Expected numbers come from
:func:`_reference`, a transcription of that arithmetic, and are written out as literals.
"""

from __future__ import annotations

import pytest
import torch

from alrun.acquisition.aggregate import kao_localization_stability
from alrun.acquisition.context import PredictionBatch
from alrun.acquisition.multipass import PassUncertainty
from alrun.acquisition.scores import localization_instability
from alrun.types import Detections
from tests.helpers import compose_config

REF = [[0.0, 0, 20, 20], [50, 50, 70, 70]]
PROB_MAX = [0.9, 0.6]
# six noisy views: box 0 drifts a little more each time; box 1 is found twice poorly
VIEWS = [
    [[1.0, 0, 21, 20], [50, 50, 70, 70]],
    [[2.0, 0, 22, 20], [58, 50, 78, 70]],
    [[3.0, 0, 23, 20]],
    [[4.0, 0, 24, 20], [60, 60, 80, 80]],
    [],
    [[6.0, 0, 26, 20]],
]


def _iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w < 0 or h < 0:
        return 0.0
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def _reference(ref, prob_max, views):
    """CALD get_uncertainty for one image (the value it sorts ascending)."""
    if not ref:
        return 0.0
    stability = [0.0] * len(ref)
    for boxes in views:
        if not boxes:
            continue
        for i, a in enumerate(ref):
            stability[i] += max(_iou(a, b) for b in boxes)
    stability = [s / 6.0 for s in stability]
    u = max(1 - p for p in prob_max)
    return sum(p * s for p, s in zip(prob_max, stability)) / sum(prob_max) - u


def _det(image_id, boxes, probs):
    n = len(boxes)
    cp = torch.tensor(probs, dtype=torch.float32).reshape(n, 1)
    return Detections(
        image_id=image_id,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=cp[:, 0].clone(),
        labels=torch.zeros(n, dtype=torch.int64),
        probs=torch.cat([cp, 1 - cp], dim=1),
        class_probs=cp,
        head="sigmoid",
    )


def _batch():
    views = tuple(_det("a", v, [0.8] * len(v)) for v in VIEWS)
    image = _det("a", REF, PROB_MAX)
    image = Detections(**{**image.__dict__, "passes": views})
    empty_views = tuple(_det("e", [], []) for _ in VIEWS)
    empty = Detections(**{**_det("e", [], []).__dict__, "passes": empty_views})
    return PredictionBatch.from_detections([image, empty])


def _scorer(**options):
    cfg = compose_config(["strategy=loc_stability"])
    from hydra.utils import instantiate

    scorer = instantiate(cfg.strategy).scorer
    for key, value in options.items():
        setattr(scorer, key, value)
    return scorer


def test_loc_stability_matches_cald_ls_c_train():
    expected = -_reference(REF, PROB_MAX, VIEWS)
    scores = _scorer().batch_scores(_batch())
    assert scores[0] == pytest.approx(expected, abs=1e-6)
    # box 0: IoUs 0.9048, 0.8182, 0.7391, 0.6667, -, 0.5385 -> S0 = 3.6672 / 6 = 0.6112
    # box 1: IoUs 1, 0.4286 (not zeroed), -, 0.1429, -, - -> S1 = 1.5714 / 6 = 0.2619
    # (0.9 * 0.6112 + 0.6 * 0.2619) / 1.5 = 0.4715; U = 0.4 -> 0.4 - 0.4715 = -0.0715
    assert scores[0] == pytest.approx(-0.0715, abs=5e-4)
    assert scores[1] == 0.0  # CALD: an image without boxes is 0


def test_previous_alrun_formula_differs():
    # IoUs below 0.5 zeroed and no classification term: 1 - weighted stability
    old = _scorer(match_threshold=0.5, aggregator="weighted").batch_scores(_batch())[0]
    # box 1 keeps only its IoU-1 view: S1 = 1 / 6 -> 1 - (0.9 * 0.6112 + 0.6 / 6) / 1.5
    assert old == pytest.approx(0.5666, abs=5e-4)


def test_aggregator_by_hand():
    # one image: instabilities 0.2, 0.6 at confidences 0.9, 0.5 -> stabilities 0.8, 0.4;
    # weighted (0.72 + 0.2) / 1.4 = 0.657; U = 0.5 -> -0.157; a second image has no box
    out = kao_localization_stability(
        torch.tensor([0.2, 0.6]), torch.tensor([0, 0]), 2, torch.tensor([0.9, 0.5])
    )
    assert out[0].item() == pytest.approx(0.5 - 0.92 / 1.4)
    assert torch.isnan(out[1])


def test_max_boxes_keeps_the_most_confident():
    scorer = PassUncertainty(
        localization_instability, source="tta", views=["noise:0.1"], max_boxes=1
    )
    base = _batch()
    from alrun.acquisition.reduction import kept_rows

    assert kept_rows(base, 0.05, max_boxes=1).tolist() == [0]  # 0.9 beats 0.6
    assert kept_rows(base, 0.05, max_boxes=30).tolist() == [0, 1]
    assert scorer.max_boxes == 1


def test_loc_stability_preset_follows_cald():
    cfg = compose_config(["strategy=loc_stability"])
    views = list(cfg.strategy.scorer.views)
    assert len(views) == 6
    assert [round(float(v.split(":")[1]) * 255) for v in views] == [8, 16, 24, 32, 40, 48]
    assert cfg.strategy.scorer.max_boxes == 30
