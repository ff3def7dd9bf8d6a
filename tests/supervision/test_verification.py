"""Box verification: the oracle accepts / rejects predicted boxes; rejected images fall back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.oracle import CostModel, SimulatedOracle
from alrun.supervision.base import LabelRequest
from alrun.supervision.verification import BoxVerificationRegime
from alrun.truth import HiddenTruth
from tests.helpers import compose_config
from tests.supervision.test_weak_point import FixedDetector, dets, record

RECS = [
    record("good", [[0, 0, 20, 20]], [0]),
    record("bad", [[0, 0, 20, 20], [30, 30, 50, 50]], [0, 1]),
]
PREDS = {
    "good": dets("good", [[1, 1, 20, 20], [40, 0, 60, 10]], [0, 0], [0.9, 0.2]),  # 2nd: low score
    "bad": dets("bad", [[0, 0, 19, 20], [30, 30, 50, 50]], [0, 0], [0.8, 0.7]),  # 2nd: wrong class
}


@pytest.mark.parametrize("fallback", ["box", "none"])
def test_accepted_boxes_become_labels_and_rejected_images_fall_back(fallback):
    regime = BoxVerificationRegime(proposal_score=0.5, fallback=fallback)
    request = LabelRequest(1, (), FixedDetector(PREDS))
    assert regime.label_kind(LabelRequest(0)) == "box" and regime.label_kind(request) == "verify"
    oracle = SimulatedOracle(CostModel())
    oracle.hold_truth(HiddenTruth(RECS))  # the regime gets references, the oracle the truth
    good, bad = regime.annotate(oracle, [rec.ref for rec in RECS], request)
    # one proposal shown (the low-score one is not), accepted, 1.6 s
    assert good.kind == "verify" and good.verified.tolist() == [True]
    np.testing.assert_allclose(good.box_targets()[0], [[1, 1, 20, 20]])
    assert good.cost_s == pytest.approx(1.6)
    entry = regime.round_record(0)["labels"][0]
    assert (entry["proposals"], entry["accepted"], entry["rejected_images"]) == (3, 2, 1)
    assert entry["accepted_precision"] == pytest.approx(1.0)
    assert entry["accepted_recall"] == pytest.approx(2 / 3)  # bad's class-1 object is missed
    if fallback == "box":  # verified two boxes, then drew both objects
        assert bad.kind == "box" and bad.cost_s == pytest.approx(2 * 1.6 + 2 * 25.5)
        np.testing.assert_array_equal(bad.labels, [0, 1])
    else:
        assert bad.kind == "verify" and bad.verified.tolist() == [True, False]
        assert bad.cost_s == pytest.approx(2 * 1.6)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(AlrunError, match=r"supervision\.fallback: expected one of box\|none"):
        BoxVerificationRegime(fallback="redo")
    with pytest.raises(AlrunError, match=r"supervision\.proposal_score: expected a number"):
        BoxVerificationRegime(proposal_score=2)


def test_verification_round_end_to_end(tmp_path):
    overrides = [
        "experiment=smoke",
        "quiet=true",
        "budget.rounds=1",
        "supervision=box_verification",
    ]
    rows = run_experiment(compose_config(overrides), tmp_path)
    assert [r["images"] for r in rows] == [10, 20]
    labelled = json.loads((tmp_path / "round_01/labelled.json").read_text())
    kinds = {im["label_kind"] for im in labelled["images"] if im["round"] == 1}
    assert kinds <= {"verify", "box"}
    entry = json.loads((tmp_path / "round_00/supervision.json").read_text())["labels"][1]
    assert entry["requested"] == "verify"
    assert sum(entry["received"].values()) == 10
    assert entry["received"].get("box", 0) == entry["rejected_images"]  # fallback=box
    assert rows[1]["cost_s"] - rows[0]["cost_s"] == pytest.approx(entry["cost_s"])
