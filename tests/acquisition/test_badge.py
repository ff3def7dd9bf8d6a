import pytest
import torch

from alrun.acquisition.badge import Badge, box_gradients, gradient_embeddings
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.errors import AlrunError
from alrun.types import Detections


def test_closed_form_equals_autograd_for_a_softmax_linear_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4, bias=False)  # 3 classes + background (last)
    feats = torch.randn(5, 6)
    logits = layer(feats)
    probs = torch.softmax(logits, dim=1)
    pred = probs[:, :3].argmax(dim=1)  # the predicted foreground class is the label
    for b in range(5):
        layer.zero_grad()
        torch.nn.functional.cross_entropy(logits[b : b + 1], pred[b : b + 1]).backward(
            retain_graph=True
        )
        expected = layer.weight.grad.flatten().double()
        got = box_gradients(probs[b : b + 1].detach(), pred[b : b + 1], feats[b : b + 1])[0]
        assert torch.allclose(got, expected, atol=1e-6)


def test_closed_form_equals_autograd_for_sigmoid_heads():
    torch.manual_seed(1)
    layer = torch.nn.Linear(5, 3, bias=False)
    feats = torch.randn(1, 5)
    logits = layer(feats)
    pred = logits.argmax(dim=1)
    target = torch.nn.functional.one_hot(pred, 3).float()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum").backward()
    got = box_gradients(torch.sigmoid(logits).detach(), pred, feats)[0]
    assert torch.allclose(got, layer.weight.grad.flatten().double(), atol=1e-6)


def sigmoid_image(image_id, class_probs, labels, feats, scores=None):
    class_probs = torch.tensor(class_probs, dtype=torch.float32)
    n = len(labels)
    return Detections(
        image_id=image_id,
        boxes=torch.zeros((n, 4)),
        scores=torch.tensor(scores or [0.9] * n, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        probs=torch.cat([class_probs, torch.zeros((n, 1))], dim=1),
        class_probs=class_probs,
        feats=torch.tensor(feats, dtype=torch.float32),
        head="sigmoid",
    )


def test_per_image_sum_and_threshold():
    a = sigmoid_image("a", [[0.5, 0.0], [1.0, 0.0]], [0, 0], [[2.0], [3.0]])
    b = sigmoid_image("b", [[0.25, 0.5]], [1], [[4.0]], scores=[0.01])  # below threshold
    batch = PredictionBatch.from_detections([a, b])
    emb = gradient_embeddings(batch, [0, 1], score_threshold=0.05)
    # box 0: (0.5 - 1, 0) * 2 = (-1, 0); box 1: (1 - 1, 0) * 3 = 0
    assert emb[0].tolist() == pytest.approx([-1.0, 0.0])
    assert emb[1].tolist() == [0.0, 0.0]
    mean = gradient_embeddings(batch, [0], score_threshold=0.05, aggregate="mean")
    assert mean[0].tolist() == pytest.approx([-0.5, 0.0])


def test_badge_selects_images_with_distinct_gradients():
    # confident images have ~zero gradients; two groups of uncertain images point opposite ways
    imgs = [sigmoid_image(f"z{k}", [[0.999, 0.0]], [0], [[1.0, 0.0]]) for k in range(6)]
    imgs += [sigmoid_image(f"p{k}", [[0.1, 0.0]], [0], [[5.0, 0.0]]) for k in range(3)]
    imgs += [sigmoid_image(f"n{k}", [[0.0, 0.1]], [1], [[0.0, 5.0]]) for k in range(3)]
    batch = PredictionBatch.from_detections(imgs)
    ids = batch.image_ids
    for seed in range(3):
        ctx = AcquisitionContext(ids, seed, 1, budget=3, preds=batch)
        picked = Badge()({i: 0.0 for i in ids}, ctx)
        assert len(picked) == 3
        assert {p[0] for p in picked} == {"z", "p", "n"}  # one per gradient cluster


def test_badge_needs_feats():
    d = Detections(
        image_id="a",
        boxes=torch.zeros((1, 4)),
        scores=torch.ones(1),
        labels=torch.zeros(1, dtype=torch.int64),
        probs=torch.tensor([[0.5, 0.5]]),
    )
    batch = PredictionBatch.from_detections([d])
    ctx = AcquisitionContext(("a",), 0, 1, budget=1, preds=batch)
    with pytest.raises(AlrunError, match="box features"):
        Badge()({"a": 0.0}, ctx)
    with pytest.raises(AlrunError, match="aggregate"):
        Badge(aggregate="max")
