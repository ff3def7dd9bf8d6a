import pytest

from alrun.budget import Budget
from alrun.errors import AlrunError, BudgetError


def test_constant_schedule():
    budget = Budget.from_config(initial=20, per_round=10, rounds=3)
    assert budget.initial == 20.0
    assert budget.unit == "images"
    assert budget.schedule() == [10.0, 10.0, 10.0]
    assert [budget.amount(r) for r in range(3)] == [10.0, 10.0, 10.0]
    with pytest.raises(IndexError):
        budget.amount(3)


def test_list_schedule():
    budget = Budget.from_config(initial=300.0, per_round=[100, 200.5, 50], rounds=3, unit="seconds")
    assert budget.unit == "seconds"
    assert [budget.amount(r) for r in range(3)] == pytest.approx([100.0, 200.5, 50.0])


def test_list_longer_than_rounds_is_an_error():
    """Extra amounts used to be dropped silently (issue 7)."""
    with pytest.raises(BudgetError, match=r"budget\.per_round: 4 amounts listed for 2 rounds"):
        Budget.from_config(initial=5, per_round=[1, 2, 3, 4], rounds=2, unit="boxes")


def test_zero_rounds():
    assert Budget.from_config(initial=5, per_round=3, rounds=0).schedule() == []


def test_unknown_unit():
    with pytest.raises(BudgetError, match=r"budget\.unit"):
        Budget.from_config(initial=5, per_round=3, rounds=2, unit="minutes")


@pytest.mark.parametrize("initial", [0, -1, -0.5])
def test_non_positive_initial(initial):
    with pytest.raises(BudgetError, match=r"budget\.initial"):
        Budget.from_config(initial=initial, per_round=3, rounds=2)


@pytest.mark.parametrize("per_round", [0, -2, [1, 0, 2], [3, 2, -1]])
def test_non_positive_per_round(per_round):
    with pytest.raises(BudgetError, match=r"budget\.per_round"):
        Budget.from_config(initial=5, per_round=per_round, rounds=3)


def test_list_shorter_than_rounds():
    with pytest.raises(BudgetError, match="2 amounts listed for 3 rounds"):
        Budget.from_config(initial=5, per_round=[1, 2], rounds=3)


def test_negative_rounds():
    with pytest.raises(BudgetError, match=r"budget\.rounds"):
        Budget.from_config(initial=5, per_round=1, rounds=-1)


def test_budget_error_is_alrun_error():
    assert issubclass(BudgetError, AlrunError)


def _pool_with_empty_share(n=500, empty_every=5):
    """n images, every ``empty_every``-th without objects (20 %), the others 1-5 boxes."""
    from pathlib import Path

    import numpy as np

    from alrun.data.dataset import DetectionDataset, ImageRecord

    rng = np.random.default_rng(0)
    records = []
    for k in range(n):
        m = 0 if k % empty_every == 0 else int(rng.integers(1, 6))
        boxes = np.tile(np.array([[1, 1, 9, 9]], dtype=np.float32), (m, 1))
        records.append(
            ImageRecord(f"im{k:04d}", Path("x.png"), 16, 16, boxes, np.zeros(m, dtype=np.int64))
        )
    return DetectionDataset("toy", ("a",), tuple(records))


@pytest.mark.parametrize("unit", ["boxes", "seconds"])
def test_random_initial_set_keeps_the_pool_share_of_empty_images(unit):
    from types import SimpleNamespace

    from alrun.loop import initial_selection
    from alrun.oracle import CostModel, SimulatedOracle
    from alrun.pool import LabelPool
    from alrun.supervision.full import FullSupervision
    from alrun.truth import HiddenTruth

    dataset = _pool_with_empty_share()
    pool = LabelPool(dataset)
    amount = 300.0 if unit == "boxes" else 300 * 25.5
    shares = []
    for seed in range(20):
        exp = SimpleNamespace(
            budget=Budget.from_config(amount, 10, 1, unit),
            oracle=SimulatedOracle(CostModel()),
            regime=FullSupervision(),
            seed=seed,
            initial_ids=None,
        )
        exp.oracle.hold_truth(HiddenTruth(dataset.images))
        picked = initial_selection(exp, pool)
        truth = dataset.by_id()
        shares.append(sum(truth[i].num_boxes == 0 for i in picked) / len(picked))
    # ~115 images a seed; the mean over 20 seeds has a standard error of about 0.008
    assert sum(shares) / len(shares) == pytest.approx(0.2, abs=0.03)


def test_every_image_costs_something_in_every_unit():
    from alrun.budget import image_cost
    from alrun.oracle import CostModel, SimulatedOracle

    empty = _pool_with_empty_share(5).images[0]
    assert empty.num_boxes == 0
    oracle = SimulatedOracle(CostModel())
    assert image_cost("images", empty, oracle) == 1.0
    assert image_cost("boxes", empty, oracle) == 1.0
    assert image_cost("seconds", empty, oracle) == CostModel().empty_image_s > 0


def test_unknown_fill_policy_is_a_budget_error():
    with pytest.raises(BudgetError, match="budget.fill"):
        Budget.from_config(10, 5, 2, "images", fill="greedy")
