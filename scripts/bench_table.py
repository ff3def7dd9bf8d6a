"""Summarise benchmark sweeps: one row per (variant, round) with mAP / mAP50 mean ± sd over seeds
and the regime's own per-round numbers (domain-classifier accuracy, pseudo-label precision).

Usage: python scripts/bench_table.py SWEEP_DIR [SWEEP_DIR ...]   (variant = the folder's name)
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def rows_of(sweep: Path) -> dict[int, dict[str, list[float]]]:
    per_round: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for results in sorted(sweep.glob("*/results.csv")):
        for row in csv.DictReader(results.open()):
            r = int(row["round"])
            cell = per_round[r]
            for key in ("images", "cost_s", "mAP", "mAP50", "train_s"):
                cell[key].append(float(row[key]))
            metrics = results.parent / f"round_{r:02d}" / "metrics.json"
            train = json.loads(metrics.read_text())["train"] if metrics.exists() else {}
            for key in ("domain/accuracy_last", "pseudo/precision", "pseudo/boxes_per_image"):
                if key in train:
                    cell[key].append(float(train[key]))
    return per_round


def main(argv: list[str]) -> None:
    print(
        "| variant | round | images labelled | seeds | mAP | mAP50 | mAP50 per seed "
        "| domain acc (last ¼) | pseudo precision | pseudo boxes/img | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in argv:
        sweep = Path(name)
        for r, cell in sorted(rows_of(sweep).items()):
            per_seed = " / ".join(f"{v:.3f}" for v in cell["mAP50"])
            cells = [
                sweep.name,
                str(r),
                f"{cell['images'][0]:.0f}",
                str(len(cell["mAP"])),
                _mean_sd(cell["mAP"]),
                _mean_sd(cell["mAP50"]),
                per_seed,
                _mean_sd(cell["domain/accuracy_last"]),
                _mean_sd(cell["pseudo/precision"]),
                _mean_sd(cell["pseudo/boxes_per_image"]),
                f"{statistics.mean(cell['train_s']):.0f}",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
