"""The torchvision backend keeps probabilities, features and embeddings through NMS."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision
from torchvision.models.detection import FCOS

from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.base import Detector, TrainSchedule
from alrun.detectors.capabilities import check_passes
from alrun.detectors.tiny import tiny_fcos
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.errors import AlrunError
from alrun.types import Needs
from tests.helpers import small_faster_rcnn


@pytest.fixture(scope="module")
def images():
    return synthetic_dataset(6, image_size=64, split="det-test")


def _low_threshold_fcos(num_classes: int, **kw) -> FCOS:
    # an untrained head scores ~sigmoid(-4.6); a low threshold keeps many boxes so NMS has work
    return tiny_fcos(num_classes, image_size=64, score_thresh=0.001, **kw)


def test_tiny_fcos_satisfies_protocol():
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    assert isinstance(det, Detector)


def test_dense_probs_survive_nms_and_sum_to_one(images):
    det = TorchvisionDetector(_low_threshold_fcos, num_classes=4, device="cpu")
    preds = det.predict(images.images, Needs(probs=True, feats=True, embedding=True))
    assert [p.image_id for p in preds] == images.ids
    total = 0
    for p in preds:
        n = len(p)
        total += n
        assert p.probs.shape == (n, 5)  # 4 classes + background (last)
        assert p.feats.shape == (n, 64)
        assert p.embedding.shape == (3 * 64,)  # one 64-d average per FPN level
        torch.testing.assert_close(p.probs.sum(1), torch.ones(n))
        # kept boxes are exactly those a stock NMS over the same boxes would keep
        keep = torchvision.ops.batched_nms(p.boxes, p.scores, p.labels, 0.5)
        assert sorted(keep.tolist()) == list(range(n))
        # the kept label is one of the classes the probability vector supports
        assert bool((p.probs[torch.arange(n), p.labels] > 0).all())
    assert total > 0, "untrained detector with threshold 0.001 should keep boxes"


def test_dense_boxes_match_torchvision_postprocess(images):
    """Our post-processing keeps the same boxes and scores as torchvision's own."""
    det = TorchvisionDetector(_low_threshold_fcos, num_classes=4, device="cpu")
    ours = det.predict(images.images[:2], Needs())
    det.model.eval()
    from alrun.data.images import load_image

    with torch.no_grad():
        stock = det.model([load_image(r) for r in images.images[:2]])
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a.boxes, b["boxes"])
        torch.testing.assert_close(a.scores, b["scores"])
        assert torch.equal(a.labels, b["labels"])


def test_needs_controls_optional_outputs(images):
    det = TorchvisionDetector(_low_threshold_fcos, num_classes=4, device="cpu")
    (p,) = det.predict(images.images[:1], Needs())
    assert p.probs is None and p.feats is None and p.embedding is None
    with pytest.raises(AlrunError, match="multi-pass"):
        det.predict(images.images[:1], Needs(passes=3))


def test_two_stage_probs_background_last(images):
    det = small_faster_rcnn(box_score_thresh=0.0)
    preds = det.predict(images.images[:2], Needs(probs=True, feats=True))
    kept = sum(len(p) for p in preds)
    assert kept > 0
    for p in preds:
        assert p.probs.shape[1] == 4
        torch.testing.assert_close(p.probs.sum(1), torch.ones(len(p)))
        assert p.feats.shape[1] == 1024
        assert p.proposals.shape == p.boxes.shape
        assert bool((p.labels >= 0).all() and (p.labels < 3).all())
        # the box's score is its class's probability (background is the last column)
        torch.testing.assert_close(p.probs[torch.arange(len(p)), p.labels], p.scores)


def test_fit_reduces_loss_and_state_round_trips(images, tmp_path):
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    schedule = TrainSchedule(iterations=4, warmup_iters=1, batch_size=2)
    stats = det.fit(images, schedule, seed=0)
    assert stats["iterations"] == 4 and stats["final_loss"] > 0
    state = det.state_dict()
    other = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    other.load_state_dict(state)
    a = det.predict(images.images[:2], Needs())
    b = other.predict(images.images[:2], Needs())
    for x, y in zip(a, b):
        torch.testing.assert_close(x.scores, y.scores)


def test_training_is_deterministic(images):
    outs = []
    for _ in range(2):
        det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
        det.reset(seed=3)
        det.fit(images, TrainSchedule(iterations=3, warmup_iters=1, batch_size=2), seed=5)
        outs.append(det.state_dict())
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_missing_checkpoint_is_a_clear_error():
    with pytest.raises(AlrunError, match="detector.pretrained.*does not exist"):
        TorchvisionDetector(partial(tiny_fcos), num_classes=4, pretrained="/no/such.pt")


def test_local_checkpoint_loads(tmp_path):
    det = TorchvisionDetector(partial(tiny_fcos), num_classes=4, device="cpu")
    det.reset(seed=7)
    torch.save({"model": det.state_dict()}, tmp_path / "ckpt.pt")
    loaded = TorchvisionDetector(
        partial(tiny_fcos), num_classes=4, device="cpu", pretrained=str(tmp_path / "ckpt.pt")
    )
    for key, value in det.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    wrong = TorchvisionDetector(partial(tiny_fcos), num_classes=2, device="cpu")
    torch.save(wrong.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(AlrunError, match="does not fit this model"):
        TorchvisionDetector(
            partial(tiny_fcos), num_classes=4, device="cpu", pretrained=str(tmp_path / "wrong.pt")
        )


def test_ssd_probs_background_last_and_no_box_feats(images):
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    builder = partial(
        ssdlite320_mobilenet_v3_large, weights=None, weights_backbone=None, score_thresh=0.0
    )
    det = TorchvisionDetector(builder, num_classes=3, label_offset=1, device="cpu")
    preds = det.predict(images.images[:1], Needs(probs=True, embedding=True))
    (p,) = preds
    assert len(p) > 0 and p.probs.shape == (len(p), 4)
    torch.testing.assert_close(p.probs.sum(1), torch.ones(len(p)))
    torch.testing.assert_close(p.probs[torch.arange(len(p)), p.labels], p.scores)
    with pytest.raises(AlrunError, match="SSD has no fixed-size box feature"):
        det.predict(images.images[:1], Needs(feats=True))


def test_pretrained_true_asks_the_builder_for_imagenet_backbone():
    """pretrained=true is passed on as weights_backbone="DEFAULT" (never downloaded in tests)."""
    calls = []

    def builder(**kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("weights_backbone")
        return tiny_fcos(**kwargs)

    TorchvisionDetector(builder, num_classes=2, pretrained=True, device="cpu")
    assert calls == [{"num_classes": 2, "weights_backbone": "DEFAULT"}]


def test_worker_processes_do_not_change_training(images):
    """Batches are drawn up front, so decoding in workers trains exactly the same weights."""
    states = []
    for workers in (0, 2):
        det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
        det.reset(seed=1)
        schedule = TrainSchedule(iterations=4, warmup_iters=1, batch_size=2, num_workers=workers)
        det.fit(images, schedule, seed=2)
        states.append(det.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def _stock(det, records):
    from alrun.data.images import load_image

    det.model.eval()
    with torch.no_grad():
        return det.model([load_image(r) for r in records])


def _assert_same_as_stock(det, records):
    ours = det.predict(records, Needs(probs=True))
    stock = _stock(det, records)
    assert sum(len(p) for p in ours) > 0
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a.boxes, b["boxes"])
        torch.testing.assert_close(a.scores, b["scores"])
        assert torch.equal(a.labels + det.label_offset, b["labels"])
    return ours


def test_retinanet_post_processing_matches_torchvision(images):
    from torchvision.models.detection import retinanet_resnet50_fpn

    builder = partial(
        retinanet_resnet50_fpn,
        weights=None,
        weights_backbone=None,
        min_size=64,
        max_size=64,
        score_thresh=0.01,
    )
    det = TorchvisionDetector(builder, num_classes=3, device="cpu")
    assert det.head_type == "sigmoid"
    for p in _assert_same_as_stock(det, images.images[:2]):
        # a sigmoid head: class_probs are the independent sigmoids and the score is one of them
        torch.testing.assert_close(p.class_probs[torch.arange(len(p)), p.labels], p.scores)
        assert p.head == "sigmoid"


def test_faster_rcnn_post_processing_matches_torchvision(images):
    det = small_faster_rcnn(box_score_thresh=0.0)
    assert det.head_type == "softmax"
    for p in _assert_same_as_stock(det, images.images[:2]):
        torch.testing.assert_close(p.class_probs, p.probs[:, :-1])
        # per-class NMS keeps one row per (proposal, class): rows of one proposal share probs
        pairs = set(zip(p.sources.tolist(), p.labels.tolist()))
        assert len(pairs) == len(p)
        for src in p.sources.unique():
            rows = p.probs[p.sources == src]
            assert torch.equal(rows, rows[:1].expand_as(rows))


def test_ssd_post_processing_matches_torchvision(images):
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    builder = partial(
        ssdlite320_mobilenet_v3_large, weights=None, weights_backbone=None, score_thresh=0.01
    )
    det = TorchvisionDetector(builder, num_classes=3, label_offset=1, device="cpu")
    _assert_same_as_stock(det, images.images[:1])


def test_fit_lowers_the_loss(images):
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), num_classes=4, device="cpu")
    det.reset(seed=0)
    schedule = TrainSchedule(iterations=40, warmup_iters=5, batch_size=4, lr=0.01)
    stats = det.fit(images, schedule, seed=0, from_scratch=True)
    assert stats["final_loss"] < 0.8 * stats["first_loss"], stats


def _mobilenet_builder(**kw):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    return partial(fasterrcnn_mobilenet_v3_large_320_fpn, weights=None, weights_backbone=None, **kw)


def test_pretrained_backbone_loads_a_local_imagenet_state_dict(tmp_path):
    torch.manual_seed(7)
    imagenet = torchvision.models.mobilenet_v3_large()
    path = tmp_path / "mobilenet_v3_large-local.pth"
    torch.save({"state_dict": imagenet.state_dict()}, path)
    det = TorchvisionDetector(
        _mobilenet_builder(),
        num_classes=3,
        label_offset=1,
        device="cpu",
        pretrained_backbone=str(path),
    )
    body = det.model.backbone.body
    assert torch.equal(body["0"][0].weight, imagenet.state_dict()["features.0.0.weight"])
    # built as the pretrained variant: frozen BatchNorm, like weights_backbone="DEFAULT"
    assert type(body["1"].block[0][1]).__name__ == "FrozenBatchNorm2d"


def test_pretrained_backbone_for_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(AlrunError, match="detector.pretrained_backbone: .*does not fit"):
        TorchvisionDetector(
            _mobilenet_builder(),
            num_classes=3,
            label_offset=1,
            device="cpu",
            pretrained_backbone=str(path),
        )
    with pytest.raises(AlrunError, match="detector.pretrained_backbone: file .* does not exist"):
        TorchvisionDetector(
            _mobilenet_builder(), num_classes=3, device="cpu", pretrained_backbone="/no/x.pth"
        )


def test_pretrained_backbone_without_published_weights_loads_into_the_backbone(tmp_path):
    source = tiny_fcos(4, image_size=64)
    path = tmp_path / "tiny_backbone.pth"
    torch.save(source.backbone.state_dict(), path)
    det = TorchvisionDetector(
        partial(tiny_fcos, image_size=64),
        num_classes=2,
        device="cpu",
        pretrained_backbone=str(path),
    )
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(det.model.backbone.state_dict()[key], value), key


def test_pretrained_true_offline_names_the_file_and_the_local_option(monkeypatch):
    from urllib.error import URLError

    def offline(*_args, **_kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    import torchvision.models._api as weights_api

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    with pytest.raises(AlrunError) as err:
        TorchvisionDetector(_mobilenet_builder(), num_classes=3, pretrained=True, device="cpu")
    message = str(err.value)
    assert "mobilenet_v3_large-" in message and ".pth" in message
    assert "hub" in message and "detector.pretrained_backbone=" in message


# --- multi-pass predictions: MC dropout, test-time views, ensembles -----------------------------
from alrun.detectors.torchvision.mc_dropout import HeadDropout, head_dropouts  # noqa: E402
from alrun.detectors.torchvision.postprocess_dense import head_last, head_towers  # noqa: E402
from alrun.detectors.views import apply_view, boxes_to_original, parse_view  # noqa: E402

MC = Needs(probs=True, passes=4, head_dropout=0.5)


def _mc_detector():
    det = TorchvisionDetector(_low_threshold_fcos, num_classes=3, device="cpu")
    det.prepare(MC)
    return det


class _Calls:
    """Counts forward calls of modules."""

    def __init__(self, **modules):
        self.counts = dict.fromkeys(modules, 0)
        for name, module in modules.items():
            module.register_forward_hook(lambda *_a, name=name: self._hit(name))

    def _hit(self, name):
        self.counts[name] += 1


def _calls(det):
    head = det.model.head
    return _Calls(
        backbone=det.model.backbone,
        cls_tower=head.classification_head.conv,
        cls_logits=head.classification_head.cls_logits,
        bbox_reg=head.regression_head.bbox_reg,
    )


@pytest.mark.parametrize("family", ["fcos", "retinanet"])
def test_head_from_cached_towers_equals_the_stock_head(images, family):
    from torchvision.models.detection import retinanet_resnet50_fpn

    if family == "fcos":
        model = _low_threshold_fcos(3)
    else:
        model = retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64
        )
    model.eval()
    from alrun.data.images import load_image

    with torch.no_grad():
        batch, _ = model.transform([load_image(r) for r in images.images[:2]])
        levels = list(model.backbone(batch.tensors).values())
        stock = model.head(levels)
        ours = head_last(model, head_towers(model, levels))
    assert stock.keys() == ours.keys()
    for key in stock:
        torch.testing.assert_close(ours[key], stock[key])


def test_mc_dropout_reruns_only_the_last_head_layers(images, monkeypatch):
    from alrun.detectors.torchvision import mc_dropout as mcd

    det = _mc_detector()
    det.predict_batch_size = 4  # 6 images -> 2 batches
    calls = _calls(det)
    at_boxes = []
    real = mcd.ConvAt.__call__
    monkeypatch.setattr(mcd.ConvAt, "__call__", lambda *a: at_boxes.append(1) or real(*a))
    preds = det.predict(images.images, MC)
    # 2 batches x 3 FPN levels: backbone once per batch, towers and the full-map class / box
    # logits once per level (the reference pass) ...
    assert calls.counts == {"backbone": 2, "cls_tower": 6, "cls_logits": 6, "bbox_reg": 6}
    # ... and each of the 4 MC passes evaluates only the last layers (class, box, centerness)
    # at the reference boxes' locations: 2 batches x 4 passes x 3 layers
    assert len(at_boxes) == 24
    assert all(len(p.passes) == 4 for p in preds)
    assert all(q.class_probs is not None for p in preds for q in p.passes)
    # each pass is read at the reference boxes' anchors: row i of a pass is row i of the
    # reference (same source, same label), with its own probabilities and box
    assert sum(len(p) for p in preds) > 0
    for p in preds:
        for q in p.passes:
            assert torch.equal(q.sources, p.sources) and torch.equal(q.labels, p.labels)
    # the passes are stochastic: they differ from each other and from the reference
    first = next(p for p in preds if len(p))
    probs = [q.class_probs for q in first.passes]
    assert not torch.allclose(probs[0], first.class_probs)
    assert not torch.allclose(probs[0], probs[1])


def test_a_strategy_without_passes_runs_no_passes(images):
    det = _mc_detector()  # the heads have dropout, but entropy asks for one pass
    det.predict_batch_size = 4
    calls = _calls(det)
    preds = det.predict(images.images, Needs(probs=True))
    assert calls.counts == {"backbone": 2, "cls_tower": 6, "cls_logits": 6, "bbox_reg": 6}
    assert all(p.passes == () for p in preds)


def test_reference_pass_is_deterministic_and_mc_passes_are_seeded(images):
    det = _mc_detector()
    a = det.predict(images.images[:3], MC)
    b = det.predict(images.images[:3], MC)
    plain = det.predict(images.images[:3], Needs(probs=True))
    for x, y, z in zip(a, b, plain):
        torch.testing.assert_close(x.boxes, z.boxes)  # dropout is off in the reference pass
        for p, q in zip(x.passes, y.passes):
            torch.testing.assert_close(p.boxes, q.boxes)  # same images -> same MC passes


def test_head_dropout_is_active_in_training_only_by_default():
    det = _mc_detector()
    hooks = head_dropouts(det.model)
    assert len(hooks) == 2 and all(isinstance(h, HeadDropout) and h.p == 0.5 for h in hooks)
    layer = det.model.head.classification_head.cls_logits
    x = torch.ones(1, 64, 4, 4)
    det.model.train()
    assert not torch.equal(layer(x), layer(x))  # dropout masks differ in training
    det.model.eval()
    assert torch.equal(layer(x), layer(x))
    # a checkpoint of a model with dropout loads into one without (same keys)
    plain = TorchvisionDetector(_low_threshold_fcos, num_classes=3, device="cpu")
    plain.load_state_dict(det.state_dict())


def test_multi_pass_without_source_and_mc_on_unsupported_heads_are_errors(images):
    det = TorchvisionDetector(_low_threshold_fcos, num_classes=3, device="cpu")
    with pytest.raises(AlrunError, match="without MC dropout"):
        det.predict(images.images[:1], Needs(passes=3))
    with pytest.raises(AlrunError, match="heads have no dropout"):
        det.predict(images.images[:1], MC)
    assert "proposals" not in det.capabilities  # one-stage (refused by build_experiment)
    with pytest.raises(AlrunError, match="one kind of extra passes"):
        check_passes(Needs(passes=2, head_dropout=0.2, augment=("hflip",)), "strategy")


def test_views_map_boxes_back():
    image = torch.rand(3, 20, 40)
    box = torch.tensor([[4.0, 2.0, 10.0, 8.0]])
    flip = parse_view("hflip")
    assert torch.equal(apply_view(image, flip).flip(-1), image)
    # the box found at x 30..36 in the flipped image is at x 4..10 in the original
    flipped_box = torch.tensor([[30.0, 2.0, 36.0, 8.0]])
    assert boxes_to_original(flipped_box, flip, (20, 40)).tolist() == box.tolist()
    half = parse_view("scale:0.5")
    viewed = apply_view(image, half)
    assert viewed.shape == image.shape and float(viewed[:, 10:, :].sub(0.5).abs().max()) == 0
    assert boxes_to_original(box * 0.5, half, (20, 40)).tolist() == box.tolist()
    noise = parse_view("noise:0.1")
    assert torch.equal(apply_view(image, noise, "id"), apply_view(image, noise, "id"))
    assert not torch.equal(apply_view(image, noise, "id"), apply_view(image, noise, "other"))
    jitter = apply_view(image, parse_view("jitter:0.2"))
    assert jitter.shape == image.shape and not torch.equal(jitter, image)


def test_tta_gives_one_pass_per_view_in_the_original_frame(images):
    det = TorchvisionDetector(_low_threshold_fcos, num_classes=3, device="cpu")
    views = ("hflip", "scale:0.8", "jitter:0.2", "noise:0.05")
    calls = _calls(det)
    preds = det.predict(images.images[:2], Needs(probs=True, augment=views))
    assert calls.counts["backbone"] == 1 + len(views)  # one batch, each view a full pass
    for p in preds:
        assert len(p.passes) == len(views)
        for q in p.passes:
            assert bool((q.boxes[:, 2] <= 64 + 1e-4).all()) and bool((q.boxes >= 0).all())
    # the hflip pass is the flipped image's detections mapped back: flipping the image by hand
    # and mapping its boxes gives the same
    from alrun.data.images import load_image

    record = images.images[0]
    flipped = det._forward([record], [load_image(record).flip(-1)], Needs(probs=True))[0]
    mapped = boxes_to_original(flipped.boxes, parse_view("hflip"), (64, 64))
    # (batch of 2 vs batch of 1: float sums in another order)
    torch.testing.assert_close(preds[0].passes[0].boxes, mapped, atol=1e-4, rtol=1e-4)


def test_two_stage_proposals_feed_localization_tightness(images):

    from alrun.acquisition.context import AcquisitionContext, PredictionBatch
    from alrun.acquisition.multipass import PassUncertainty
    from alrun.acquisition.scores import localization_tightness

    det = small_faster_rcnn(box_score_thresh=0.0)
    scorer = PassUncertainty(localization_tightness, source="none", score_threshold=0.0)
    det.prepare(scorer.needs)  # two-stage: accepted
    preds = det.predict(images.images[:2], scorer.needs)
    assert all(p.proposals is not None and p.proposals.shape == p.boxes.shape for p in preds)
    batch = PredictionBatch.from_detections(preds)
    scores = scorer(AcquisitionContext(batch.image_ids, 0, 0, preds=batch))
    assert set(scores) == set(batch.image_ids)
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_faster_rcnn_mc_dropout_reruns_only_the_box_predictor(images):
    det = small_faster_rcnn(box_score_thresh=0.0)
    needs = Needs(probs=True, passes=3, head_dropout=0.5)
    det.prepare(needs)
    calls = _Calls(
        backbone=det.model.backbone,
        box_head=det.model.roi_heads.box_head,
        predictor=det.model.roi_heads.box_predictor,
    )
    preds = det.predict(images.images[:2], needs)
    assert calls.counts == {"backbone": 1, "box_head": 1, "predictor": 4}
    assert sum(len(p) for p in preds) > 0
    for p in preds:
        assert len(p.passes) == 3
        for q in p.passes:
            assert torch.equal(q.sources, p.sources) and torch.equal(q.labels, p.labels)
            torch.testing.assert_close(q.probs.sum(1), torch.ones(len(q)))
    first = next(p for p in preds if len(p))
    assert not torch.allclose(first.passes[0].probs, first.probs)


@pytest.mark.parametrize("family", ["fcos", "retinanet"])
def test_mc_passes_at_box_locations_equal_a_full_masked_pass(images, family, monkeypatch):
    """A pass evaluated only at the reference boxes' locations gives exactly what the full head
    with the same channel-dropout masks gives there (RetinaNet: 9 anchors per location)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from alrun.data.images import load_image
    from alrun.detectors.torchvision import mc_dropout as mcd
    from alrun.detectors.torchvision import postprocess_dense as pd

    if family == "fcos":
        model = _low_threshold_fcos(3)
    else:
        model = retinanet_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=3,
            min_size=64,
            max_size=64,
            score_thresh=0.01,
        )
    model.eval()
    masks = []

    def recording(*args, **kwargs):
        masks.append(real(*args, **kwargs))
        return masks[-1]

    real = mcd.channel_mask
    monkeypatch.setattr(mcd, "channel_mask", recording)
    with torch.no_grad():
        batch, _ = model.transform([load_image(r) for r in images.images[:3]])
        levels = list(model.backbone(batch.tensors).values())
        anchors = model.anchor_generator(batch, levels)
        towers = pd.head_towers(model, levels)
        found = pd.dense_detections(model, batch, levels, pd.head_last(model, towers), anchors)
        torch.manual_seed(0)
        (ours,) = mcd.dense_mc_passes(model, batch, levels, towers, anchors, found, 0.5, 1)
        cls_mask, reg_mask = masks
        assert set(cls_mask.unique().tolist()) == {0.0, 2.0}  # p = 0.5: dropped or x 1/(1-p)
        masked = [
            (c * cls_mask[:, :, None, None], r * reg_mask[:, :, None, None]) for c, r in towers
        ]
        full = pd.dense_at_sources(model, batch, pd.head_last(model, masked), anchors, found)
    assert sum(len(f["sources"]) for f in found) > 0
    for a, b in zip(ours, full):
        for key in ("boxes", "scores", "probs", "class_probs"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
        assert torch.equal(a["sources"], b["sources"]) and torch.equal(a["labels"], b["labels"])


def test_dense_heads_keep_no_boxes_from_the_padding_of_non_square_images(tmp_path):
    """A 64x40 photo is padded to 64x64 (a multiple of 32) at the bottom; the head scores the
    padding too. torchvision's own post-processing clips those boxes onto the bottom edge; ours
    keeps only boxes whose location lies on the image, and none without area."""
    import numpy as np
    from PIL import Image

    from alrun.data.dataset import ImageRecord
    from alrun.data.images import load_image

    height, width = 40, 64
    file = tmp_path / "wide.png"
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(file)
    record = ImageRecord("wide", file, width, height, np.zeros((0, 4), np.float32), np.zeros(0))
    builder = partial(tiny_fcos, image_size=64, detections_per_img=1000, regression_bias=0.25)
    det = TorchvisionDetector(builder, num_classes=1, device="cpu")
    model = det.model
    torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, 6.0)  # fire everywhere
    model.eval()
    image = load_image(record)
    with torch.no_grad():
        stock = model([image])[0]["boxes"]
        (ours,) = det.predict([record], Needs())
        batch, _ = model.transform([image])
        assert tuple(batch.tensors.shape[-2:]) == (64, 64) and batch.image_sizes[0] == (40, 64)
        levels = list(model.backbone(batch.tensors).values())
        anchors = model.anchor_generator(batch, levels)[0]
    on_edge = stock[:, 1] >= height - 1e-3  # boxes squashed onto the bottom edge by the clip
    assert int(on_edge.sum()) > 0, "the stock post-processing should show the padding boxes"
    assert len(ours) > 0
    centres = (anchors[ours.sources, :2] + anchors[ours.sources, 2:]) / 2
    assert bool((centres[:, 1] < height).all()) and bool((centres[:, 0] < width).all())
    assert bool((ours.boxes[:, 3] > ours.boxes[:, 1]).all())
    assert bool((ours.boxes[:, 1] < height - 1e-3).all())
    assert float(ours.boxes[:, 3].max()) <= height


def test_dense_batches_are_the_training_forwards_levels_anchors_and_targets():
    """``dense_head``: one DenseBatch per training forward with targets (the backbone's levels
    with gradients, the model's anchors, the resized targets in dataset classes), none for
    ``features`` or after ``stop``."""
    from alrun.data.images import load_image
    from alrun.detectors.base import DenseBatch, DenseHead

    data = synthetic_dataset(2, image_size=64, split="dense-batches")
    det = TorchvisionDetector(
        partial(tiny_fcos, image_size=64), len(data.classes), device="cpu", label_offset=1
    )
    assert isinstance(det, DenseHead) and det.anchors_per_location == 1
    images = [load_image(r) for r in data.images]
    targets = [
        {"boxes": torch.as_tensor(r.boxes).float(), "labels": torch.as_tensor(r.labels).long()}
        for r in data.images
    ]
    seen: list[DenseBatch] = []
    stop = det.watch_dense_batches(seen.append)
    det.train_mode()
    det.losses(images, targets)
    det.features(images)  # no targets: not reported
    stop()
    det.losses(images, targets)
    assert len(seen) == 1
    (batch,) = seen
    model = det.model
    shifted = [{**t, "labels": t["labels"] + 1} for t in targets]
    with torch.no_grad():
        image_list, resized = model.transform(images, shifted)
        levels = list(model.backbone(image_list.tensors).values())
        anchors = model.anchor_generator(image_list, levels)
    assert all(lv.requires_grad for lv in batch.levels)
    for got, want in zip(batch.levels, levels):
        torch.testing.assert_close(got.detach(), want)
    for got, want in zip(batch.anchors, anchors):
        assert torch.equal(got, want)
    for got, want, plain in zip(batch.targets, resized, targets):
        torch.testing.assert_close(got["boxes"], want["boxes"])
        assert torch.equal(got["labels"], plain["labels"])  # dataset classes, offset removed
