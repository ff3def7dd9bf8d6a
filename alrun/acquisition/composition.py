"""Start-up checks on a composed strategy (``strategy/scorer``, ``strategy/passes``,
``strategy/selector``): a pair the groups allow but no scorer can run is refused in one line
naming the groups, before Hydra's key checks would name only the stray key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alrun.errors import AlrunError

PASS_UNCERTAINTY = "alrun.acquisition.multipass.PassUncertainty"
#: what ``strategy/passes`` writes into the scorer (alrun/configs/strategy/passes/*.yaml)
PASS_SOURCE = "source"
#: the multi-pass scorer options (alrun/configs/strategy/scorer/*.yaml built on base/multipass)
MULTI_PASS_SCORERS = (
    "bald", "entropy_of_mean", "margin_of_mean", "variation_ratio", "box_disagreement",
    "augmentation_inconsistency", "localization_stability", "localization_tightness",
)  # fmt: skip


def check_composition(strategy: Mapping[str, Any] | None) -> None:
    """Refuse ``strategy/passes`` on a single-pass scorer (entropy, ppal, random, ...): its
    scorer would get a ``source`` it does not take."""
    if not isinstance(strategy, Mapping):
        return
    scorer = strategy.get("scorer")
    if not isinstance(scorer, Mapping) or PASS_SOURCE not in scorer:
        return
    target = scorer.get("_target_")
    if target != PASS_UNCERTAINTY:
        raise AlrunError(
            f"strategy/passes={scorer[PASS_SOURCE]}: strategy.scorer ({target}) is a single-pass "
            "scorer; drop strategy/passes or choose a multi-pass strategy/scorer="
            f"{'|'.join(MULTI_PASS_SCORERS)}"
        )
