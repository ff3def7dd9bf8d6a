"""Parity with PPAL's reference code (github.com/ChenhongyiYang/PPAL, commit 7b78b40).

* DCUS image score: ``mmdet/ppal/sampler/difficulty_calibrated_uncertainty_sampler.py``
  ``DCUSSampler.al_acquisition`` with ``BaseALSampler.is_box_valid`` (size_thr 16, ratio_thr 5)
  and the per-detection ``cls_uncertainty`` of ``RetinaHeadUncertainty._bbox_post_process``.
* class quality: ``mmdet/ppal/models/retinanet_al/retinanet_quality_head.py``
  ``RetinaQualityEMAHead.loss_single`` (per positive anchor ``p^xi * IoU^(1-xi)``, xi 0.6) and
  ``RetinaQualityEMAHead.loss`` (per-batch class mean with ``+1e-5``, EMA from 0, momentum reset
  to ``base_momentum`` when the mean is > 0, else multiplied by it); ``base_momentum=0.99`` from
  ``configs/voc_active_learning/al_train/retinanet_26e.py``.
* CCMS features: ``mmdet/ppal/models/retinanet_al/al_retinanet_feat_head.py``
  ``RetinaHeadFeat.forward_single`` (the classification tower's output) sampled by
  ``mmdet/ppal/models/utils.py`` ``get_inter_feats`` (bilinear ``grid_sample`` at the box centre).
* k-centroid: ``mmdet/ppal/sampler/diversity_sampler.py`` ``DiversitySampler.kmeans``
  (``n_iter=100``).

Expected numbers come from :func:`_reference_image_score`, a transcription of the reference
arithmetic on these hand-made inputs (not an import of it), and are also written out as literals.
"""

from __future__ import annotations

import math

import pytest
import torch

from alrun.acquisition.ccms import CCMSKCentroid, k_centroid
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.ppal import DifficultyCalibratedUncertainty, class_weights
from alrun.errors import AlrunError
from alrun.types import Detections
from tests.helpers import compose_config

UB, ALPHA = 0.2, 0.3


def _reference_image_score(boxes, scores, qualities, labels, score_thr=0.05):
    """DCUSSampler: sum over valid detections with score >= score_thr of binary entropy (eps
    1e-10 inside the logs) times 1 + alpha * log(b * (1 - q) + 1) * ub; 0 for no detection."""
    b = math.exp(1 / ALPHA) - 1
    total = 0.0
    for (x1, y1, x2, y2), s, c in zip(boxes, scores, labels):
        w, h = x2 - x1, y2 - y1
        valid = math.sqrt(w * h) > 16 and w / (h + 1e-10) < 5 and h / (w + 1e-10) < 5
        if not valid or s < score_thr:
            continue
        u = -(s * math.log(s + 1e-10) + (1 - s) * math.log(1 - s + 1e-10))
        total += u * (1 + ALPHA * math.log(b * (1 - qualities[c]) + 1) * UB)
    return total


def _image(image_id, boxes, scores, labels, sources):
    """A sigmoid-head image whose class-``label`` probability is the detector score."""
    n = len(scores)
    class_probs = torch.zeros(n, 2)
    class_probs[torch.arange(n), torch.tensor(labels, dtype=torch.int64)] = torch.tensor(scores)
    return Detections(
        image_id=image_id,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        probs=torch.cat([class_probs, 1 - class_probs.sum(1, keepdim=True)], dim=1),
        class_probs=class_probs,
        sources=torch.tensor(sources, dtype=torch.int64),
        head="sigmoid",
    )


# No labelled boxes: every class has quality 0 and weight 1 + ub = 1.2.
POOL = {
    # a normal 40x40 box and a 10x10 one (sqrt(wh) = 10 <= 16), both at p = 0.4235
    "normal_and_tiny": ([[0, 0, 40, 40], [50, 50, 60, 60]], [0.4235, 0.4235], [0, 0], [0, 1]),
    # one 100x18 box: ratio 5.56 >= 5
    "elongated": ([[0, 0, 100, 18]], [0.315], [0], [0]),
    # per-class NMS kept anchor 7 for class 0 (p = 0.625) and class 1 (p = 0.335)
    "two_classes": ([[0, 0, 40, 40], [0, 0, 40, 40]], [0.625, 0.335], [0, 1], [7, 7]),
    "empty": ([], [], [], []),
}


def _scores(**options):
    dets = [_image(i, *spec) for i, spec in POOL.items()]
    ctx = AcquisitionContext(tuple(POOL), 0, 1, preds=PredictionBatch.from_detections(dets))
    scorer = DifficultyCalibratedUncertainty(**options)
    if scorer.quality_hook is not None:
        scorer.quality_hook.reset(2)  # before any training: quality 0 for both classes
    return scorer(ctx)


def test_dcus_matches_ppal_dcus_sampler():
    scores = _scores()
    for image_id, (boxes, s, labels, _) in POOL.items():
        expected = _reference_image_score(boxes, s, [0.0, 0.0], labels)
        assert scores[image_id] == pytest.approx(expected, abs=1e-6), image_id
    # the numbers of issue 19
    assert scores["normal_and_tiny"] == pytest.approx(0.818, abs=5e-4)
    assert scores["elongated"] == 0.0
    assert scores["two_classes"] == pytest.approx(1.559, abs=5e-4)
    assert scores["empty"] == 0.0


def test_count_sources_once_and_no_validity_is_alruns_previous_score():
    # alrun's rule, as named options: one row per anchor (the higher-scored class), no filter
    scores = _scores(count_sources="once", min_box_size=0.0, max_aspect_ratio=math.inf)
    assert scores["normal_and_tiny"] == pytest.approx(1.635, abs=5e-4)
    assert scores["elongated"] == pytest.approx(0.748, abs=5e-4)
    assert scores["two_classes"] == pytest.approx(0.794, abs=5e-4)


def test_ppal_preset_is_faithful():
    cfg = compose_config(["strategy=ppal"])
    scorer = cfg.strategy.scorer
    assert scorer.count_sources == "per_class"
    assert scorer.min_box_size == 16
    assert scorer.max_aspect_ratio == 5
    assert cfg.strategy.selector.diversity.iterations == 100


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ({"min_box_size": -1.0}, "strategy.scorer.min_box_size"),
        ({"max_aspect_ratio": 0.5}, "strategy.scorer.max_aspect_ratio"),
        ({"count_sources": "twice"}, "strategy.scorer.count_sources"),
    ],
)
def test_bad_dcus_options_name_the_key(option, key):
    with pytest.raises(AlrunError, match=key.replace(".", r"\.")) as err:
        DifficultyCalibratedUncertainty(**option)
    assert "\n" not in str(err.value)


def _reference_kmeans(dis, k, first, n_iter):
    """DiversitySampler.kmeans: farthest-first from ``first``, then ``n_iter`` medoid updates
    (assign to the nearest centre, move each centre to its member of least summed distance)."""
    centroids = [first]
    while len(centroids) < k:
        d = dis[:, centroids].min(dim=1).values.clone()
        d[centroids] = -1
        centroids.append(int(d.argmax()))
    for _ in range(n_iter):
        assign = dis[:, centroids].argmin(dim=1)
        new = []
        for i in range(k):
            members = torch.nonzero(assign == i).flatten()
            new.append(int(members[dis[members][:, members].sum(dim=1).argmin()]))
        centroids = new
    return centroids


def test_k_centroid_matches_ppal_kmeans_with_100_iterations():
    g = torch.Generator().manual_seed(3)
    points = torch.randn(60, 2, generator=g, dtype=torch.float64)
    dis = torch.cdist(points, points)
    expected = _reference_kmeans(dis, 6, 11, 100)
    assert sorted(k_centroid(dis, 6, 11, 100)) == sorted(expected)
    assert CCMSKCentroid().iterations == 100


# --- class quality: RetinaQualityEMAHead --------------------------------------------------------
def _reference_ema(batches, num_classes, base=0.99, xi=0.6):
    """RetinaQualityEMAHead.loss, transcribed: per batch of (class, p, iou) anchors."""
    quality, momentum = [0.0] * num_classes, [base] * num_classes
    for anchors in batches:
        total, count = [0.0] * num_classes, [0.0] * num_classes
        for c, p, iou in anchors:
            total[c] += p**xi * iou ** (1 - xi)
            count[c] += 1
        avg = [t / (n + 1e-5) for t, n in zip(total, count)]
        quality = [m * q + (1 - m) * a for m, q, a in zip(momentum, quality, avg)]
        momentum = [base if a > 0 else m * base for m, a in zip(momentum, avg)]
    return quality, momentum


ISSUE_ANCHORS = [(0, 0.9, 0.9), (0, 0.5, 0.6), (0, 0.3, 0.55), (0, 0.2, 0.5)]


def _feed(hook, batches):
    for anchors in batches:
        labels = torch.tensor([c for c, _, _ in anchors], dtype=torch.int64)
        p = torch.tensor([x for _, x, _ in anchors], dtype=torch.float64)
        iou = torch.tensor([x for _, _, x in anchors], dtype=torch.float64)
        hook._collect(labels, p, iou)
        hook.after_step(None)


def test_quality_ema_matches_retina_quality_ema_head():
    from alrun.acquisition.ppal import ClassQualityEMA

    hook = ClassQualityEMA(xi=0.6, momentum=0.99)
    hook.reset(2)
    # class 1 in the first batch only: its quality decays with a shrinking momentum after
    batches = [ISSUE_ANCHORS + [(1, 0.5, 0.5)], ISSUE_ANCHORS, ISSUE_ANCHORS]
    _feed(hook, batches)
    quality, momentum = _reference_ema(batches, 2)
    assert hook.quality.tolist() == pytest.approx(quality, rel=1e-12)
    assert hook.momentum.tolist() == pytest.approx(momentum, rel=1e-12)
    # hand numbers: batch mean of class 0 is 2.10874 / 4.00001; one step from 0 gives 1 % of it
    assert quality[0] == pytest.approx(0.527185 * (1 - 0.99**3), abs=1e-6)
    assert quality[1] == pytest.approx(0.01 * 0.5 / 1.00001 * 0.99 * 0.99**2, rel=1e-9)
    assert momentum == pytest.approx([0.99, 0.99**3])


def test_quality_ema_issue_check_converges_to_0527_and_weight_1157():
    from alrun.acquisition.ppal import ClassQualityEMA

    hook = ClassQualityEMA(xi=0.6, momentum=0.99)
    hook.reset(1)
    _feed(hook, [ISSUE_ANCHORS] * 2000)  # the running average settles on the batch mean
    (quality,) = hook.quality.tolist()
    assert quality == pytest.approx(0.527, abs=5e-4)
    assert class_weights([quality], UB, ALPHA)[0] == pytest.approx(1.157, abs=5e-4)
    assert _reference_ema([ISSUE_ANCHORS] * 2000, 1)[0][0] == pytest.approx(quality, rel=1e-12)


def test_quality_ema_scores_the_pool_with_the_hooks_quality():
    scorer = DifficultyCalibratedUncertainty()
    assert scorer.quality == "ema" and scorer.training_hooks == (scorer.quality_hook,)
    assert not scorer.needs.labelled_detections  # no predictions on the labelled set needed
    scorer.quality_hook.reset(2)
    _feed(scorer.quality_hook, [ISSUE_ANCHORS] * 2000)
    dets = [_image("a", [[0, 0, 40, 40]], [0.4235], [0], [0])]
    ctx = AcquisitionContext(("a",), 0, 1, preds=PredictionBatch.from_detections(dets))
    q0 = scorer.quality_hook.quality.tolist()
    expected = _reference_image_score([[0, 0, 40, 40]], [0.4235], q0, [0])
    assert scorer(ctx)["a"] == pytest.approx(expected, abs=1e-6)
    assert scorer.describe()["class_weights"][0] == pytest.approx(1.157, abs=5e-4)


def test_quality_ema_before_any_training_is_a_clear_error():
    dets = [_image("a", [[0, 0, 40, 40]], [0.4235], [0], [0])]
    ctx = AcquisitionContext(("a",), 0, 1, preds=PredictionBatch.from_detections(dets))
    with pytest.raises(AlrunError, match=r"^strategy\.scorer\.quality=ema: .*post_nms$"):
        DifficultyCalibratedUncertainty()(ctx)


@pytest.mark.parametrize(
    ("option", "key"),
    [({"quality": "best"}, "strategy.scorer.quality"), ({"quality_momentum": 1.0}, "momentum")],
)
def test_bad_quality_options_name_the_key(option, key):
    with pytest.raises(AlrunError, match=key.replace(".", r"\.")) as err:
        DifficultyCalibratedUncertainty(**option)
    assert "\n" not in str(err.value)


def test_quality_ema_trains_through_the_engine_on_tiny_fcos():
    """End to end: the hook, passed through the engine, watches a tiny FCOS's real positive
    anchors and keeps exactly the reference EMA of what it saw, batch by batch."""
    from functools import partial

    from alrun.acquisition.ppal import ClassQualityEMA
    from alrun.data.synthetic import synthetic_dataset
    from alrun.detectors.base import TrainSchedule
    from alrun.detectors.tiny import tiny_fcos
    from alrun.detectors.torchvision import TorchvisionDetector
    from alrun.engine import BatchSource, train

    data = synthetic_dataset(4, image_size=64, split="ema")
    classes = len(data.classes)
    det = TorchvisionDetector(partial(tiny_fcos, image_size=64), classes, device="cpu")
    hook = ClassQualityEMA()
    seen = []
    collect = hook._collect

    def recording(labels, p, iou):
        seen.append(list(zip(labels.tolist(), p.tolist(), iou.tolist())))
        collect(labels, p, iou)

    hook._collect = recording
    schedule = TrainSchedule(iterations=3, warmup_iters=1, batch_size=2)
    stats = train(det, [BatchSource("labelled", data)], schedule, 0, True, [hook])
    assert len(seen) == 3 and all(len(batch) > 0 for batch in seen)
    assert all(0 <= c < classes and 0 < p < 1 and 0 <= iou <= 1 for b in seen for c, p, iou in b)
    quality, _ = _reference_ema(seen, classes)
    assert hook.quality.tolist() == pytest.approx(quality, rel=1e-6)
    assert stats["ppal_quality/class_0"] == pytest.approx(quality[0], rel=1e-6)
    assert "compute_loss" not in det.model.head.__dict__  # stopped watching after training
