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
