from alrun.diagnostics import collapse_reason


def test_healthy_model_is_not_flagged():
    stats = {"first_loss": 3.0, "final_loss": 1.2, "from_scratch": 1.0}
    assert collapse_reason(0.34, stats) is None


def test_zero_map_is_flagged():
    reason = collapse_reason(0.0, {"first_loss": 3.0, "final_loss": 1.56, "from_scratch": 1.0})
    assert "mAP50 0.000" in reason


def test_loss_that_did_not_fall_from_scratch_is_flagged():
    reason = collapse_reason(0.2, {"first_loss": 1.5, "final_loss": 1.49, "from_scratch": 1.0})
    assert "did not decrease" in reason


def test_loss_check_only_applies_to_training_from_scratch():
    # a continued round starts from a trained model: its loss need not fall much
    assert collapse_reason(0.2, {"first_loss": 1.0, "final_loss": 1.0, "from_scratch": 0.0}) is None
