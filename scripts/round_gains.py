"""Do labels buy mAP in every round? Per round: the metric per seed, its mean ± 95 % CI, and the
paired gain on the previous round (same seed) with its 95 % CI and verdict.

Usage: python scripts/round_gains.py RUN_OR_SWEEP_DIR [...] [--metric mAP] [--metric mAP50]

The check a CPU preset's schedule must pass (docs/benchmarks.md, "Real data on CPU"): with
strategy=random over 3 seeds, every consecutive-round gain has a CI above 0. alrun-report compares
strategies at equal rounds; this pairs a seed's round with its own previous round, which removes
the seed's initial-set luck from the gain. Runs are read with alrun-report's own ``gather`` (the
same comparability checks); only rounds that every run completed are shown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alrun.errors import AlrunError
from alrun.report.gather import ReportError, gather
from alrun.report.stats import mean_ci, paired_difference


def round_table(paths: list[Path], metric: str) -> list[str]:
    """Markdown rows: round, images, metric per seed, mean ± CI, paired gain ± CI, verdict."""
    found = gather(paths)
    if len(found.groups) > 1:
        raise ReportError(f"one strategy at a time, found {sorted(found.groups)}")
    runs = sorted(found.runs, key=lambda r: r.seed)
    rounds = min(len(r.rows) for r in runs)
    seeds = "/".join(str(r.seed) for r in runs)
    lines = [
        f"| round | images | {metric} per seed ({seeds}) | mean ± 95 % CI | "
        "gain on the previous round (paired) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for k in range(rounds):
        values = {r.seed: r.rows[k][metric] for r in runs}
        images = "/".join(sorted({str(int(r.rows[k]["images"])) for r in runs}))
        shown = " / ".join(f"{values[s]:.3f}" for s in sorted(values))
        gain, verdict = "", ""
        if k:
            diff = paired_difference(values, {r.seed: r.rows[k - 1][metric] for r in runs})
            e = diff.estimate  # type: ignore[union-attr] - the same seeds on both sides
            gain = f"{e.mean:+.3f}" + (f" ± {e.half_width:.3f}" if e.half_width else "")
            verdict = diff.verdict  # type: ignore[union-attr]
        lines.append(
            f"| {k} | {images} | {shown} | {mean_ci(list(values.values())).text()} | "
            f"{gain} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--metric", action="append", help="results.csv column (default mAP, mAP50)")
    args = parser.parse_args(argv)
    try:
        for metric in args.metric or ["mAP", "mAP50"]:
            print("\n".join(round_table(args.paths, metric)) + "\n")
    except AlrunError as err:
        print(f"round_gains: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
