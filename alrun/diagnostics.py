"""Health checks on a round's model, so a collapsed model is never carried on silently.

A model that collapsed (e.g. training from scratch that diverged or whose box regression died)
still "selects" images in the next round - with a dead model - which silently wrecks every
paired comparison of that seed. The loop records the verdict in metrics.json and results.csv
and warns in the log.
"""

from __future__ import annotations

from collections.abc import Mapping


def collapse_reason(
    map50: float,
    train_stats: Mapping[str, float],
    min_map50: float = 0.01,
    min_loss_drop: float = 0.05,
) -> str | None:
    """Why this round's model looks collapsed, or None when it looks healthy.

    Collapsed means either the test mAP50 is below ``min_map50`` (no better than detecting
    nothing), or the training loss ended less than ``min_loss_drop`` (relative) below where it
    started - checked only for training from random init, where the loss must fall.
    """
    reasons = []
    if map50 < min_map50:
        reasons.append(f"test mAP50 {map50:.3f} < {min_map50:g}")
    first, final = train_stats.get("first_loss"), train_stats.get("final_loss")
    if train_stats.get("from_scratch") and first is not None and final is not None:
        if not final < first * (1.0 - min_loss_drop):
            reasons.append(f"training loss did not decrease ({first:.3f} -> {final:.3f})")
    return "; ".join(reasons) or None
