"""``alrun-report PATH...``: compare runs (a sweep dir or run dirs) in one table and one picture."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from alrun.diagnostics import FLOOR_MAP50
from alrun.errors import AlrunError
from alrun.report.analysis import Comparison, compare, health_line, table_rows
from alrun.report.gather import RunSet, gather
from alrun.report.render import GALLERY_CHOICES, write_report


def build(
    paths: Sequence[Path],
    out_dir: Path,
    group_by: str = "strategy.name",
    metric: str = "mAP",
    baseline: str = "random",
    gallery: str = "all",
    floor_map50: float = FLOOR_MAP50,
) -> tuple[RunSet, Comparison, dict[str, Path]]:
    run_set = gather(paths, group_by)
    comparison = compare(run_set, metric, baseline, floor_map50)
    return run_set, comparison, write_report(run_set, comparison, out_dir, gallery)


def print_summary(run_set: RunSet, comparison: Comparison, files: dict[str, Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    rows = table_rows(comparison)
    table = Table(title=f"{comparison.metric} by {run_set.group_key}")
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    health = health_line(comparison)
    if health:
        console.print(f"[red]warning:[/red] {health} (report: model health)", highlight=False)
    for warning in run_set.warnings:
        console.print(f"[red]warning:[/red] {warning}", highlight=False)
    console.print(f"report: {files['html']}", highlight=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alrun-report",
        description="Compare alrun runs: curves with 95 % CI over seeds, AULC, a table, HTML.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="sweep directories or run directories")
    p.add_argument(
        "--group-by",
        default="strategy.name",
        help="config key, or choices.<group> (the option composed, e.g. choices.supervision); "
        "several comma-separated keys group by their combination (default strategy.name)",
    )
    p.add_argument("--metric", default="mAP", help="results.csv column (default mAP)")
    p.add_argument("--baseline", default="random", help="group compared against (default random)")
    p.add_argument(
        "--gallery",
        choices=GALLERY_CHOICES,
        default="all",
        help="selected-image galleries: every seed (default), the first seed, or none",
    )
    p.add_argument(
        "--floor-map50",
        type=float,
        default=FLOOR_MAP50,
        help=f"a round whose test mAP50 is below this is floor-level (default {FLOOR_MAP50:g})",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default: <first path>/report)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = args.out or args.paths[0] / "report"
    try:
        run_set, comparison, files = build(
            args.paths,
            out,
            args.group_by,
            args.metric,
            args.baseline,
            args.gallery,
            args.floor_map50,
        )
    except AlrunError as err:
        print(f"alrun-report: error: {err}", file=sys.stderr)
        return 2
    print_summary(run_set, comparison, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
