"""From runs to the numbers a report shows: learning curves and the comparison table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alrun.diagnostics import FLOOR_MAP50, RunHealth, rounds_text, run_health
from alrun.report.gather import ReportError, Run, RunSet, config_value
from alrun.report.stats import Estimate, PairedDifference, aulc, mean_ci, paired_difference

#: results.csv column -> axis label
AXES = {"images": "labelled images", "boxes": "labelled boxes", "cost_s": "annotation time (s)"}
#: budget.unit -> the results.csv column that measures it
UNIT_COLUMN = {"images": "images", "boxes": "boxes", "seconds": "cost_s"}
#: metrics that live in [0, 1] (intervals and bands are clipped to it)
BOUNDED_PREFIXES = ("mAP", "mAR", "AP", "AR")


def metric_range(metric: str) -> tuple[float, float] | None:
    return (0.0, 1.0) if metric.startswith(BOUNDED_PREFIXES) else None


@dataclass(frozen=True)
class CurvePoint:
    round: int
    x: dict[str, float]  # mean over the seeds that reached this round, per axis
    y: Estimate


@dataclass(frozen=True)
class GroupSummary:
    group: str
    seeds: tuple[int, ...]
    partial: tuple[int, ...]  # seeds whose run is unfinished
    final: Estimate
    aulc: Estimate
    reach_cost_s: float | None  # mean annotation seconds when the mean curve first reaches
    reach_images: float | None  # the baseline's final mean (None: not reached)
    versus_baseline: PairedDifference | None
    aulc_versus_baseline: PairedDifference | None
    unhealthy: tuple[int, ...] = ()  # seeds with a collapsed or floor-level round
    #: why the paired comparison cannot mean anything (collapsed / floor-level models on either
    #: side), or None
    not_comparable: str | None = None


@dataclass(frozen=True)
class Comparison:
    metric: str
    baseline: str
    budget_axis: str
    curves: dict[str, list[CurvePoint]]
    summaries: list[GroupSummary]
    baseline_final: float | None
    health: dict[str, dict[int, RunHealth]]  # group -> seed -> health
    floor_map50: float = FLOOR_MAP50

    def flagged_seeds(self, group: str, r: int) -> int:
        """How many of the group's seeds had a collapsed or floor-level model in round r."""
        return sum(r in h.flagged for h in self.health[group].values())


def curve(runs: list[Run], metric: str) -> list[CurvePoint]:
    points = []
    for r in range(max(len(run.rows) for run in runs)):
        rows = [run.rows[r] for run in runs if len(run.rows) > r]
        points.append(
            CurvePoint(
                round=r,
                x={axis: float(np.mean([row[axis] for row in rows])) for axis in AXES},
                y=mean_ci([row[metric] for row in rows]),
            )
        )
    return points


def compare(
    run_set: RunSet, metric: str = "mAP", baseline: str = "random", floor_map50: float = FLOOR_MAP50
) -> Comparison:
    groups = run_set.groups
    health = {
        g: {run.seed: run_health(run.rows, floor_map50) for run in runs}
        for g, runs in groups.items()
    }
    first = run_set.runs[0]
    unit = str(config_value(first.config, "budget.unit") or "images")
    axis = UNIT_COLUMN.get(unit, "images")
    for run in run_set.runs:
        if metric not in run.rows[0]:
            raise_missing(run, metric)
    curves = {g: curve(runs, metric) for g, runs in groups.items()}
    # finals, AULC and paired differences use finished runs only (partial ones stop early);
    # a group with no finished run falls back to its partial runs, and says so in its status
    finished = {g: [r for r in runs if not r.partial] or runs for g, runs in groups.items()}
    base_runs = finished.get(baseline)
    base_final = float(np.mean([run.rows[-1][metric] for run in base_runs])) if base_runs else None
    summaries = []
    for group, runs in finished.items():
        finals = {run.seed: run.rows[-1][metric] for run in runs}
        areas = {
            run.seed: aulc([row[axis] for row in run.rows], [row[metric] for row in run.rows])
            for run in runs
        }
        reach_cost = reach_images = None
        if base_final is not None:
            for point in curves[group]:
                if point.y.mean >= base_final - 1e-12:
                    reach_cost, reach_images = point.x["cost_s"], point.x["images"]
                    break
        versus = versus_aulc = None
        if base_runs and group != baseline:
            versus = paired_difference(finals, {r.seed: r.rows[-1][metric] for r in base_runs})
            versus_aulc = paired_difference(
                areas,
                {
                    r.seed: aulc([row[axis] for row in r.rows], [row[metric] for row in r.rows])
                    for r in base_runs
                },
            )
        unhealthy = tuple(seed for seed, h in health[group].items() if not h.healthy)
        not_comparable = None
        if versus is not None:
            not_comparable = _not_comparable(health, group, baseline, versus.seeds)
        summaries.append(
            GroupSummary(
                group=group,
                seeds=tuple(run.seed for run in groups[group]),
                partial=tuple(run.seed for run in groups[group] if run.partial),
                final=mean_ci(list(finals.values())),
                aulc=mean_ci(list(areas.values())),
                reach_cost_s=reach_cost,
                reach_images=reach_images,
                versus_baseline=versus,
                aulc_versus_baseline=versus_aulc,
                unhealthy=unhealthy,
                not_comparable=not_comparable,
            )
        )
    return Comparison(metric, baseline, axis, curves, summaries, base_final, health, floor_map50)


def _not_comparable(
    health: dict[str, dict[int, RunHealth]], group: str, baseline: str, seeds: tuple[int, ...]
) -> str | None:
    """'not comparable: ...' when a paired seed of either side had a collapsed or floor-level
    model in any round (a dead model's selections shape every later round of that seed)."""
    sides = []
    for name in (group, baseline):
        bad = [s for s in seeds if not health[name][s].healthy]
        if bad:
            sides.append(f"{name} {len(bad)} of {len(seeds)} seeds")
    if not sides:
        return None
    return f"not comparable: collapsed or floor-level models ({'; '.join(sides)})"


def raise_missing(run: Run, metric: str) -> None:
    columns = ", ".join(run.rows[0])
    raise ReportError(f"--metric: {run.path}/results.csv has no column '{metric}' ({columns})")


def table_rows(comparison: Comparison) -> list[dict[str, str]]:
    """The comparison table as strings (the CSV and the HTML/terminal table)."""
    m, base = comparison.metric, comparison.baseline
    rows = []
    for s in comparison.summaries:
        if comparison.baseline_final is None:
            reach = f"no '{base}' runs"
        elif s.reach_cost_s is None:
            reach = "not reached"
        else:
            reach = f"{s.reach_cost_s:.0f} s ({s.reach_images:.0f} images)"
        if s.group == base:
            versus = "(baseline)"
        elif s.versus_baseline is None:
            versus = f"no paired '{base}' seeds"
        else:
            e = s.versus_baseline.estimate
            width = "" if e.half_width is None else f" ± {e.half_width:.3f}"
            versus = f"{e.mean:+.3f}{width}: {s.not_comparable or s.versus_baseline.verdict}"
        rows.append(
            {
                "group": s.group,
                "seeds": " ".join(map(str, s.seeds)),
                "status": _status(s),
                "model health": _health(s, comparison.floor_map50),
                f"final {m} (95% CI)": s.final.text(),
                f"AULC {m} (normalised, per {comparison.budget_axis})": s.aulc.text(),
                f"cost to reach {base}'s final {m}": reach,
                f"paired diff vs {base} (final {m})": versus,
            }
        )
    return rows


def _health(s: GroupSummary, floor_map50: float) -> str:
    if not s.unhealthy:
        return "ok"
    seeds = " ".join(map(str, s.unhealthy))
    return (
        f"collapsed or floor-level (mAP50 < {floor_map50:g}) rounds in {len(s.unhealthy)} of "
        f"{len(s.seeds)} seeds ({seeds})"
    )


def health_rows(run_set: RunSet, comparison: Comparison) -> list[dict[str, str]]:
    """Per group and seed: which rounds had a collapsed or floor-level model."""
    rows = []
    for group, runs in run_set.groups.items():
        for run in runs:
            h = comparison.health[group][run.seed]
            map50 = [row["mAP50"] for row in run.rows if "mAP50" in row]
            rows.append(
                {
                    "group": group,
                    "seed": str(run.seed),
                    "rounds": str(h.rounds),
                    "collapsed rounds (loop's flag)": rounds_text(h.collapsed, h.rounds),
                    f"floor rounds (test mAP50 < {comparison.floor_map50:g})": rounds_text(
                        h.floor, h.rounds
                    ),
                    "best mAP50": f"{max(map50):.3f}" if map50 else "–",
                    "final mAP50": f"{map50[-1]:.3f}" if map50 else "–",
                    "verdict": "ok" if h.healthy else "suspect: its selections and comparisons",
                }
            )
    return rows


def health_line(comparison: Comparison) -> str | None:
    """One line for the page, the terminal and the log when any run had such rounds."""
    runs = [h for seeds in comparison.health.values() for h in seeds.values()]
    bad = [h for h in runs if not h.healthy]
    if not bad:
        return None
    collapsed = sum(bool(h.collapsed) for h in runs)
    return (
        f"{len(bad)} of {len(runs)} runs had collapsed or floor-level models (test mAP50 < "
        f"{comparison.floor_map50:g}; {collapsed} flagged collapsed by the loop): comparisons "
        "involving them are marked 'not comparable'"
    )


def _status(s: GroupSummary) -> str:
    if not s.partial:
        return "complete"
    seeds = " ".join(map(str, s.partial))
    if len(s.partial) == len(s.seeds):
        return f"partial seeds: {seeds} (all unfinished: numbers are from their last round)"
    return f"partial seeds: {seeds} (curves only)"


def curve_rows(comparison: Comparison) -> list[dict[str, float | int | str]]:
    rows: list[dict[str, float | int | str]] = []
    low, high = metric_range(comparison.metric) or (-np.inf, np.inf)
    for group, points in comparison.curves.items():
        for p in points:
            band = p.y.clipped(low, high)
            rows.append(
                {
                    "group": group,
                    "round": p.round,
                    "n": p.y.n,
                    **{f"mean_{axis}": p.x[axis] for axis in AXES},
                    f"mean_{comparison.metric}": p.y.mean,
                    "ci95_low": "" if band is None else band[0],
                    "ci95_high": "" if band is None else band[1],
                    "flagged_seeds": comparison.flagged_seeds(group, p.round),
                }
            )
    return rows
