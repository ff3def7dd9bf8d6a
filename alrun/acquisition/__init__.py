"""Acquisition: per-box scores, per-image aggregation, selection, and strategies composing them."""
