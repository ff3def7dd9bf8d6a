"""CSD flip consistency: the JS and L2 terms on hand-made tensors, the mirror bookkeeping, the
gradient reaching the backbone, and one round end to end on the tiny detector."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.engine import Batch, BatchSource, Step
from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.supervision.consistency import (
    FlipConsistency,
    FlipConsistencyHook,
    consistency_terms,
    js_divergence,
    mirror_offsets,
    unflip_locations,
)
from tests.helpers import compose_config

T = torch.tensor


def test_js_divergence_hand_values():
    p = T([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    q = T([[0.0, 1.0], [1.0, 0.0], [0.2, 0.8]])
    js = js_divergence(p, q)
    # disjoint: ln 2; (0.5, 0.5) vs (1, 0): m = (0.75, 0.25) -> 0.5 (0.143841 + 0.287682)
    assert js.tolist() == pytest.approx([math.log(2), 0.2157616, 0.0], abs=1e-5)
    assert js_divergence(q, p).tolist() == pytest.approx(js.tolist(), abs=1e-6)  # symmetric


def test_mirror_offsets():
    ltrb = T([[1.0, 2.0, 3.0, 4.0]])
    assert mirror_offsets(ltrb, "ltrb").tolist() == [[3.0, 2.0, 1.0, 4.0]]
    assert mirror_offsets(ltrb, "delta").tolist() == [[-1.0, 2.0, 3.0, 4.0]]


def test_unflip_undoes_a_mirror_per_level():
    torch.manual_seed(0)
    shapes, anchors, batch = [(3, 4), (2, 2)], 2, 2
    levels = [torch.randn(batch, h, w, anchors, 5) for h, w in shapes]
    plain = torch.cat([lv.reshape(batch, -1, 5) for lv in levels], dim=1)
    mirrored = torch.cat([lv.flip(2).reshape(batch, -1, 5) for lv in levels], dim=1)
    assert torch.equal(unflip_locations(mirrored, shapes, anchors), plain)
    assert not torch.equal(mirrored, plain)


def test_consistency_terms_on_hand_made_outputs():
    # 3 locations, 2 classes; only location 0 is confident (sigmoid(2) = 0.88 >= 0.5)
    cls_plain = T([[2.0, -3.0], [-4.0, -4.0], [-4.0, -3.0]])
    cls_flip = T([[-3.0, 2.0], [5.0, 5.0], [0.0, 0.0]])  # location 0 disagrees on the class
    box_plain = T([[1.0, 2.0, 3.0, 4.0], [0.0, 0, 0, 0], [0.0, 0, 0, 0]])
    box_flip = T([[3.0, 2.0, 1.5, 4.0], [9.0, 9, 9, 9], [9.0, 9, 9, 9]])  # l differs by 0.5
    js, l2, matched = consistency_terms(cls_plain, cls_flip, box_plain, box_flip, "ltrb", 0.5)
    assert matched == 1
    p = torch.softmax(T([2.0, -3.0, 0.0]), 0)
    q = torch.softmax(T([-3.0, 2.0, 0.0]), 0)
    assert float(js) == pytest.approx(float(js_divergence(p[None], q[None])[0]), abs=1e-6)
    assert float(l2) == pytest.approx(0.25)
    agree, same_box, _ = consistency_terms(
        cls_plain, cls_plain, box_plain, mirror_offsets(box_plain, "ltrb"), "ltrb", 0.5
    )
    assert float(agree) == pytest.approx(0.0, abs=1e-6) and float(same_box) == 0.0
    none = consistency_terms(cls_plain, cls_flip, box_plain, box_flip, "ltrb", 0.99)
    assert none[2] == 0 and float(none[0]) == 0.0


def test_hook_loss_reaches_the_backbone():
    detector = TorchvisionDetector(lambda **kw: tiny_fcos(image_size=64, **kw), num_classes=2,
                                   device="cpu")  # fmt: skip
    detector.train_mode()
    hook = FlipConsistencyHook("u", weight=1.0, match_threshold=0.0, rampup=0.0)
    hook.before_training(detector, 1)
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64)]
    batch = Batch(BatchSource("u", None, role="unlabelled"), images, None, ("a",), (False,))
    losses = hook.extra_losses(Step(0, 1, 0.1, detector, {"u": batch}))
    assert float(losses["js"].detach()) > 0 and float(losses["l2"].detach()) > 0
    sum(losses.values()).backward()
    first_conv = detector.model.backbone.blocks[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    stats = hook.after_training()
    assert stats["images"] == 1 and stats["matched_per_image"] > 0


def test_consistency_needs_a_dense_head():
    class NotDense:
        model = torch.nn.Linear(1, 1)

    with pytest.raises(AlrunError, match="needs a dense head"):
        FlipConsistencyHook("u").before_training(NotDense(), 1)
    with pytest.raises(AlrunError, match=r"supervision\.match_threshold"):
        FlipConsistency(match_threshold=2)


@pytest.mark.parametrize("init", ["continue", "scratch"])
def test_one_round_end_to_end_adds_the_consistency_loss(tmp_path, init):
    cfg = compose_config(["experiment=smoke", "quiet=true", "budget.rounds=1",
                          "supervision=consistency", "supervision.match_threshold=0.0",
                          f"trainer.init={init}"])  # fmt: skip
    rows = run_experiment(cfg, tmp_path)
    assert [r["images"] for r in rows] == [10, 20]
    for r in (0, 1):
        train = json.loads((tmp_path / f"round_0{r}/metrics.json").read_text())["train"]
        assert train["consistency/js_mean"] > 0 and train["consistency/l2_mean"] > 0
        assert train["consistency/matched_per_image"] > 0
