"""Bad input for the reference-faithful options of issue 19: one line naming the key, refused
before anything is built or written (cf. tests/test_params.py)."""

from __future__ import annotations

import pytest

from alrun.errors import AlrunError
from alrun.loop import run_experiment
from tests.helpers import compose_config

CASES = [
    (["strategy=ppal", "strategy.scorer.min_box_size=-1"], "strategy.scorer.min_box_size"),
    (["strategy=ppal", "strategy.scorer.max_aspect_ratio=1"], "strategy.scorer.max_aspect_ratio"),
    (["strategy=ppal", "strategy.scorer.count_sources=twice"], "strategy.scorer.count_sources"),
    (["strategy=entropy", "+strategy.scorer.count_sources=twice"],
     "strategy.scorer.count_sources"),
    (["strategy=badge", "strategy.selector.seeding=greedy"], "strategy.selector.seeding"),
    (["strategy=box_in_box", "strategy.scorer.min_area_ratio=0.5"],
     "strategy.scorer.min_area_ratio"),
    (["strategy=box_in_box", "strategy.scorer.pairs=every"], "strategy.scorer.pairs"),
    # a variant option the method does not have
    (["strategy=box_in_box", "+strategy.scorer.count_sources=once"],
     "strategy.scorer.count_sources"),
    (["strategy=loc_stability", "strategy.scorer.max_boxes=0"], "strategy.scorer.max_boxes"),
    (["strategy=cald", "strategy.scorer.base_point=-1"], "strategy.scorer.base_point"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "key"), CASES, ids=[c[1] + "-" + c[0][0] for c in CASES])
def test_bad_option_is_one_line_naming_the_key(overrides, key, tmp_path):
    base = ["experiment=smoke", "dataset=voc", f"dataset.root={tmp_path / 'absent'}"]
    with pytest.raises(AlrunError) as err:
        run_experiment(compose_config([*base, *overrides]), tmp_path / "run")
    assert str(err.value).startswith(f"{key}:"), str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "run").exists()
