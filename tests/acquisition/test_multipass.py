"""Multi-pass uncertainty: matching passes to reference boxes, the PassUncertainty scorer, its
start-up checks, and one round of every multi-pass strategy on the tiny detector."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from functools import partial

import pytest
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.multipass import PassUncertainty, match_passes
from alrun.acquisition.scores import (
    box_disagreement,
    entropy,
    entropy_of_mean,
    localization_instability,
    localization_tightness,
)
from alrun.cli import user_error
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.types import Detections, Needs
from tests.helpers import REPO, compose_config


def _det(image_id, boxes, class_probs, labels, scores, proposals=None):
    cp = torch.tensor(class_probs, dtype=torch.float32).reshape(-1, 2)
    probs = torch.cat([cp, (1 - cp.sum(1, keepdim=True)).clamp_min(0)], dim=1)
    return Detections(
        image_id=image_id,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        probs=probs,
        class_probs=cp,
        head="sigmoid",
        proposals=None if proposals is None else torch.tensor(proposals).reshape(-1, 4),
    )


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


A0, A1 = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]
HALF = [0.0, 0.0, 10.0, 5.0]  # IoU 0.5 with A0


def two_images() -> list[Detections]:
    """Image a: box a0 (class 0, p 0.8), box a1 (class 1, p 0.6); image b: box b0 (class 0,
    p 0.4). Pass 1: a0 -> HALF (IoU 0.5, p 0.6), a1 unmatched, b0 -> same box (p 0.4).
    Pass 2: a0 -> same box (p 0.8), a1 -> same box (p of class 1: 0.2), b0 unmatched."""
    a_pass1 = _det("a", [HALF], [[0.6, 0.3]], [0], [0.6])
    a_pass2 = _det("a", [A1, A0], [[0.1, 0.2], [0.8, 0.1]], [1, 0], [0.2, 0.8])
    b_pass1 = _det("b", [A0], [[0.4, 0.1]], [0], [0.4])
    b_pass2 = _det("b", [], [], [], [])
    a = _det("a", [A0, A1], [[0.8, 0.1], [0.2, 0.6]], [0, 1], [0.8, 0.6], [A0, [20, 20, 30, 25]])
    b = _det("b", [A0], [[0.4, 0.3]], [0], [0.4], [[0, 0, 10, 8]])
    return [replace(a, passes=(a_pass1, a_pass2)), replace(b, passes=(b_pass1, b_pass2))]


def test_passes_are_matched_to_reference_boxes_with_unmatched_as_background():
    batch = PredictionBatch.from_detections(two_images())
    m = match_passes(batch, torch.arange(3), "binary", "iou", 0.5)
    # binary distribution of the reference box's class in each pass; unmatched = (0, 1)
    expected = [
        [[0.6, 0.4], [0.8, 0.2]],  # a0
        [[0.0, 1.0], [0.2, 0.8]],  # a1 (class 1)
        [[0.4, 0.6], [0.0, 1.0]],  # b0
    ]
    close(m.pass_probs, expected)
    close(m.iou, [[0.5, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert m.matched.tolist() == [[True, True], [False, True], [True, False]]
    assert m.pass_boxes[0, 0].tolist() == HALF and m.pass_boxes[1, 0].tolist() == [0.0] * 4
    # rows in any order give the same answer per row
    rev = match_passes(batch, torch.tensor([2, 1, 0]), "binary", "iou", 0.5)
    close(rev.pass_probs, expected[::-1])
    # a stricter threshold unmatches a0 in pass 1
    strict = match_passes(batch, torch.arange(3), "binary", "iou", 0.6)
    assert strict.pass_probs[0, 0].tolist() == [0.0, 1.0] and strict.iou[0, 0] == 0.0


def test_passes_with_the_references_rows_are_matched_row_by_row():
    """An MC-dropout pass read at the reference anchors (same sources and offsets) compares
    row i with row i; the overlap threshold still applies."""
    ref = _det("a", [A0, [0, 0, 10, 9]], [[0.8, 0.1], [0.7, 0.1]], [0, 0], [0.8, 0.7])
    ref = replace(ref, sources=torch.tensor([3, 7]))
    # row 0 moved to HALF (IoU 0.5 with A0), row 1 moved far away; by IoU alone row 1 of the
    # reference ([0, 0, 10, 9]) would have matched the pass's row 0 (HALF, IoU 50 / 90)
    moved = _det("a", [HALF, [50, 50, 60, 60]], [[0.6, 0.1], [0.3, 0.1]], [0, 0], [0.6, 0.3])
    moved = replace(moved, sources=torch.tensor([3, 7]))
    batch = PredictionBatch.from_detections([replace(ref, passes=(moved,))])
    m = match_passes(batch, torch.arange(2), "binary", "iou", 0.5)
    assert m.matched.tolist() == [[True], [False]]
    close(m.iou, [[0.5], [0.0]])
    close(m.pass_probs, [[[0.6, 0.4]], [[0.0, 1.0]]])


def test_with_background_uses_the_c_plus_1_row_and_one_hot_background():
    batch = PredictionBatch.from_detections(two_images())
    m = match_passes(batch, torch.arange(3), "with_background", "iou", 0.5)
    close(m.pass_probs[0, 0], [0.6, 0.3, 0.1])
    assert m.pass_probs[1, 0].tolist() == [0.0, 0.0, 1.0]


def _ctx(dets):
    batch = PredictionBatch.from_detections(dets)
    return AcquisitionContext(tuple(batch.image_ids), 0, 0, preds=batch)


# entropies of the mean binary distributions (hand-computed):
# a0: mean (0.7, 0.3) -> 0.7 * 0.35667 + 0.3 * 1.20397 = 0.61086
# a1: mean (0.1, 0.9) -> 0.1 * 2.30259 + 0.9 * 0.10536 = 0.32508
# b0: mean (0.2, 0.8) -> 0.2 * 1.60944 + 0.8 * 0.22314 = 0.50040
H_A0, H_A1, H_B0 = 0.61086, 0.32508, 0.50040


@pytest.mark.parametrize(
    ("aggregator", "image_a"),
    [
        ("mean", (H_A0 + H_A1) / 2),
        ("max", H_A0),
        ("min", H_A1),
        ("sum", H_A0 + H_A1),
        # weighted by max class probability 0.8 (a0) and 0.6 (a1)
        ("weighted", (0.8 * H_A0 + 0.6 * H_A1) / 1.4),
    ],
)
def test_mc_entropy_with_every_aggregator(aggregator, image_a):
    scorer = PassUncertainty(entropy_of_mean, passes=2, aggregator=aggregator, score_threshold=0.1)
    scores = scorer(_ctx(two_images()))
    assert scores["a"] == pytest.approx(image_a, abs=1e-4)
    assert scores["b"] == pytest.approx(H_B0, abs=1e-4)


def test_score_threshold_class_weights_and_empty_policy():
    scorer = PassUncertainty(
        entropy_of_mean, aggregator="max", score_threshold=0.5, class_weights=[1.0, 3.0]
    )
    scores = scorer(_ctx(two_images()))
    # a1 (class 1) x 3 = 0.97524 now beats a0; b0 (score 0.4 < 0.5) dropped -> b empty -> -inf
    assert scores["a"] == pytest.approx(3 * H_A1, abs=1e-4)
    assert scores["b"] == -math.inf
    skip = PassUncertainty(entropy_of_mean, score_threshold=0.5, empty="skip")
    assert set(skip(_ctx(two_images()))) == {"a"}
    described = scorer.describe()
    assert described["aggregator"] == "max" and described["score_threshold"] == 0.5
    assert described["class_weights"] == [1.0, 3.0]
    assert described["unmatched"] == "background, overlap 0"


def test_localization_instability_per_image():
    scorer = PassUncertainty(localization_instability, source="tta", views=["noise:0.1"])
    scores = scorer(_ctx(two_images()))
    # a0: 1 - (0.5 + 1) / 2 = 0.25; a1: 1 - (0 + 1) / 2 = 0.5; mean 0.375; b0: 1 - 0.5
    assert scores == pytest.approx({"a": 0.375, "b": 0.5})
    assert scorer.needs.augment == ("noise:0.1",) and scorer.needs.passes == 1


def test_localization_tightness_uses_proposals_and_needs_no_passes():
    scorer = PassUncertainty(localization_tightness, source="none", aggregator="max")
    assert scorer.needs.proposals and scorer.needs.passes == 1 and not scorer.needs.head_dropout
    scores = scorer(_ctx(two_images()))
    # a0: T = IoU(A0, A0) = 1, P 0.8 -> 1 - |0.8| = 0.2; a1: T = 0.5, P 0.6 -> 1 - 0.1 = 0.9
    # b0: T = IoU([0,0,10,8], A0) = 0.8, P 0.4 -> 1 - 0.2 = 0.8
    assert scores == pytest.approx({"a": 0.9, "b": 0.8})


def test_needs_follow_the_score_and_source():
    mc = PassUncertainty(entropy_of_mean, passes=7, dropout=0.3)
    assert mc.needs == Needs(probs=True, passes=7, head_dropout=0.3)
    ens = PassUncertainty(entropy_of_mean, source="ensemble", members=4)
    assert ens.needs.ensemble == 4 and ens.needs.passes == 4 and ens.needs.head_dropout == 0
    tta = PassUncertainty(entropy_of_mean, source="tta", views=["hflip", "scale:0.8"])
    assert tta.needs.augment == ("hflip", "scale:0.8") and tta.needs.passes == 1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"box_score": entropy}, "'entropy' is not a multi-pass score"),
        ({"passes": 0}, "strategy.scorer.passes: expected an integer >= 1, got 0"),
        ({"dropout": 0.0}, "strategy.scorer.dropout"),
        ({"match_threshold": 1.5}, "strategy.scorer.match_threshold"),
        ({"match_threshold": 0}, "strategy.scorer.match_threshold"),
        ({"match_metric": "dice"}, "strategy.scorer.match_metric"),
        ({"aggregator": "median"}, "strategy.scorer.aggregator"),
        ({"source": "ensemble", "members": 1}, "ensemble needs >= 2 members, got 1"),
        ({"source": "ensemble", "ensemble_kind": "bagged"}, "strategy.scorer.ensemble_kind"),
        ({"source": "tta", "views": ["blur:2"]}, "unknown view 'blur:2'"),
        ({"source": "tta", "views": ["scale:-1"]}, "out of range"),
        ({"source": "tta", "views": []}, "tta needs at least one view"),
        ({"source": "none"}, "compares passes"),
        ({"source": "magic"}, "strategy.scorer.source"),
        ({"distribution": "foreground"}, "strategy.scorer.distribution"),
        ({"class_weights": [-1.0]}, "strategy.scorer.class_weights"),
        (
            {"box_score": partial(box_disagreement, reduce="median"), "source": "ensemble"},
            "'box_disagreement' fails: box_disagreement: reduce must be 'min' or 'mean'",
        ),
    ],
)
def test_bad_configuration_is_a_one_line_error(kwargs, needle):
    kwargs = {"box_score": entropy_of_mean, **kwargs}
    with pytest.raises(AlrunError) as err:
        PassUncertainty(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- through the config system and the loop ---------------------------------------------------
SMOKE = ["experiment=smoke", "quiet=true"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["strategy=mc_entropy", "strategy.scorer.passes=0"], "strategy.scorer.passes"),
        (["strategy=bald", "strategy.scorer.match_threshold=0"], "match_threshold"),
        (["strategy=ensemble_entropy", "strategy.scorer.members=1"], "members: expected an"),
        (["strategy=mc_margin", "strategy.scorer.aggregator=median"], "aggregator"),
        (["strategy=loc_tightness"], "needs proposals"),
        (
            [
                "strategy=mc_entropy",
                "strategy.scorer.box_score._target_=alrun.acquisition.scores.entropy",
            ],
            "not a multi-pass score",
        ),
        (["strategy=tta_inconsistency", "strategy.scorer.views=[blur]"], "unknown view"),
    ],
)
def test_start_up_errors_name_the_key(overrides, needle):
    with pytest.raises(Exception) as err:
        build_experiment(compose_config(SMOKE + overrides))
    message = user_error(err.value)
    assert message is not None and needle in message and "\n" not in message, message


@pytest.mark.integration
def test_cli_refuses_bad_passes_before_writing_anything(tmp_path):
    env = {"PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "alrun.cli", *SMOKE, f"hydra.run.dir={run}",
         "strategy=mc_entropy", "strategy.scorer.passes=0"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**__import__("os").environ, **env},
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "alrun: error: strategy.scorer.passes: expected an integer >= 1, got 0",
        "  see docs/strategies.md",
    ]
    assert not list(run.glob("round_*")) and not (run / "state.json").exists()


def test_mc_strategy_trains_with_head_dropout_and_entropy_does_not():
    from alrun.detectors.torchvision.mc_dropout import head_dropouts

    mc = build_experiment(compose_config(SMOKE + ["strategy=bald"]))
    hooks = head_dropouts(mc.detector.model)
    assert len(hooks) == 2 and {h.p for h in hooks} == {0.2}
    plain = build_experiment(compose_config(SMOKE + ["strategy=entropy"]))
    assert head_dropouts(plain.detector.model) == []
    assert plain.strategy.needs.passes == 1 and plain.strategy.needs.head_dropout == 0


STRATEGIES = {
    "mc_entropy": ["strategy.scorer.passes=3"],
    "bald": ["strategy.scorer.passes=3"],
    "mc_variation_ratio": ["strategy.scorer.passes=3"],
    "mc_margin": ["strategy.scorer.passes=3"],
    "tta_inconsistency": [],
    "loc_stability": [],
    "ensemble_entropy": ["strategy.scorer.members=2"],
    "ensemble_bald": ["strategy.scorer.members=2", "strategy.scorer.ensemble_kind=snapshot"],
    "ensemble_box_disagreement": ["strategy.scorer.members=2"],
}


FAST = ("mc_entropy", "ensemble_bald")  # MC dropout and an ensemble in the fast tier


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.integration)
     for n in sorted(STRATEGIES)],
)  # fmt: skip
def test_one_round_of_each_multipass_strategy(tmp_path, name):
    overrides = [f"strategy={name}", "budget.rounds=1", *STRATEGIES[name]]
    rows = run_experiment(compose_config(SMOKE + overrides), tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    selection = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert selection["strategy"] == name and selection["scorer"] == "pass_uncertainty"
    assert len(selection["selected"]) == 10
    assert selection["source"] in ("mc_dropout", "tta", "ensemble")
    scores = [s["score"] for s in selection["selected"]]
    assert scores == sorted(scores, reverse=True)
    finite = [s for s in scores if isinstance(s, float)]
    if name == "loc_stability":  # Kao/CALD: U - weighted stability, in [-1, 1]
        assert selection["aggregator"] == "kao_localization_stability"
        assert selection["score_threshold"] == 0.05
        assert finite and all(-1 <= s <= 1 for s in finite)
    else:
        assert selection["aggregator"] in ("mean", "weighted")
        assert selection["score_threshold"] == 0.1
        assert finite and all(s >= 0 for s in finite)
    if name != "mc_variation_ratio":  # votes of a 10-iteration model rarely cross p = 0.5
        assert len(set(finite)) > 1, "scores should vary"
    if name.startswith("ensemble"):
        checkpoint = torch.load(tmp_path / "round_01" / "checkpoint.pt", weights_only=True)
        assert any(k.startswith("member1.") for k in checkpoint)
