"""Typed, checked configs (alrun/params.py): every setting of every config group is declared
with its type and range, and a bad value is refused at start-up naming its key, before any data
is read or any file is written."""

from __future__ import annotations

import copy
import functools
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

import pytest
import torch
from omegaconf import OmegaConf

from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.params import (
    HYDRA_KEYS,
    Fraction,
    NonNegativeFloat,
    PositiveInt,
    Range,
    check_config,
    check_value,
    declared,
    describe,
    target_nodes,
)
from tests.helpers import compose_config
from tests.test_cli import alrun, assert_clean_failure

CONFIGS = Path(__file__).resolve().parents[1] / "alrun" / "configs"
GROUPS = ("dataset", "detector", "supervision", "strategy", "budget", "oracle", "trainer", "logger")
OPTIONS = [
    *sorted((p.parent.name, p.stem) for g in GROUPS for p in CONFIGS.glob(f"{g}/*.yaml")),
    ("metric", "run"),  # not a group: run.yaml's own metric node
]
EXPERIMENTS = sorted(p.stem for p in CONFIGS.glob("experiment/*.yaml"))


def _overrides(group: str, option: str) -> list[str]:
    if (group, option) == ("supervision", "uda"):
        return ["experiment=uda_synthetic"]
    if (group, option) == ("oracle", "recorded"):
        return [f"{group}={option}", "oracle.path=labels.jsonl"]
    if (group, option) == ("metric", "run"):
        return []
    return [f"{group}={option}"]


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict:
    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True)


def _tree(overrides: list[str]) -> dict:
    """The resolved config ``alrun <overrides>`` runs (a fresh copy: tests change it)."""
    return copy.deepcopy(_composed(tuple(overrides)))


# --- what a declaration accepts ----------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "hint", "expected"),
    [
        (True, PositiveInt, "expected an integer >= 1, got true"),  # bool is not int
        (2.5, PositiveInt, "expected an integer >= 1, got 2.5"),
        (-3, PositiveInt, "expected an integer >= 1, got -3"),
        ("false", bool, "expected true or false, got 'false'"),  # a string is not a bool
        (1, bool, "expected true or false, got 1"),
        (math.nan, float, "expected a finite number, got nan"),
        (math.inf, NonNegativeFloat, "expected a finite number >= 0, got inf"),
        (True, Fraction, "expected a number in [0, 1], got true"),
        (1.5, Fraction, "expected a number in [0, 1], got 1.5"),
        (7, str, "expected a string, got 7 (a number or true/false; quote text: k='7')"),
        ("maybe", Literal["a", "b"], "expected one of a|b, got 'maybe'"),
        (0, PositiveInt | None, "expected an integer >= 1 or null, got 0"),
        ([1, "x"], Sequence[float], "k[1]: expected a finite number, got 'x'"),
        ([1, 2], tuple[int, int, int], "expected a list [an integer, an integer, an integer]"),
        ({"a": -1}, Mapping[str, NonNegativeFloat], "k.a: expected a finite number >= 0, got -1"),
        ({"c": 1}, Mapping[Literal["a", "b"], float], "k.c: expected a key: one of a|b, got 'c'"),
        (3, torch.nn.Module, "expected a config with _target_, got 3"),
        ({"x": 1}, torch.nn.Module, "expected a config with _target_"),
    ],
)
def test_a_value_that_does_not_fit_is_one_line_naming_the_key(value, hint, expected):
    with pytest.raises(AlrunError) as err:
        check_value(value, hint, "k")
    assert str(err.value).startswith("k") and expected in str(err.value)


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (3, PositiveInt),
        (2, NonNegativeFloat),  # an integer is a number
        (0.0, Fraction),
        (None, PositiveInt | None),
        ("min", Literal["min", "max"] | float),
        (-2.5, Literal["min", "max"] | float),
        ([1, 2.5], Sequence[NonNegativeFloat]),
        ({"_target_": "x.y"}, torch.nn.Module),
        ("a/b", Path),
        ({"k": [[0, 1.0]]}, Mapping[str, float | Sequence[tuple[int, float]]]),
    ],
)
def test_a_value_that_fits_passes(value, hint):
    check_value(value, hint, "k")


def test_ranges_describe_their_bounds():
    assert Range(0, 1, low_open=True).describe() == "in (0, 1]"
    assert Range(1).describe() == ">= 1" and 1 in Range(1) and 0 not in Range(1)
    below = Range(high=2, high_open=True)
    assert below.describe() == "< 2" and 2 not in below
    assert describe(Annotated[float, Range(0, 1, high_open=True)]) == "a number in [0, 1)"


# --- every declared parameter of every group ---------------------------------------------
def _accepted_kinds(hint: Any) -> set[str]:
    """The Python kinds a declaration takes (read off the annotation, independently of
    alrun.params): str, bool, int, float, list, dict, none."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _accepted_kinds(typing.get_args(hint)[0])
    if origin in (typing.Union, __import__("types").UnionType):
        return set().union(*(_accepted_kinds(h) for h in typing.get_args(hint)))
    if hint is type(None) or hint is None:
        return {"none"}
    if origin is Literal:
        return {type(c).__name__ for c in typing.get_args(hint)}
    if hint in (bool, int, str):
        return {hint.__name__}
    if hint is float:
        return {"float", "int"}
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return {"str"}
    if (origin or hint) in (list, tuple, Sequence):
        return {"list"}
    return {"dict"}  # a mapping, or an object built from a node with _target_


def wrong_type(hint: Any) -> Any:
    """A value of a kind ``hint`` does not take at all."""
    kinds = _accepted_kinds(hint)
    for value, kind in (("wrong", "str"), (True, "bool"), (2.5, "float"), (["wrong"], "list")):
        if kind not in kinds:
            return value
    return 17 if "int" not in kinds else None


def out_of_range(hint: Any) -> Any:
    """A value of the right kind outside what ``hint`` allows (None: nothing is out of range,
    e.g. a bool or a free string)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        for r in (m for m in meta if isinstance(m, Range)):
            step = 1 if base is int else 0.5
            if r.low is not None:
                return r.low if r.low_open else r.low - step
            return r.high if r.high_open else r.high + step
        return out_of_range(base)
    if origin in (typing.Union, __import__("types").UnionType):
        found = [out_of_range(h) for h in typing.get_args(hint)]
        return next((f for f in found if f is not None), None)
    if origin is Literal:
        return "not_a_choice" if isinstance(typing.get_args(hint)[0], str) else 99
    if hint is float:
        return math.nan
    if (origin or hint) in (list, tuple, Sequence) and typing.get_args(hint):
        item = out_of_range(typing.get_args(hint)[0])
        return None if item is None else [item]
    if origin is not None and issubclass(origin, Mapping) and typing.get_args(hint):
        key_hint, value_hint = typing.get_args(hint)
        if typing.get_origin(key_hint) is Literal:
            return {"not_a_key": {}}
        item = out_of_range(value_hint)
        return None if item is None else {"x": item}
    return None


def _declared_nodes(tree: dict, group: str, alrun_only: bool = False):
    """The nodes of ``group`` whose target declares something (alrun's own targets, and the
    settings passed on to torchvision's builders)."""
    for key, node in target_nodes(tree[group], group):
        if node["_target_"].startswith("alrun.") or not alrun_only:
            decl = declared(node["_target_"])
            if decl.hints:
                yield key, node, decl


#: checked by build_experiment itself (the detector's class count comes from the dataset)
FILLED_BY_CODE = {"num_classes"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_parameter_refuses_a_wrong_type_and_an_out_of_range_value(group, option):
    """Compose ``alrun <group>=<option>``; feed every declared parameter of every node in the
    group (nested scorers, selectors, box scores, cost models, source datasets included) one
    value of a wrong type and one out of its range: each is refused naming that key. Reads no
    data, builds nothing."""
    tree = _tree(_overrides(group, option))
    check_config(tree)  # the shipped config itself passes
    fed = 0
    for key, _, decl in list(_declared_nodes(tree, group)):
        for name, hint in decl.hints.items():
            if name in FILLED_BY_CODE:
                continue
            for bad in (wrong_type(hint), out_of_range(hint)):
                if bad is None:
                    continue
                broken = copy.deepcopy(tree)
                node = dict(target_nodes(broken[group], group))[key]
                node[name] = bad
                with pytest.raises(AlrunError) as err:
                    check_config(broken)
                assert str(err.value).startswith(f"{key}.{name}"), (bad, str(err.value))
                fed += 1
    assert fed > 0 or option in ("full", "extreme", "none")


def _reachable_nodes():
    for group, option in OPTIONS:
        tree = _tree(_overrides(group, option))
        yield from _declared_nodes(tree, group, alrun_only=True)
    for experiment in EXPERIMENTS:
        tree = _tree([f"experiment={experiment}"])
        for group in GROUPS:
            yield from _declared_nodes(tree, group, alrun_only=True)


def test_every_constructor_parameter_reachable_from_a_config_is_declared():
    """A new setting cannot slip in unchecked: every parameter of every alrun ``_target_``
    reachable from a packaged config has a type annotation the checker understands, not Any,
    and every integer one a range."""
    problems = []
    seen = set()
    for key, _, decl in _reachable_nodes():
        if decl.target in seen:
            continue
        seen.add(decl.target)
        for name in decl.parameters:
            hint = decl.hints.get(name)
            where = f"{decl.target}({name}) at {key}"
            if hint is None or hint is Any:
                problems.append(f"{where}: no type declared")
            elif wrong_type(hint) is None:
                problems.append(f"{where}: {hint} accepts anything")
            elif _accepted_kinds(hint) & {"int"} and out_of_range(hint) is None:
                if typing.get_origin(hint) is not Literal:
                    problems.append(f"{where}: an integer without a declared range")
    assert len(seen) > 40
    assert not problems, "\n".join(problems)


def test_no_packaged_config_sets_a_key_its_target_does_not_take():
    for experiment in EXPERIMENTS:
        check_config(_tree([f"experiment={experiment}"]))
    assert "_target_" in HYDRA_KEYS


# --- the values that were silently accepted ----------------------------------------------
ISSUE_CASES = [
    # (overrides, the key the one-line error must start with)
    (["strategy=ensemble_entropy", "strategy.scorer.ensemble_kind=snapshot",
      "strategy.scorer.members=99"], "strategy.scorer.members"),
    (["supervision=weak_point", "supervision.require_inside='false'"],
     "supervision.require_inside"),
    (["experiment=uda_synthetic", "supervision.use_target_labels=maybe"],
     "supervision.use_target_labels"),
    (["strategy=loss_prediction", "strategy.scorer.hidden=0"], "strategy.scorer.hidden"),
    (["strategy=loss_prediction", "strategy.scorer.margin=-1"], "strategy.scorer.margin"),
    (["strategy=loss_prediction", "strategy.scorer.weight=nan"], "strategy.scorer.weight"),
    (["strategy=fn_prediction", "strategy.scorer.fit_steps=-1"], "strategy.scorer.fit_steps"),
    (["strategy=fn_prediction", "strategy.scorer.lr=0"], "strategy.scorer.lr"),
    (["strategy=ccms", "strategy.selector.iterations=-1"], "strategy.selector.iterations"),
    (["strategy=ccms", "strategy.selector.max_candidates=0"], "strategy.selector.max_candidates"),
    (["strategy=ccms", "strategy.selector.max_candidates=1000000"],
     "strategy.selector.max_candidates"),
    (["strategy=failure_aware", "strategy.scorer.mode_weights.missed.missed=-0.7"],
     "strategy.scorer.mode_weights.missed.missed"),
    (["supervision=pseudo_label", "supervision.weight=inf"], "supervision.weight"),
    (["supervision=pseudo_label", "supervision.unlabelled_batch_size=0"],
     "supervision.unlabelled_batch_size"),
    (["supervision=pseudo_label", "supervision.unlabelled_batch_size=-4"],
     "supervision.unlabelled_batch_size"),
    (["supervision=consistency", "supervision.unlabelled_batch_size=-4"],
     "supervision.unlabelled_batch_size"),
    (["experiment=uda_synthetic", "supervision.unlabelled_batch_size=-4"],
     "supervision.unlabelled_batch_size"),
    (["supervision=weak_point", "supervision.min_score=true"], "supervision.min_score"),
    (["oracle.extreme_jitter_px=nan"], "oracle.extreme_jitter_px"),
    (["strategy=coreset", "strategy.selector.candidates=0"], "strategy.selector.candidates"),
    (["strategy=coreset", "strategy.selector.max_batch=-1"], "strategy.selector.max_batch"),
    (["strategy=entropy_coreset", "+strategy.selector.diversity.max_batch=-1"],
     "strategy.selector.diversity.max_batch"),
    (["detector.builder.anchor_sizes=[16,32]"], "detector.builder.anchor_sizes"),
    (["detector=fasterrcnn_resnet50_fpn", "detector.builder.min_size=0"],
     "detector.builder.min_size"),
    (["detector=retinanet_resnet50_fpn", "detector.builder.min_size=900"],
     "detector.builder.min_size"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "key"), ISSUE_CASES, ids=[c[1] for c in ISSUE_CASES])
def test_a_bad_value_is_refused_before_anything_is_built(overrides, key, tmp_path):
    """Each of these was accepted silently (or refused without naming the key) before. The
    dataset root does not exist: the error must come before any data is read."""
    base = ["experiment=smoke", "dataset=voc", f"dataset.root={tmp_path / 'absent'}"]
    if any(o.startswith("experiment=uda") for o in overrides):
        base = ["experiment=smoke", "dataset.num_pool=20", "dataset.num_test=5"]
    cfg = compose_config([*base, *overrides])
    with pytest.raises(AlrunError) as err:
        run_experiment(cfg, tmp_path / "run")
    assert str(err.value).startswith(f"{key}:"), str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "run").exists(), "a refused config must write nothing"


def test_an_unresolvable_interpolation_is_one_line_naming_the_key(monkeypatch):
    monkeypatch.delenv("ALRUN_NO_SUCH_VAR", raising=False)
    cfg = compose_config(["dataset=voc", "dataset.root=${oc.env:ALRUN_NO_SUCH_VAR}"])
    with pytest.raises(AlrunError, match=r"^dataset\.root: .*ALRUN_NO_SUCH_VAR") as err:
        check_config(cfg)
    assert "\n" not in str(err.value)


def test_build_experiment_checks_before_instantiating(tmp_path):
    cfg = compose_config(["strategy=mc_entropy", "strategy.scorer.dropout=1.0"])
    expected = r"^strategy\.scorer\.dropout: expected a number in \(0, 1\), got 1.0"
    with pytest.raises(AlrunError, match=expected):
        build_experiment(cfg)


def test_the_command_line_reports_one_line_and_writes_nothing(tmp_path):
    result = alrun(tmp_path, "supervision=weak_point", "supervision.require_inside='false'")
    assert result.returncode == 2
    expected = "alrun: error: supervision.require_inside: expected true or false, got 'false'"
    assert_clean_failure(result, tmp_path, expected)
