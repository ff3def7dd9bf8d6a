"""AL-MDN's image score: z-scored uncertainties, reduced per image, max of the four; one round
end to end on the tiny detector."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.mixture import MixtureUncertainty, zscore
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.types import Detections
from tests.helpers import compose_config


def _det(image_id, scores, mdn, sources=None):
    n = len(scores)
    return Detections(
        image_id=image_id,
        boxes=torch.tensor([[0.0, 0, 10, 10]] * n).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32).reshape(-1),
        labels=torch.zeros(n, dtype=torch.int64),
        sources=torch.arange(n) if sources is None else torch.tensor(sources),
        head="sigmoid",
        mdn=torch.tensor(mdn, dtype=torch.float32).reshape(-1, 4),
    )


def _context(dets):
    return AcquisitionContext(
        pool_ids=tuple(d.image_id for d in dets),
        seed=0,
        round=0,
        preds=PredictionBatch.from_detections(dets),
    )


POOL = [
    # a: high localisation aleatoric; b: high classification epistemic; c: a low-score box only
    _det("a", [0.9, 0.8], [[4.0, 0, 0, 0], [2.0, 0, 0, 0]]),
    _det("b", [0.7], [[0.0, 0, 0, 3.0]]),
    _det("c", [0.2], [[100.0, 100, 100, 100]]),
    _det("d", [0.6], [[0.0, 0, 0, 0]]),
]


def test_zscore_uses_the_population_std_and_survives_a_constant_column():
    values = torch.tensor([[1.0, 5.0], [3.0, 5.0]], dtype=torch.float64)
    z, mean, std = zscore(values)
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]
    assert z.tolist() == [[-1.0, 0.0], [1.0, 0.0]]


def test_image_score_is_the_max_of_the_four_normalised_maxima():
    scores = MixtureUncertainty(score_threshold=0.5)(_context(POOL))
    # kept boxes (score >= 0.5): a1, a2, b, d. Column means / population stds:
    #   loc_al (4, 2, 0, 0): mean 1.5, std sqrt(2.75)
    #   cls_ep (0, 0, 3, 0): mean 0.75, std sqrt(1.6875)
    #   loc_ep, cls_al: constant 0 -> z 0
    loc = lambda x: (x - 1.5) / 2.75**0.5  # noqa: E731
    ep = lambda x: (x - 0.75) / 1.6875**0.5  # noqa: E731
    assert scores["a"] == pytest.approx(max(loc(4.0), 0.0, 0.0, ep(0.0)))
    assert scores["b"] == pytest.approx(max(loc(0.0), 0.0, 0.0, ep(3.0)))
    assert scores["d"] == pytest.approx(max(loc(0.0), 0.0, 0.0, ep(0.0)))
    assert scores["c"] == float("-inf")  # no box above the threshold: empty=min
    assert scores["b"] > scores["a"] > scores["d"]


def test_one_uncertainty_alone_and_the_sum_combination():
    ctx = _context(POOL)
    only = MixtureUncertainty(uncertainty="loc_aleatoric", score_threshold=0.5)(ctx)
    assert only["a"] > only["b"] == only["d"]
    summed = MixtureUncertainty(combine="sum", aggregator="mean", score_threshold=0.5)(ctx)
    loc_mean_a = ((4 - 1.5) + (2 - 1.5)) / 2 / 2.75**0.5
    assert summed["a"] == pytest.approx(loc_mean_a + 2 * 0.0 + (0 - 0.75) / 1.6875**0.5)
    skip = MixtureUncertainty(score_threshold=0.5, empty="skip")(ctx)
    assert "c" not in skip


def test_describe_records_the_normalisation_the_threshold_and_the_aggregator():
    scorer = MixtureUncertainty(score_threshold=0.5)
    scorer(_context(POOL))
    method = scorer.describe()
    assert method["aggregator"] == "max" and method["score_threshold"] == 0.5
    assert method["normalisation"]["boxes"] == 4
    assert method["normalisation"]["mean"][0] == pytest.approx(1.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"components": 0}, "strategy.scorer.components: expected an integer >= 1, got 0"),
        ({"uncertainty": "loc"}, "strategy.scorer.uncertainty: expected one of all|"),
        ({"combine": "mean"}, "strategy.scorer.combine: expected one of max|sum"),
        ({"aggregator": "median"}, "strategy.scorer.aggregator: expected one of"),
        ({"coupling": "glued"}, "strategy.scorer.coupling: expected one of side|coupled"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(AlrunError) as err:
        MixtureUncertainty(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_predictions_without_mixture_uncertainties_are_refused():
    plain = Detections("x", torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(AlrunError, match="no mixture-density uncertainties"):
        MixtureUncertainty()(_context([plain]))


SMOKE = ["experiment=smoke", "quiet=true"]


def test_one_round_of_al_mdn_end_to_end(tmp_path):
    rows = run_experiment(compose_config(SMOKE + ["strategy=al_mdn", "budget.rounds=1"]), tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    selection = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert selection["strategy"] == "al_mdn" and selection["scorer"] == "mixture_uncertainty"
    assert selection["aggregator"] == "max" and selection["score_threshold"] == 0.5
    assert len(selection["selected"]) == 10
    assert selection["normalisation"]["columns"] == [
        "loc_aleatoric",
        "loc_epistemic",
        "cls_aleatoric",
        "cls_epistemic",
    ]
    scores = [s["score"] for s in selection["selected"]]
    assert scores == sorted(scores, reverse=True, key=lambda s: float(s))
    checkpoint = torch.load(tmp_path / "round_01" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("head.mdn.") for k in checkpoint)


@pytest.mark.parametrize("coupling", ["side", "coupled"])
def test_coupling_reaches_the_detector_built_at_start_up(coupling):
    """``strategy.scorer.coupling`` goes through ``needs`` to the mixture head the loop builds:
    detached tower features for ``side``, not for ``coupled``."""
    cfg = compose_config(SMOKE + ["strategy=al_mdn", f"strategy.scorer.coupling={coupling}"])
    exp = build_experiment(cfg)
    assert exp.strategy.needs.mixture_coupling == coupling
    assert exp.strategy.describe_unscored()["coupling"] == coupling
    assert exp.detector.model.head.mdn.detach is (coupling == "side")
    exp.detector.reset(seed=1)  # every round's rebuild keeps it
    assert exp.detector.model.head.mdn.detach is (coupling == "side")


def test_al_mdn_with_a_two_stage_detector_fails_before_training():
    cfg = compose_config(
        SMOKE + ["strategy=al_mdn", "detector=fasterrcnn_mobilenet_v3_large_320_fpn"]
    )
    with pytest.raises(AlrunError, match="AL-MDN"):
        build_experiment(cfg)


def test_class_weights_scale_the_raw_uncertainties_of_their_class():
    two = [
        _det("x", [0.9], [[1.0, 0, 0, 0]]),
        replace(_det("y", [0.9], [[1.0, 0, 0, 0]]), labels=torch.tensor([1])),
        _det("z", [0.9], [[0.0, 0, 0, 0]]),
    ]
    plain = MixtureUncertainty(uncertainty="loc_aleatoric")(_context(two))
    assert plain["x"] == pytest.approx(plain["y"])
    weighted = MixtureUncertainty(uncertainty="loc_aleatoric", class_weights=[1.0, 3.0])
    scores = weighted(_context(two))
    # raw loc_aleatoric after weighting: 1, 3, 0
    raw = torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)
    z = (raw - raw.mean()) / raw.std(correction=0)
    assert [scores[k] for k in "xyz"] == pytest.approx(z.tolist())
