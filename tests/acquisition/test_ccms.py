import pytest
import torch

from alrun.acquisition.ccms import CCMSKCentroid, batch_ccms, ccms_matrix, k_centroid
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import TwoPhase
from alrun.errors import AlrunError
from alrun.types import Detections


def image(image_id, feats, labels, scores=None):
    feats = torch.as_tensor(feats, dtype=torch.float32)
    n = len(feats)
    return Detections(
        image_id=image_id,
        boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]] * n).reshape(n, 4),
        scores=torch.as_tensor(scores if scores is not None else [0.9] * n, dtype=torch.float32),
        labels=torch.as_tensor(labels, dtype=torch.int64),
        feats=feats.reshape(n, feats.shape[-1]),
    )


def sim_of(*images, threshold=0.05):
    batch = PredictionBatch.from_detections(list(images))
    return batch_ccms(batch, list(range(len(images))), threshold)


def test_two_images_with_identical_boxes_have_similarity_one():
    a = image("a", [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], [0, 1])
    b = image("b", [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], [0, 1])
    sim = sim_of(a, b)
    assert sim[0, 1].item() == pytest.approx(1.0)
    assert sim[0, 0].item() == pytest.approx(1.0)


def test_matching_is_conditioned_on_the_class():
    # same features, different classes: no same-class match in either direction -> -1
    a = image("a", [[1.0, 0.0]], [0])
    b = image("b", [[1.0, 0.0]], [1])
    assert sim_of(a, b)[0, 1].item() == pytest.approx(-1.0)


def test_ccms_hand_computed_value():
    # a: class 0 (1, 0) score 0.9, class 1 (0, 1) score 0.1
    # b: class 0 (1, 1)/sqrt2 score 0.5
    # a->b: box0 best cos = 1/sqrt2, box1 no class-1 box -> -1: (0.9/sqrt2 - 0.1) / 1.0
    # b->a: its class-0 box matches a's box0 at 1/sqrt2
    a = image("a", [[1.0, 0.0], [0.0, 1.0]], [0, 1], [0.9, 0.1])
    b = image("b", [[1.0, 1.0]], [0], [0.5])
    s = 2**-0.5
    expected = ((0.9 * s - 0.1) + s) / 2
    assert sim_of(a, b)[0, 1].item() == pytest.approx(expected)
    assert sim_of(a, b)[1, 0].item() == pytest.approx(expected)  # symmetric


def test_score_threshold_and_empty_images():
    a = image("a", [[1.0, 0.0]], [0], [0.01])  # below threshold: treated as empty
    b = image("b", torch.zeros((0, 2)), [])
    c = image("c", [[1.0, 0.0]], [0])
    sim = sim_of(a, b, c)
    assert sim[0, 1].item() == pytest.approx(1.0)  # two empty images
    assert sim[0, 2].item() == pytest.approx(-1.0)


def test_ccms_blocks_give_the_same_matrix():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 5, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    weights = torch.rand(40, generator=g)
    segment = torch.sort(torch.randint(0, 9, (40,), generator=g)).values
    full = ccms_matrix(feats, labels, weights, segment, 10)
    blocked = ccms_matrix(feats, labels, weights, segment, 10, block_boxes=7)
    assert torch.allclose(full, blocked)


def test_k_centroid_picks_one_image_per_group():
    # three tight groups: {0,1,2}, {3,4}, {5,6,7}
    pos = torch.tensor([0.0, 0.1, 0.2, 10.0, 10.1, 20.0, 20.1, 20.2])
    dist = (pos[:, None] - pos[None, :]).abs()
    centres = k_centroid(dist, 3, first=0)
    groups = [0, 0, 0, 1, 1, 2, 2, 2]
    assert sorted(groups[c] for c in centres) == [0, 1, 2]
    assert 1 in centres and 6 in centres  # medoids: the middle members


def test_ccms_selector_in_two_phase_picks_distinct_content():
    # four candidates with high scores: two near-copies of class-0 content, two of class 1
    imgs = [
        image("a", [[1.0, 0.0]], [0]),
        image("b", [[1.0, 0.05]], [0]),
        image("c", [[0.0, 1.0]], [1]),
        image("d", [[0.05, 1.0]], [1]),
        image("e", [[1.0, 1.0]], [2]),
    ]
    batch = PredictionBatch.from_detections(imgs)
    ctx = AcquisitionContext(batch.image_ids, 0, 1, budget=2, preds=batch)
    scores = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.0}
    picked = TwoPhase(CCMSKCentroid(), expand_ratio=2)(scores, ctx)
    assert len(picked) == 2
    assert {p in ("a", "b") for p in picked} == {True, False}  # one of each class group


def test_ccms_errors_without_feats_and_on_too_many_candidates():
    d = Detections(
        image_id="a",
        boxes=torch.zeros((1, 4)),
        scores=torch.ones(1),
        labels=torch.zeros(1, dtype=torch.int64),
    )
    batch = PredictionBatch.from_detections([d, d])
    ctx = AcquisitionContext(("a",), 0, 1, budget=1, preds=batch)
    with pytest.raises(AlrunError, match="box features"):
        CCMSKCentroid()({"a": 1.0}, ctx)
    imgs = [image(f"i{k}", [[1.0, float(k)]], [0]) for k in range(5)]
    batch = PredictionBatch.from_detections(imgs)
    ctx = AcquisitionContext(batch.image_ids, 0, 1, budget=1, preds=batch)
    with pytest.raises(AlrunError, match="max_candidates"):
        CCMSKCentroid(max_candidates=4)({i: 0.0 for i in batch.image_ids}, ctx)
