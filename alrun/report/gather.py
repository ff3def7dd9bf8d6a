"""Find run directories under the paths given and check that they can be compared.

A run directory holds ``.hydra/config.yaml`` and, once a round is complete, ``results.csv``
and ``state.json``; a failed sweep job holds ``error.json`` instead. A run whose files cannot be
read (corrupt JSON or YAML, bytes that are not UTF-8) or whose results hold NaN or infinity is
left out with a warning naming the file, or the run and round: the other runs still make a
report, and no non-finite number reaches the curves or the statistics.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from alrun.errors import AlrunError
from alrun.resolvers import register_resolvers


class ReportError(AlrunError):
    """The runs given cannot be reported or compared."""


class UnreadableRun(ReportError):
    """One run cannot be used (a damaged file, a non-finite result): left out with a warning."""


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]
    group: str
    seed: int
    rows: tuple[dict[str, float], ...]
    planned_rounds: int | None
    stopped: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def partial(self) -> bool:
        """Still running, killed, or crashed: fewer rounds than planned and not stopped cleanly."""
        if self.failed:
            return False
        if self.planned_rounds is None:
            return True
        return self.stopped is None and len(self.rows) < self.planned_rounds + 1

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        if self.partial:
            return f"partial ({len(self.rows)} of {(self.planned_rounds or 0) + 1} rounds)"
        return "complete" if self.stopped is None else f"stopped: {self.stopped}"


@dataclass(frozen=True)
class RunSet:
    runs: tuple[Run, ...]  # every run with at least one completed round
    failed: tuple[Run, ...]
    empty: tuple[Run, ...]  # no round completed (crashed or still in round 0)
    group_key: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def groups(self) -> dict[str, list[Run]]:
        out: dict[str, list[Run]] = {}
        for run in self.runs:
            out.setdefault(run.group, []).append(run)
        return {g: sorted(rs, key=lambda r: r.seed) for g, rs in sorted(out.items())}


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    found: dict[Path, None] = {}
    for path in paths:
        if not path.exists():
            raise ReportError(f"{path}: no such directory")
        if (path / ".hydra" / "config.yaml").is_file():
            found[path.resolve()] = None
            continue
        for cfg in sorted(path.rglob(".hydra/config.yaml")):
            found[cfg.parent.parent.resolve()] = None
    return list(found)


def _config(path: Path) -> dict[str, Any]:
    """The run's config: ``.hydra/config.yaml`` resolved, overlaid with the values the run
    itself resolved at start (``config.json``). Some values depend on the run's command line
    (a composed strategy's ``strategy.name``, ``${alrun_strategy_name:...}``), which only the
    run could read."""
    register_resolvers()
    try:
        cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
        config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except Exception as err:  # noqa: BLE001 - any unreadable config becomes one line
        raise ReportError(f"{path / '.hydra/config.yaml'}: cannot read ({err})") from err
    recorded = _json_field(path / "config.json", "config", None)
    if isinstance(recorded, dict):
        config.update(recorded)
    return config


def _unreadable(path: Path, err: Exception) -> UnreadableRun:
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UnreadableRun(f"{path}: unreadable ({type(err).__name__}: {detail}); run left out")


def _json_field(path: Path, key: str, default: Any) -> Any:
    """``key`` of the JSON object in ``path`` (``default`` when the file or key is absent)."""
    if not path.is_file():
        return default
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(data, dict):
        raise _unreadable(path, TypeError(f"expected a JSON object, got {type(data).__name__}"))
    return data.get(key, default)


def config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _rows(path: Path) -> tuple[dict[str, float], ...]:
    csv_path = path / "results.csv"
    if not csv_path.is_file():
        return ()
    try:
        text = csv_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise _unreadable(csv_path, err) from None
    if not text.strip():
        return ()
    try:
        rows = tuple(
            {k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))
        )
    except (TypeError, ValueError) as err:
        raise ReportError(f"{csv_path}: expected numbers in every column ({err})") from err
    for row in rows:
        for key, value in row.items():
            if not math.isfinite(value):
                round_ = int(row["round"]) if math.isfinite(row.get("round", math.nan)) else "?"
                raise UnreadableRun(
                    f"{path}: round {round_}: {key} is {value}; run left out of the report"
                )
    return rows


def _choices(path: Path) -> dict[str, Any]:
    """The config-group options the run was composed with (``.hydra/hydra.yaml``'s
    ``hydra.runtime.choices``, e.g. ``supervision: weak_point_soft``); empty when not recorded."""
    try:
        cfg = OmegaConf.load(path / ".hydra" / "hydra.yaml")
        choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    except Exception:  # noqa: BLE001 - an absent or unreadable record: no choices known
        return {}
    return dict(OmegaConf.to_container(choices)) if choices is not None else {}


def group_of(path: Path, config: dict[str, Any], group_key: str) -> str | None:
    """The run's group under ``group_key``: one or more comma-separated keys, each a config key
    (``strategy.name``) or ``choices.<config group>`` (the option it was composed with, e.g.
    ``choices.supervision``: two presets of one regime class differ there and nowhere else);
    several keys join with ``/``. None when a key is missing."""
    parts = []
    for key in (k.strip() for k in group_key.split(",")):
        if key.startswith("choices."):
            value = _choices(path).get(key.removeprefix("choices."))
        else:
            value = config_value(config, key)
        if value is None:
            return None
        parts.append(str(value))
    return "/".join(parts)


def load_run(path: Path, group_key: str) -> Run:
    config = _config(path)
    group = group_of(path, config, group_key)
    if group is None:
        raise ReportError(f"--group-by: {path} has no config key '{group_key}'")
    error = None
    if (path / "error.json").is_file():
        error = _json_field(path / "error.json", "error", "unknown error")
    stopped = _json_field(path / "state.json", "stopped", None)
    rounds = config_value(config, "budget.rounds")
    return Run(
        path=path,
        config=config,
        group=group,
        seed=int(config.get("seed", 0)),
        rows=_rows(path),
        planned_rounds=int(rounds) if isinstance(rounds, int) else None,
        stopped=stopped,
        error=error,
    )


def _dataset_identity(config: dict[str, Any]) -> str:
    """The dataset block, without where images are cached and without a split ``seed`` tied
    to the run seed (older configs split with ``seed: ${seed}``; seeds are replicates)."""
    dataset = dict(config.get("dataset") or {})
    dataset.pop("cache_dir", None)
    if dataset.get("seed") == config.get("seed"):
        dataset.pop("seed")
    return json.dumps(dataset, sort_keys=True, default=str)


def _schedule(config: dict[str, Any]) -> str:
    budget = config.get("budget") or {}
    keys = ("unit", "initial", "per_round", "rounds")
    return ", ".join(f"{k}={budget.get(k)}" for k in keys)


def _must_agree(runs: Sequence[Run], what: str, key_of) -> None:
    seen: dict[str, Run] = {}
    for run in runs:
        seen.setdefault(key_of(run.config), run)
    if len(seen) > 1:
        examples = "; ".join(f"{run.path}: {value}" for value, run in list(seen.items())[:3])
        raise ReportError(
            f"runs use {len(seen)} different {what}, cannot compare them ({examples})"
        )


def gather(paths: Sequence[Path], group_key: str = "strategy.name") -> RunSet:
    """Load every run under ``paths`` and check that the runs are comparable."""
    dirs = find_run_dirs(paths)
    if not dirs:
        shown = ", ".join(str(p) for p in paths)
        raise ReportError(f"{shown}: no run directories found (a run holds .hydra/config.yaml)")
    loaded, left_out = [], []
    for d in dirs:
        try:
            loaded.append(load_run(d, group_key))
        except UnreadableRun as err:
            left_out.append(str(err))
    failed = tuple(r for r in loaded if r.failed)
    empty = tuple(r for r in loaded if not r.failed and not r.rows)
    runs = tuple(r for r in loaded if not r.failed and r.rows)
    if not runs:
        raise ReportError(
            f"{len(dirs)} run directories found but none completed a round "
            f"({len(failed)} failed, {len(empty)} without results, {len(left_out)} unreadable"
            + (f": {left_out[0]}" if left_out else "")
            + ")"
        )
    _must_agree(runs, "datasets", _dataset_identity)
    _must_agree(runs, "budget schedules", _schedule)
    _must_agree(runs, "metric protocols", lambda c: str(config_value(c, "metric.protocol")))
    pairs: dict[tuple[str, int], Run] = {}
    for run in runs:
        other = pairs.setdefault((run.group, run.seed), run)
        if other is not run:
            raise ReportError(
                f"two runs of {group_key}={run.group} seed {run.seed}: {other.path} and {run.path}"
            )
    warnings = [f"{r.path}: {r.status}" for r in runs if r.partial]
    warnings += [f"{r.path}: failed: {r.error}" for r in failed]
    warnings += [f"{r.path}: no completed round, left out" for r in empty]
    warnings += left_out
    return RunSet(runs, failed, empty, group_key, tuple(warnings))
