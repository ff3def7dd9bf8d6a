"""Composable strategies: strategy/scorer x strategy/passes x strategy/selector config groups.

The 32 presets are defaults lists of those groups; ``strategy_presets.json`` is the composed
``strategy`` config of every preset as it was before the groups existed (generated from the
one-file-per-preset configs; qbc, mi_aod and compas from theirs when they joined; PPAL quality and
CCMS features and ComPAS re-ask keys added with their new defaults), so a preset that
drifts fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alrun.acquisition.composition import MULTI_PASS_SCORERS, PASS_UNCERTAINTY
from alrun.acquisition.scores import mutual_information
from alrun.acquisition.strategies import BoxUncertainty, Strategy
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from tests.helpers import REPO, compose_config

STRATEGY = REPO / "alrun" / "configs" / "strategy"
SNAPSHOT = json.loads((Path(__file__).parent / "strategy_presets.json").read_text())
PRESETS = sorted(p.stem for p in STRATEGY.glob("*.yaml"))
SMOKE = ["experiment=smoke", "quiet=true"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (STRATEGY / group).glob("*.yaml"))


def strategy_config(overrides: list[str]) -> dict:
    """The composed strategy, interpolations as written, but for ``name``: resolved (a composed
    preset's name is its preset's here, outside a Hydra app)."""
    strategy = compose_config(overrides).strategy
    return {**OmegaConf.to_container(strategy, resolve=False), "name": strategy.name}


def refusal(overrides: list[str]) -> str:
    """The one line ``alrun`` prints for a refused config (Hydra's wrapper unwrapped)."""
    try:
        build_experiment(compose_config([*SMOKE, *overrides]))
    except AlrunError as err:
        return str(err)
    except InstantiationException as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        assert isinstance(cause, AlrunError), repr(cause)
        return str(cause)
    raise AssertionError(f"build_experiment accepted {overrides}")


def test_the_snapshot_covers_every_preset():
    assert sorted(SNAPSHOT) == PRESETS and len(PRESETS) == 32
    assert set(MULTI_PASS_SCORERS) <= set(options("scorer"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_exactly_as_before_the_groups(preset: str):
    assert strategy_config([f"strategy={preset}"]) == SNAPSHOT[preset]


def _instantiate(overrides: list[str]) -> Strategy:
    strategy = instantiate(compose_config(overrides).strategy)
    assert isinstance(strategy, Strategy)
    return strategy


@pytest.mark.parametrize("scorer", options("scorer"))
def test_every_scorer_option_composes_with_a_preset(scorer: str):
    strategy = _instantiate(["strategy=random", f"strategy/scorer={scorer}"])
    assert strategy.name == "random" and strategy.selector.describe()["selector"] == "topk"
    # composition.MULTI_PASS_SCORERS (named in its refusals) lists exactly the multi-pass files
    built = type(strategy.scorer)
    multi_pass = f"{built.__module__}.{built.__qualname__}" == PASS_UNCERTAINTY
    assert multi_pass == (scorer in MULTI_PASS_SCORERS)


@pytest.mark.parametrize("selector", options("selector"))
def test_every_selector_option_composes_with_a_preset(selector: str):
    strategy = _instantiate(["strategy=entropy", f"strategy/selector={selector}"])
    assert strategy.describe_unscored()["box_score"] == "entropy"


@pytest.mark.parametrize("passes", options("passes"))
def test_every_passes_option_sets_the_source(passes: str):
    base = "strategy=loc_tightness" if passes == "none" else "strategy=bald"
    strategy = _instantiate([base, f"strategy/passes={passes}"])
    assert strategy.scorer.source == passes


def test_composed_pairs_from_the_issue():
    """``strategy=entropy strategy/selector=kcenter``; ``strategy/scorer=bald`` brings its MC
    dropout along, ``strategy/passes=ensemble`` switches it to an ensemble."""
    pair = _instantiate(["strategy=entropy", "strategy/selector=kcenter"])
    assert pair.describe_unscored()["selector"] == "k_center_greedy"
    assert pair.needs.embedding and pair.needs.probs
    bald = _instantiate(["strategy=entropy", "strategy/scorer=bald"])
    assert (bald.scorer.source, bald.needs.passes) == ("mc_dropout", 10)
    assert bald.needs.head_dropout == 0.2
    ens = _instantiate(["strategy=entropy", "strategy/scorer=bald", "strategy/passes=ensemble"])
    assert (ens.scorer.source, ens.needs.ensemble) == ("ensemble", 3)
    assert strategy_config(["strategy=bald", "strategy/passes=ensemble"]) == strategy_config(
        ["strategy=ensemble_bald", "strategy.name=bald"]
    )


SINGLE_PASS_REFUSAL = (
    "strategy/passes=mc_dropout: strategy.scorer (alrun.acquisition.strategies.BoxUncertainty)"
    " is a single-pass scorer; drop strategy/passes or choose a multi-pass strategy/scorer="
)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["strategy=entropy", "strategy/passes=mc_dropout"],
         SINGLE_PASS_REFUSAL),
        (["strategy=ppal", "strategy/passes=tta"],
         "strategy/passes=tta: strategy.scorer (alrun.acquisition.ppal."),
        (["strategy=bald", "strategy/passes=none"],
         "strategy.scorer.source: 'mutual_information' compares passes, so strategy/passes=none "
         "cannot feed it; choose strategy/passes=mc_dropout|tta|ensemble"),
        (["strategy=entropy",
          "strategy.scorer.box_score._target_=alrun.acquisition.scores.mutual_information"],
         "strategy.scorer.box_score: 'mutual_information' asks for pass_probs, not one class "
         "distribution"),
    ],
)  # fmt: skip
def test_invalid_combinations_are_refused_at_start_up(overrides, needle):
    message = refusal(overrides)
    assert message.startswith(needle) and "\n" not in message, message


def test_box_uncertainty_refuses_a_multi_pass_score():
    with pytest.raises(AlrunError, match="asks for pass_probs"):
        BoxUncertainty(mutual_information)


def test_a_composed_pair_runs_end_to_end(tmp_path):
    """entropy scores x k-center selection, one round of the smoke experiment on real tensors:
    selection.json records the entropy scorer and the k-center selector."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose_config([*SMOKE, "budget.rounds=1", "strategy/selector=kcenter"])
        rows = run_experiment(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert [r["images"] for r in rows] == [10, 20]
    sel = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert (sel["strategy"], sel["box_score"], sel["selector"]) == (
        "entropy",
        "entropy",
        "k_center_greedy",
    )
    assert len(sel["selected"]) == 10


@pytest.mark.integration  # two smoke runs through the CLI, ~15 s
def test_a_sweep_over_scorers(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "alrun.cli", "-m", *SMOKE, "budget.rounds=1",
           "strategy/scorer=entropy,bald", "strategy/selector=kcenter",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    scores = {}
    for path in sorted(sweep.glob("*/round_00/selection.json")):
        sel = json.loads(path.read_text())
        scores[sel["box_score"]] = (sel["selector"], path.parent.parent.name)
    assert set(scores) == {"entropy", "mutual_information"}
    assert {s for s, _ in scores.values()} == {"k_center_greedy"}
    assert all("strategy-scorer=" in name for _, name in scores.values())
