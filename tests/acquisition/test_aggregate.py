import pytest
import torch

from alrun.acquisition.aggregate import AGGREGATORS, aggregate

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("sum", 12.0), ("mean", 3.0), ("max", 6.0), ("min", 1.0)],
)
def test_plain_aggregators(name, expected):
    assert aggregate(SCORES, name) == pytest.approx(expected)


def test_weighted_is_confidence_weighted_mean():
    # sum(c*s) / sum(c) = (0.5*1 + 0.25*2 + 0.25*3 + 0*6) / (0.5 + 0.25 + 0.25 + 0) = 1.75
    conf = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert aggregate(SCORES, "weighted", conf) == pytest.approx(1.75)
    # (1*1 + 1*6) / 2 = 3.5
    assert aggregate(SCORES, "weighted", torch.tensor([1.0, 0.0, 0.0, 1.0])) == pytest.approx(3.5)
    # equal weights: the plain mean
    assert aggregate(SCORES, "weighted", torch.full((4,), 0.3)) == pytest.approx(3.0)


def test_single_box():
    for name in ("sum", "mean", "max", "min"):
        assert aggregate(torch.tensor([0.4]), name) == pytest.approx(0.4)
    assert aggregate(torch.tensor([0.4]), "weighted", torch.tensor([0.9])) == pytest.approx(0.4)


def test_returns_python_float():
    assert isinstance(aggregate(SCORES, "mean"), float)


def test_weighted_without_confidences_raises():
    with pytest.raises(ValueError, match="confidences"):
        aggregate(SCORES, "weighted")


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="strategy.aggregator"):
        aggregate(SCORES, "median")
    assert "median" not in AGGREGATORS


@pytest.mark.parametrize("name", AGGREGATORS)
def test_empty_raises(name):
    with pytest.raises(ValueError):
        aggregate(torch.zeros(0), name, torch.zeros(0))


def _reference(s: torch.Tensor, name: str, c: torch.Tensor) -> float:
    """Straightforward per-image reductions, the oracle for the vectorised version."""
    if name == "weighted":
        return float((c * s).sum() / c.sum())
    return float(getattr(s, name)())


@pytest.mark.parametrize("name", ["sum", "mean", "max", "min", "weighted"])
def test_segment_aggregation_equals_per_image(name):
    from alrun.acquisition.aggregate import aggregate_segments

    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 1, 5, 2]
    scores = torch.rand(sum(counts), generator=gen)
    conf = torch.rand(sum(counts), generator=gen)
    segment = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    batched = aggregate_segments(scores, segment, len(counts), name, conf)
    start = 0
    for i, n in enumerate(counts):
        if n == 0:
            assert torch.isnan(batched[i])
        else:
            expected = _reference(scores[start : start + n], name, conf[start : start + n])
            assert batched[i].item() == pytest.approx(expected, rel=1e-6)
        start += n


def test_class_weights_multiply_each_box_by_its_class_weight():
    from alrun.acquisition.aggregate import class_weighted

    scores = torch.tensor([1.0, 2.0, 3.0])
    labels = torch.tensor([0, 1, 0])
    # class 0 x 2, class 1 x 0.5: [2, 1, 6]
    assert class_weighted(scores, labels, (2.0, 0.5)).tolist() == pytest.approx([2.0, 1.0, 6.0])
    assert class_weighted(scores, labels, None).tolist() == pytest.approx([1.0, 2.0, 3.0])


@pytest.mark.parametrize("weights", [[], [1.0, -1.0], "abc", [float("nan")]])
def test_bad_class_weights_are_one_line_errors(weights):
    from alrun.acquisition.aggregate import check_class_weights
    from alrun.errors import AlrunError

    with pytest.raises(AlrunError, match="strategy.scorer.class_weights"):
        check_class_weights(weights)
