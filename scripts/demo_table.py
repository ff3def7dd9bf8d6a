"""The demo table of the docs from a run's results.csv, and the check that a run agrees with it.

    python scripts/demo_table.py outputs/demo/entropy/seed0/results.csv          # print the table
    python scripts/demo_table.py RUN/results.csv --check docs/data/demo_seed0.csv # within tolerance
    python scripts/demo_table.py RUN/results.csv --check docs/data/demo_seed0.csv --exact

``--exact`` is what the same machine type with the same torch thread count must give (every
column but the train time, at the table's precision). Elsewhere float results depend on the
CPU's kernels, selections then diverge, and only ``--tolerance`` holds: the same image counts per
round and mAP / mAP50 / mAR each within TOL (default 0.05, about 1.5 x the seed-to-seed standard
deviation of the demo's round-0 mAP50). Exit 1 with one line per disagreement.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HEADER = "| round | images | boxes | cost (s) | mAP | mAP50 | mAR@100 | train (s) |"
METRICS = ("mAP", "mAP50", "mAR")
COUNTS = ("round", "images", "boxes", "cost_s")


def read_rows(path: Path) -> list[dict[str, str]]:
    """results.csv (or a recorded copy whose leading ``#`` lines say where it comes from)."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def markdown_table(rows: list[dict[str, str]]) -> str:
    out = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [str(round(float(r[k]))) for k in COUNTS]
        cells += [f"{float(r[k]):.3f}" for k in METRICS] + [str(round(float(r["train_s"])))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def disagreements(
    run: list[dict[str, str]], recorded: list[dict[str, str]], tolerance: float, exact: bool
) -> list[str]:
    """One line per round and column where ``run`` is not what ``recorded`` promises."""
    if len(run) != len(recorded):
        return [f"rounds: the run has {len(run)}, the record {len(recorded)}"]
    problems = []
    for got, want in zip(run, recorded):
        counts = COUNTS if exact else ("round", "images")
        for key in counts:
            if round(float(got[key])) != round(float(want[key])):
                problems.append(f"round {want['round']} {key}: {got[key]}, recorded {want[key]}")
        for key in METRICS:
            diff = abs(float(got[key]) - float(want[key]))
            limit = 0.0005 if exact else tolerance
            if diff > limit + 1e-9:
                problems.append(
                    f"round {want['round']} {key}: {float(got[key]):.3f}, recorded "
                    f"{float(want[key]):.3f} (|diff| {diff:.3f} > {limit:g})"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a run's results.csv")
    parser.add_argument("--check", type=Path, help="a recorded results.csv to compare with")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--exact", action="store_true", help="same machine type and threads")
    args = parser.parse_args(argv)
    run = read_rows(args.results)
    print(markdown_table(run))
    if args.check is None:
        return 0
    problems = disagreements(run, read_rows(args.check), args.tolerance, args.exact)
    mode = "exactly" if args.exact else f"within {args.tolerance:g}"
    for line in problems:
        print(f"demo_table: {line}", file=sys.stderr)
    print(f"{'agrees' if not problems else 'DISAGREES'} with {args.check} {mode}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
