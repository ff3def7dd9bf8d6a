"""Supervision regimes: how the labelled pool becomes detector training."""
