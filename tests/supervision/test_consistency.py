"""CSD flip consistency: parity with soo89/CSD-SSD, the class and box terms on hand-made
tensors, the mirror bookkeeping, the gradient reaching the backbone, and one round end to end on
the tiny detector; the same for the two-stage version (Faster R-CNN: paired mirrored proposals,
gradient to the RoI box head)."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from torchvision.models.detection import (
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.engine import Batch, BatchSource, Step
from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.supervision.consistency import (
    ALRUN_RULE,
    CSD_RAMPDOWN,
    CSD_RAMPUP,
    ConsistencyRule,
    FlipConsistency,
    FlipConsistencyHook,
    consistency_terms,
    csd_symmetric_kl,
    flip_within_sizes,
    js_divergence,
    mirror_boxes,
    mirror_offsets,
    ramp_weight,
    two_stage_consistency_terms,
    two_stage_views,
    unflip_locations,
)
from tests.helpers import compose_config, small_faster_rcnn

T = torch.tensor
#: alrun's earlier rule at a threshold (tests written before the CSD defaults)
AT_HALF = ConsistencyRule("js", "sum", "threshold", 0.5)
#: a hook that compares every location from the first iteration on
EVERYWHERE = dict(rule=ConsistencyRule(match="threshold", match_threshold=0.0), ramp="linear",
                  rampup=0.0, rampdown=0.0)  # fmt: skip


# --- parity with soo89/CSD-SSD train_csd.py (train(): the consistency block; rampweight) -------
# Expected numbers are the reference formulas evaluated by hand (plain math, eps 1e-7 as CSD):
# class = (KLDivLoss(log(p + e), q + e).sum + KLDivLoss(log(q + e), p + e).sum) / 2, mean over
# the sampled locations; box = the 4 per-coordinate means of squared differences (dx as
# loc + loc_flip) divided by 4; sampled = max foreground probability > background probability.

#: 3 locations, 2 classes (sigmoid logits; distribution softmax([logits, 0]), background last).
#: Location 0: foreground logit 2 > 0 beats the background; the flipped view prefers the other
#: class. Location 1: sigmoid(-0.5) = 0.378 >= 0.3 but background wins. Location 2: neither.
CLS_PLAIN = T([[2.0, -3.0], [-0.5, -1.0], [-4.0, -3.0]])
CLS_FLIP = T([[-3.0, 2.0], [-1.0, -0.5], [-4.0, -3.0]])
BOX_PLAIN = T([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
BOX_FLIP = T([[3.0, 2.0, 1.5, 4.0], [0.0, 0.0, 0.2, 0.0], [9.0, 9.0, 9.0, 9.0]])  # l: +0.5, +0.2


def test_csd_parity_class_term_box_term_and_background_rule():
    """soo89/CSD-SSD train_csd.py train(): only location 0 is sampled; class term 4.348490
    (symmetric KL / 2), box term 0.5^2 / 4 = 0.0625 (averaged over the 4 offsets)."""
    cls_term, box_term, matched = consistency_terms(
        CLS_PLAIN, CLS_FLIP, BOX_PLAIN, BOX_FLIP, "ltrb"
    )
    assert matched == 1
    assert float(cls_term) == pytest.approx(4.348490, abs=1e-5)
    assert float(box_term) == pytest.approx(0.0625, abs=1e-7)


def test_alrun_rule_differs_from_csd_on_the_same_inputs():
    """alrun's earlier rule (``ALRUN_RULE``): sigmoid >= 0.3 takes location 1 too; JS mean
    (0.575591 + 0.014954) / 2 = 0.295272; box summed (0.25 + 0.04) / 2 = 0.145."""
    cls_term, box_term, matched = consistency_terms(
        CLS_PLAIN, CLS_FLIP, BOX_PLAIN, BOX_FLIP, "ltrb", ALRUN_RULE
    )
    assert matched == 2
    assert float(cls_term) == pytest.approx(0.295272, abs=1e-5)
    assert float(box_term) == pytest.approx(0.145, abs=1e-6)


def test_csd_class_term_detaches_each_kl_target():
    """CSD's KLDivLoss(log p, q.detach()) + KLDivLoss(log q, p.detach()): with the flipped view
    fixed, the gradient on the plain view is that of KL(q || p) / 2 alone."""
    logits = T([[2.0, -3.0, 0.0]], requires_grad=True)
    q = torch.softmax(T([[-3.0, 2.0, 0.0]]), -1)
    csd_symmetric_kl(torch.softmax(logits, -1), q).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    p = torch.softmax(logits, -1)
    (0.5 * (q * (q.log() - p.log())).sum()).backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [(0, 0.0), (1, 0.006740053), (16_000, 0.286504797), (31_999, 0.999999995), (32_000, 1.0),
     (100_000, 1.0), (100_001, 0.999999969), (110_000, 0.043936934), (119_999, 3.7313e-06)],
)  # fmt: skip
def test_csd_parity_ramp_weight(iteration, expected):
    """soo89/CSD-SSD train_csd.py rampweight(): Gaussian up to 32k, down after 100k of 120k."""
    got = ramp_weight("gaussian", iteration, 120_000, CSD_RAMPUP, CSD_RAMPDOWN)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_linear_ramp_is_alruns_earlier_one():
    assert [ramp_weight("linear", i, 8, 0.25, 0.0) for i in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(rampup=0.9, rampdown=0.2), "supervision.rampup \\+ supervision.rampdown: .*sum <= 1"),
        (dict(match_threshold=0.3), "supervision.match_threshold: only with supervision.match"),
        (dict(class_divergence="kl"), "supervision.class_divergence: expected one of"),
        (dict(rampup=1.5), "supervision.rampup: expected a number in"),
    ],
)
def test_bad_consistency_options_are_one_line_naming_the_key(settings, message):
    with pytest.raises(AlrunError, match=message):
        FlipConsistency(**settings)


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
    js, l2, matched = consistency_terms(cls_plain, cls_flip, box_plain, box_flip, "ltrb", AT_HALF)
    assert matched == 1
    p = torch.softmax(T([2.0, -3.0, 0.0]), 0)
    q = torch.softmax(T([-3.0, 2.0, 0.0]), 0)
    assert float(js) == pytest.approx(float(js_divergence(p[None], q[None])[0]), abs=1e-6)
    assert float(l2) == pytest.approx(0.25)
    agree, same_box, _ = consistency_terms(
        cls_plain, cls_plain, box_plain, mirror_offsets(box_plain, "ltrb"), "ltrb", AT_HALF
    )
    assert float(agree) == pytest.approx(0.0, abs=1e-6) and float(same_box) == 0.0
    none = consistency_terms(
        cls_plain,
        cls_flip,
        box_plain,
        box_flip,
        "ltrb",
        ConsistencyRule(match="threshold", match_threshold=0.99),
    )
    assert none[2] == 0 and float(none[0]) == 0.0


def test_hook_loss_reaches_the_backbone():
    detector = TorchvisionDetector(lambda **kw: tiny_fcos(image_size=64, **kw), num_classes=2,
                                   device="cpu")  # fmt: skip
    detector.train_mode()
    hook = FlipConsistencyHook("u", weight=1.0, **EVERYWHERE)
    hook.before_training(detector, 1)
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64)]
    batch = Batch(BatchSource("u", None, role="unlabelled"), images, None, ("a",), (False,))
    losses = hook.extra_losses(Step(0, 1, 0.1, detector, {"u": batch}))
    assert float(losses["class"].detach()) > 0 and float(losses["box"].detach()) > 0
    sum(losses.values()).backward()
    first_conv = detector.model.backbone.blocks[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    stats = hook.after_training()
    assert stats["images"] == 1 and stats["matched_per_image"] > 0


def test_consistency_needs_a_dense_head():
    class NotDense:
        model = torch.nn.Linear(1, 1)
        capabilities = frozenset({"teacher"})  # a torch module, but not a detection head

    with pytest.raises(AlrunError, match=r"needs a dense head .* or a two-stage one"):
        FlipConsistencyHook("u").before_training(NotDense(), 1)
    ssd = TorchvisionDetector(
        partial(ssdlite320_mobilenet_v3_large, weights=None, weights_backbone=None),
        num_classes=2,
        label_offset=1,
        device="cpu",
    )
    with pytest.raises(AlrunError, match="got SSD"):
        FlipConsistencyHook("u").before_training(ssd, 1)
    with pytest.raises(AlrunError, match=r"supervision\.match_threshold"):
        FlipConsistency(match="threshold", match_threshold=2)


@pytest.mark.parametrize(
    "init", [pytest.param("continue", marks=pytest.mark.integration), "scratch"]
)
def test_one_round_end_to_end_adds_the_consistency_loss(tmp_path, init):
    cfg = compose_config(["experiment=smoke", "quiet=true", "budget.rounds=1",
                          "supervision=consistency", "supervision.match=threshold",
                          "supervision.match_threshold=0.0",
                          f"trainer.init={init}"])  # fmt: skip
    rows = run_experiment(cfg, tmp_path)
    assert [r["images"] for r in rows] == [10, 20]
    for r in (0, 1):
        train = json.loads((tmp_path / f"round_0{r}/metrics.json").read_text())["train"]
        assert train["consistency/class_mean"] > 0 and train["consistency/box_mean"] > 0
        assert train["consistency/matched_per_image"] > 0


# --- two-stage (Faster R-CNN) ------------------------------------------------------------------


def test_two_stage_terms_on_hand_made_outputs():
    # 2 proposals, 2 classes + background (column 0); only proposal 0 is confident (class 2)
    logits_plain = T([[0.0, -1.0, 3.0], [2.0, -2.0, -2.0]])
    logits_flip = T([[0.0, 3.0, -1.0], [-5.0, 5.0, 5.0]])
    deltas_plain = torch.full((2, 12), 9.0)
    deltas_flip = torch.full((2, 12), -7.0)  # other classes / proposal 1 must not count
    deltas_plain[0, 8:12] = T([0.2, 0.1, 0.3, -0.1])  # class 2 of proposal 0
    deltas_flip[0, 8:12] = T([0.1, 0.1, 0.5, -0.1])  # mirrored back: (-0.1, 0.1, 0.5, -0.1)
    js, l2, matched = two_stage_consistency_terms(
        logits_plain, logits_flip, deltas_plain, deltas_flip, AT_HALF
    )
    assert matched == 1
    e = [math.exp(v) for v in (0.0, -1.0, 3.0)]
    p = [v / sum(e) for v in e]  # the flipped view's distribution is p with classes swapped
    q = [p[0], p[2], p[1]]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    assert float(js) == pytest.approx(0.5 * (kl(p, m) + kl(q, m)), abs=1e-6)
    assert float(l2) == pytest.approx(0.3**2 + 0.2**2, abs=1e-6)  # dx 0.2 vs -0.1, dw 0.3 vs 0.5
    mirrored = deltas_plain.reshape(2, 3, 4) * T([-1.0, 1.0, 1.0, 1.0])
    agree = two_stage_consistency_terms(
        logits_plain, logits_plain, deltas_plain, mirrored.reshape(2, 12), AT_HALF
    )
    assert float(agree[0]) == pytest.approx(0.0, abs=1e-6) and float(agree[1]) == 0.0
    assert agree[2] == 1
    strict = ConsistencyRule(match="threshold", match_threshold=0.99)
    none = two_stage_consistency_terms(logits_plain, logits_flip, deltas_plain, deltas_flip, strict)
    assert none[2] == 0 and float(none[0]) == 0.0 and float(none[1]) == 0.0
    no_proposals = two_stage_consistency_terms(
        logits_plain[:0], logits_flip[:0], deltas_plain[:0], deltas_flip[:0]
    )
    assert no_proposals[2] == 0 and float(no_proposals[0]) == 0.0
    # CSD's rule and terms (soo89/CSD-SSD train_csd.py): proposal 0 only (class 2 beats the
    # background, proposal 1's background wins); symmetric KL / 2 = 3.676362 (hand-derived with
    # eps 1e-7), box (0.3^2 + 0.2^2) / 4 = 0.0325
    csd = two_stage_consistency_terms(logits_plain, logits_flip, deltas_plain, deltas_flip)
    assert csd[2] == 1
    assert float(csd[0]) == pytest.approx(3.676362, abs=1e-5)
    assert float(csd[1]) == pytest.approx(0.0325, abs=1e-7)


def test_mirrored_proposals_cover_the_mirrored_content():
    torch.manual_seed(0)
    boxes = torch.rand(5, 4) * 30
    boxes[:, 2:] += boxes[:, :2]
    assert torch.allclose(mirror_boxes(mirror_boxes(boxes, 64.0), 64.0), boxes)
    assert mirror_boxes(T([[4.0, 3.0, 13.0, 11.0]]), 30.0).tolist() == [[17.0, 3.0, 26.0, 11.0]]
    # left-right asymmetric content, 20 x 30 inside a padded 24 x 32 batch tensor
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30) % 97
    padded = torch.full((1, 3, 24, 32), -1.0)
    padded[0, :, :20, :30] = image
    flipped = flip_within_sizes(ImageList(padded, [(20, 30)]))
    assert torch.equal(flipped[0, :, :20, :30], image.flip(-1))
    assert (flipped[0, :, 20:] == -1).all() and (flipped[0, :, :, 30:] == -1).all()
    box = T([[4.0, 3.0, 13.0, 11.0]])
    x1, y1, x2, y2 = (int(v) for v in mirror_boxes(box, 30.0)[0])
    assert torch.equal(flipped[0, :, y1:y2, x1:x2], image[:, 3:11, 4:13].flip(-1))
    # what the RoI head pools: the mirrored proposal's features are the plain ones mirrored
    pooled = roi_align(padded, [box], output_size=5, sampling_ratio=2, aligned=True)
    pooled_mirror = roi_align(
        flipped, [mirror_boxes(box, 30.0)], output_size=5, sampling_ratio=2, aligned=True
    )
    torch.testing.assert_close(pooled_mirror, pooled.flip(-1))
    assert not torch.allclose(pooled, pooled.flip(-1))  # the content is asymmetric


def test_two_stage_views_pair_each_proposal_with_its_mirror():
    """The RoI head sees proposal i on the plain view and its mirror on the mirrored view: the
    pixels under each pair are mirror images of each other."""
    detector = small_faster_rcnn(num_classes=2)
    detector.train_mode()
    model, seen = detector.model, {}
    model.backbone.register_forward_pre_hook(lambda m, args: seen.update(pixels=args[0]))
    model.roi_heads.box_roi_pool.register_forward_pre_hook(
        lambda m, args: seen.update(boxes=args[1], sizes=args[2])
    )
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 40)]
    # resized to 51 x 64 and 64 x 40: the second is padded on the right in the batch tensor
    logits, deltas, n_plain = two_stage_views(model, images)
    boxes, sizes, pixels = seen["boxes"], seen["sizes"], seen["pixels"]
    assert len(boxes) == 4 and sizes[2:] == sizes[:2] and sizes[0] != sizes[1]
    assert n_plain == len(boxes[0]) + len(boxes[1]) > 0
    assert len(logits) == len(deltas) == 2 * n_plain
    for i, (_, width) in enumerate(sizes[:2]):
        plain, mirrored = boxes[i], boxes[2 + i]
        torch.testing.assert_close(mirrored, mirror_boxes(plain, float(width)))
        # zero columns on both sides, so at every border roi_align reads zeros (as it does in
        # the batch's right padding) instead of repeating the edge pixel
        padded = torch.nn.functional.pad(pixels, (2, 2))
        shift = T([2.0, 0.0, 2.0, 0.0])
        pooled = roi_align(padded[i : i + 1], [plain + shift], 7, sampling_ratio=2, aligned=True)
        pooled_mirror = roi_align(
            padded[2 + i : 3 + i], [mirrored + shift], 7, sampling_ratio=2, aligned=True
        )
        # bilinear samples of mirrored coordinates differ by float rounding (1.1e-5 seen on
        # one CPU): a wrong pairing differs by whole pixel values
        torch.testing.assert_close(pooled_mirror, pooled.flip(-1), atol=1e-4, rtol=1e-4)


def test_two_stage_hook_loss_reaches_the_roi_box_head():
    detector = small_faster_rcnn(num_classes=2)
    detector.train_mode()
    hook = FlipConsistencyHook("u", weight=1.0, **EVERYWHERE)
    hook.before_training(detector, 1)
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    batch = Batch(BatchSource("u", None, role="unlabelled"), images, None, ("a", "b"), (False,) * 2)
    losses = hook.extra_losses(Step(0, 1, 0.1, detector, {"u": batch}))
    assert float(losses["class"].detach()) > 0 and float(losses["box"].detach()) > 0
    sum(losses.values()).backward()
    model = detector.model
    assert model.training and model.rpn.training  # the RPN's eval-mode proposals are restored
    for weight in (
        model.roi_heads.box_head.fc6.weight,
        model.roi_heads.box_predictor.cls_score.weight,
        model.roi_heads.box_predictor.bbox_pred.weight,
    ):
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.rpn.parameters())  # proposals are inputs
    stats = hook.after_training()
    assert stats["images"] == 2 and stats["matched_per_image"] > 0


@pytest.mark.integration
def test_one_round_end_to_end_with_faster_rcnn(tmp_path):
    tiny = ["detector.builder.min_size=64", "detector.builder.max_size=64"]
    cfg = compose_config(["experiment=smoke", "quiet=true", "budget.rounds=1",
                          "supervision=consistency", "supervision.match=threshold",
                          "supervision.match_threshold=0.0",
                          "supervision.unlabelled_batch_size=2",
                          "detector=fasterrcnn_mobilenet_v3_large_320_fpn", *tiny])  # fmt: skip
    rows = run_experiment(cfg, tmp_path)
    assert [r["images"] for r in rows] == [10, 20]
    for r in (0, 1):
        train = json.loads((tmp_path / f"round_0{r}/metrics.json").read_text())["train"]
        assert train["consistency/class_mean"] > 0 and train["consistency/box_mean"] > 0
        assert train["consistency/matched_per_image"] > 0
        assert train["consistency/images"] == 2 * train["iterations"]
