"""Typed, checked configs: each ``_target_`` constructor declares every parameter's type and
range once, in its own signature, and :func:`check_config` checks a whole composed config
against those declarations before anything is built, read or written::

    def __init__(self, passes: PositiveInt = 10, dropout: Annotated[float, Range(0, 1, True, True)]
                 = 0.2, require_inside: bool = True, mode: Literal["a", "b"] = "a",
                 class_weights: Sequence[NonNegativeFloat] | None = None): ...

What a declaration accepts: ``bool`` true/false only (not 1, not the string 'false'); ``int``
integers only (not booleans, not 2.5); ``float`` integers and finite floats (NaN and inf are
refused); ``str`` (or ``Path``) strings only; ``Literal`` one of its values; ``Sequence[T]`` /
``tuple[...]`` a list of T (a fixed-length tuple: exactly that many); ``Mapping[K, V]`` a mapping;
``X | None`` null too; ``Annotated[T, Range(...)]`` a T in the range. Any other type (a class, a
protocol, a callable) is built from a config node with ``_target_``, whose own parameters are
then checked the same way. A key the target does not take is refused too. Rules that need two
keys (a snapshot ensemble no larger than a round's iterations, ...) are in :func:`cross_check`.

Only alrun's own targets are type-checked, plus the settings alrun's configs pass on to
third-party builders (:data:`PASSED_ON`: torchvision's take ``**kwargs`` and accept strings for
their weight enums); every target's keys are checked against its signature. The check runs
first in :func:`alrun.loop.build_experiment`; checks that need the data or the model stay with
the code that reads or builds them.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, is_dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alrun.errors import AlrunError

__all__ = [
    "Fraction",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenFraction",
    "PositiveFloat",
    "PositiveInt",
    "Range",
    "ScoreThreshold",
    "StrictFraction",
    "check_config",
    "check_value",
    "declared",
]

TARGET = "_target_"
#: Hydra's own keys in a node (never constructor parameters)
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


@dataclass(frozen=True)
class Range:
    """Inclusive (or, with ``low_open`` / ``high_open``, exclusive) bounds of a number."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    @property
    def bounded(self) -> bool:
        return self.low is not None and self.high is not None

    def describe(self) -> str:
        if self.bounded:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return ""


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
#: a number in [0, 1] (a probability, a weight share, an EMA decay)
Fraction = Annotated[float, Range(0, 1)]
#: in (0, 1]: an IoU threshold, a containment share (0 would accept every pair)
OpenFraction = Annotated[float, Range(0, 1, low_open=True)]
#: in (0, 1): a dropout probability, a held-out share of a dataset
StrictFraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]
#: a detector-confidence threshold in [0, 1): at 1 no box would be kept
ScoreThreshold = Annotated[float, Range(0, 1, high_open=True)]


#: settings alrun's configs hand to third-party builders through their ``**kwargs`` (torchvision's
#: detection models pass them on to their image transform), declared here since no signature of
#: theirs carries them; the builders' own parameters are theirs to check
PASSED_ON: Mapping[str, Mapping[str, Any]] = {
    "torchvision.models.detection.": {"min_size": PositiveInt, "max_size": PositiveInt},
}


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _shown(value: Any) -> str:
    """``value`` as the user typed it (YAML spelling: true, null, nan)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict) and TARGET in value:
        return f"a config (_target_: {value[TARGET]})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value)


# --- describing a declaration ------------------------------------------------------------
_NOUNS = {
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _is_sequence(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return origin in (list, tuple, Sequence)


def _is_mapping(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return inspect.isclass(origin) and issubclass(origin, (Mapping, MutableMapping))


def _is_text(hint: Any) -> bool:
    return hint is str or (inspect.isclass(hint) and issubclass(hint, PurePath))


def describe(hint: Any, plural: bool = False) -> str:
    """What ``hint`` accepts, in words: ``an integer >= 1``, ``one of a|b or null``."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        ranges = [m for m in meta if isinstance(m, Range)]
        text = describe(base, plural)
        if base is float and ranges and ranges[0].bounded:  # "finite" goes without saying
            text = "numbers" if plural else "a number"
        return " ".join([text, *(r.describe() for r in ranges)])
    if _is_union(hint):
        return " or ".join(dict.fromkeys(describe(h, plural) for h in typing.get_args(hint)))
    if hint is type(None) or hint is None:
        return "null"
    if hint is Any:
        return "anything"
    if origin is Literal:
        choices = "|".join(str(c) for c in typing.get_args(hint))
        return f"values among {choices}" if plural else f"one of {choices}"
    if hint is float:
        return "finite numbers" if plural else "a finite number"
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    if _is_text(hint):
        return _NOUNS[str][plural]
    if _is_sequence(hint):
        args = typing.get_args(hint)
        fixed = typing.get_origin(hint) is tuple and args and args[-1] is not Ellipsis
        if fixed:
            text = "a list [" + ", ".join(describe(a) for a in args) + "]"
        else:
            text = f"a list of {describe(args[0] if args else Any, plural=True)}"
        return text.replace("a list", "lists", 1) if plural else text
    if _is_mapping(hint):
        args = typing.get_args(hint)
        text = f"a mapping to {describe(args[1], plural=True)}" if args else "a mapping"
        return text.replace("a mapping", "mappings", 1) if plural else text
    return "configs with _target_" if plural else "a config with _target_"


# --- checking a value against a declaration ---------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    key: str
    expected: str
    value: Any

    def message(self) -> str:
        text = f"{self.key}: expected {self.expected}, got {_shown(self.value)}"
        if "a string" in self.expected and isinstance(self.value, (bool, int, float)):
            text += f" (a number or true/false; quote text: {self.key}='{_shown(self.value)}')"
        return text


def mismatch(value: Any, hint: Any, key: str) -> Mismatch | None:
    """Why ``value`` (given at ``key``) does not fit ``hint``, or None when it does."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        inner = mismatch(value, base, key)
        if inner is not None:
            return inner if inner.key != key else Mismatch(key, describe(hint), value)
        for bound in (m for m in meta if isinstance(m, Range)):
            if value not in bound:
                return Mismatch(key, describe(hint), value)
        return None
    if _is_union(hint):
        found = [mismatch(value, h, key) for h in typing.get_args(hint)]
        if any(f is None for f in found):
            return None
        deeper = [f for f in found if f.key != key]  # right shape for one option, an item wrong
        return deeper[0] if deeper else Mismatch(key, describe(hint), value)
    if hint is Any or hint is object:
        return None
    if hint is type(None) or hint is None:
        return None if value is None else Mismatch(key, "null", value)
    if origin is Literal:
        ok = any(value == c and type(value) is type(c) for c in typing.get_args(hint))
        return None if ok else Mismatch(key, describe(hint), value)
    if hint is bool:
        return None if isinstance(value, bool) else Mismatch(key, describe(hint), value)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else Mismatch(key, describe(hint), value)
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok and math.isfinite(value) else Mismatch(key, describe(hint), value)
    if _is_text(hint):
        return None if isinstance(value, str) else Mismatch(key, describe(hint), value)
    if _is_sequence(hint):
        return _sequence_mismatch(value, hint, key)
    if _is_mapping(hint):
        return _mapping_mismatch(value, hint, key)
    # a class, a protocol, a callable: built from a node with _target_ (checked on its own)
    ok = isinstance(value, dict) and TARGET in value
    return None if ok else Mismatch(key, describe(hint), value)


def _sequence_mismatch(value: Any, hint: Any, key: str) -> Mismatch | None:
    if not isinstance(value, (list, tuple)):
        return Mismatch(key, describe(hint), value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            return Mismatch(key, describe(hint), value)
        items = list(args)
    else:
        items = [args[0] if args else Any] * len(value)
    for i, (item, item_hint) in enumerate(zip(value, items)):
        found = mismatch(item, item_hint, f"{key}[{i}]")
        if found is not None:
            return found
    return None


def _mapping_mismatch(value: Any, hint: Any, key: str) -> Mismatch | None:
    if not isinstance(value, dict) or TARGET in value:
        return Mismatch(key, describe(hint), value)
    key_hint, value_hint = typing.get_args(hint) or (Any, Any)
    for name, item in value.items():
        if mismatch(name, key_hint, key) is not None:
            return Mismatch(f"{key}.{name}", f"a key: {describe(key_hint)}", name)
        found = mismatch(item, value_hint, f"{key}.{name}")
        if found is not None:
            return found
    return None


def check_value(value: Any, hint: Any, key: str) -> None:
    """Raise a one-line :class:`AlrunError` naming ``key`` when ``value`` does not fit."""
    found = mismatch(value, hint, key)
    if found is not None:
        raise AlrunError(found.message())


# --- what a target declares --------------------------------------------------------------
@dataclass(frozen=True)
class Declaration:
    """A target's parameters: their declared types (``hints``) and defaults."""

    target: str
    parameters: Mapping[str, inspect.Parameter]
    hints: Mapping[str, Any]
    open_keys: bool  # it takes **kwargs: any key is passed on

    def default(self, name: str) -> Any:
        param = self.parameters.get(name)
        return None if param is None or param.default is inspect.Parameter.empty else param.default


def declared(target: str | Callable) -> Declaration:
    """The parameters of a ``_target_`` (a class: its constructor; a function or classmethod:
    itself) with their type hints (``Annotated`` kept). Types are read for alrun's own
    targets only."""
    obj = get_object(target) if isinstance(target, str) else target
    name = target if isinstance(target, str) else f"{obj.__module__}.{obj.__qualname__}"
    sig = inspect.signature(obj)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    open_keys = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    hints: dict[str, Any] = {
        key: hint
        for prefix, passed_on in PASSED_ON.items()
        if name.startswith(prefix)
        for key, hint in passed_on.items()
    }
    if getattr(obj, "__module__", "").split(".")[0] == "alrun":
        source = obj if is_dataclass(obj) else (obj.__init__ if inspect.isclass(obj) else obj)
        hints = {
            n: h
            for n, h in typing.get_type_hints(source, include_extras=True).items()
            if n in params
        }
    return Declaration(name, params, hints, open_keys)


# --- walking a composed config -----------------------------------------------------------
def target_nodes(tree: Any, key: str) -> Iterator[tuple[str, dict]]:
    """Every node with ``_target_`` in ``tree`` (itself included) with its full key."""
    if isinstance(tree, dict):
        if TARGET in tree:
            yield key, tree
        for name, value in tree.items():
            if name not in HYDRA_KEYS:
                yield from target_nodes(value, f"{key}.{name}" if key else str(name))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from target_nodes(value, f"{key}[{i}]")


def check_node(node: Mapping[str, Any], key: str) -> None:
    """Check one ``_target_`` node's own keys (nested targets are checked on their own)."""
    target = node[TARGET]
    try:
        decl = declared(target)
    except (ImportError, AttributeError, ValueError, TypeError):
        return  # not importable here: instantiate reports it (e.g. the mmdet install hint)
    for name, value in node.items():
        if name in HYDRA_KEYS:
            continue
        path = f"{key}.{name}"
        if name not in decl.parameters and name not in decl.hints:
            if decl.open_keys:
                continue
            raise AlrunError(
                f"{path}: not a setting of {target} (the chosen {key} config); remove the "
                "override or the preset that sets it"
            )
        if name in decl.hints and value != "???":  # ???: required, reported when built
            check_value(value, decl.hints[name], path)


def check_tree(tree: Mapping[str, Any]) -> None:
    """:func:`check_config` on a resolved, plain-container config."""
    for group, value in tree.items():
        for key, node in target_nodes(value, str(group)):
            check_node(node, key)
    cross_check(tree)


def check_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Check every ``_target_`` node of a composed config (nested ones included) against its
    declared parameters, then the rules across keys; one :class:`AlrunError` naming the key.

    Reads no data and builds nothing, so it runs first: before any file is written."""
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:  # e.g. ${oc.env:VAR} with VAR unset, no default
            key = getattr(err, "full_key", None) or "config"
            raise AlrunError(f"{key}: {str(err).splitlines()[0]}") from None
    check_tree(cfg)


# --- rules across keys -------------------------------------------------------------------
def setting(node: Mapping[str, Any], name: str) -> Any:
    """``node[name]``, or its target's default when the config leaves it out."""
    if name in node:
        return node[name]
    try:
        return declared(node[TARGET]).default(name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return None


def _targets_of(tree: Mapping[str, Any], group: str, target: str) -> Iterator[tuple[str, dict]]:
    for key, node in target_nodes(tree.get(group), group):
        if node.get(TARGET) == target:
            yield key, node


def _snapshot_members(tree: Mapping[str, Any]) -> None:
    """A snapshot ensemble copies one member per iteration at most: more members than a round
    has iterations leaves the rest untrained (and still saved in every checkpoint)."""
    trainer = tree.get("trainer")
    if not isinstance(trainer, dict) or TARGET not in trainer:
        return
    iterations = setting(trainer, "iterations")
    if not isinstance(iterations, int) or iterations <= 0:
        return  # epochs: the round's length depends on the data
    first = setting(trainer, "first_iterations") or iterations
    fewest = min(iterations, first)
    for key, node in _targets_of(tree, "strategy", "alrun.acquisition.multipass.PassUncertainty"):
        if setting(node, "source") != "ensemble" or setting(node, "ensemble_kind") != "snapshot":
            continue
        members = setting(node, "members")
        if isinstance(members, int) and members > fewest:
            which = "trainer.iterations" if fewest == iterations else "trainer.first_iterations"
            raise AlrunError(
                f"{key}.members: a snapshot ensemble of {members} members needs at least "
                f"{members} iterations per round (one snapshot per iteration at most), but "
                f"{which} is {fewest}; lower {key}.members or raise {which}"
            )


def _tiny_fcos_levels(tree: Mapping[str, Any]) -> None:
    """The tiny FCOS has one FPN level per backbone block after the second: one anchor size
    each."""
    for key, node in _targets_of(tree, "detector", "alrun.detectors.tiny.tiny_fcos"):
        widths, sizes = setting(node, "widths"), setting(node, "anchor_sizes")
        if widths is None or sizes is None:
            continue
        if len(sizes) != len(widths) - 2:
            raise AlrunError(
                f"{key}.anchor_sizes: expected {len(widths) - 2} sizes (one per FPN level: "
                f"{key}.widths has {len(widths)} blocks, the FPN reads all but the first 2), "
                f"got {len(sizes)}"
            )


def _image_sizes(tree: Mapping[str, Any]) -> None:
    """A detector's shorter-side size cannot exceed its longer-side limit."""
    for key, node in target_nodes(tree.get("detector"), "detector"):
        low, high = node.get("min_size"), node.get("max_size")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            raise AlrunError(
                f"{key}.min_size: {low} is larger than {key}.max_size ({high}); the shorter image "
                "side is resized to min_size unless the longer would exceed max_size"
            )


#: the rules :func:`check_config` applies after every node's own check
CROSS_CHECKS: tuple[Callable[[Mapping[str, Any]], None], ...] = (
    _snapshot_members,
    _tiny_fcos_levels,
    _image_sizes,
)


def cross_check(tree: Mapping[str, Any]) -> None:
    for rule in CROSS_CHECKS:
        rule(tree)
