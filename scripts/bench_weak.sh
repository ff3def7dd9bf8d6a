#!/usr/bin/env bash
# mAP vs annotation seconds: full boxes vs weak point supervision (no switch, hard, soft switch),
# on the demo (entropy, synthetic data, 100 initial images + 4 rounds x 50), one run at a time.
# Prints one row per regime and round (mean over seeds) and each run's wall time; then the gain
# per 1000 annotation seconds of the first acquisition round (the seed's question: does clicking
# buy more mAP per second early?).
# Usage: scripts/bench_weak.sh [extra overrides...]     e.g. budget.rounds=2 for a shorter variant
#   SEEDS="0 1 2" REGIMES="full weak_point weak_point_hard weak_point_soft" OUT=outputs/bench_weak
# Runs already complete in OUT are not rerun (alrun resumes / skips them), so it can be restarted;
# SEEDS="" only prints the tables. Overrides for one regime: run it alone, e.g. (README numbers)
#   SEEDS=0 REGIMES=weak_point_hard scripts/bench_weak.sh supervision.hard_threshold=0.1
# Only runs that completed every round enter the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS-0 1 2}  # set but empty: only the tables
REGIMES=${REGIMES-full weak_point weak_point_hard weak_point_soft}
OUT=${OUT:-outputs/bench_weak}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"

for seed in $SEEDS; do
  for regime in $REGIMES; do
    run="$OUT/$regime/seed$seed"
    t0=$(date +%s.%N)
    "$PY" -m alrun.cli experiment=demo "supervision=$regime" "seed=$seed" quiet=true \
      "hydra.run.dir=$run" "$@" >"$OUT/$regime-seed$seed.log" 2>&1
    t1=$(date +%s.%N)
    echo "$regime seed$seed $(awk "BEGIN{printf \"%.0f\", $t1 - $t0}")" | tee -a "$OUT/wall.txt"
  done
done

"$PY" - "$OUT" <<'EOF'
import csv, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
walls = {}
for line in (out / "wall.txt").read_text().split("\n"):
    if line.strip():
        regime, seed, wall = line.split()
        walls[(regime, seed)] = float(wall)  # the last run of each wins
runs = {}
found = {p: list(csv.DictReader(p.open())) for p in sorted(out.glob("*/seed*/results.csv"))}
complete = max((len(rows) for rows in found.values()), default=0)
for path, rows in found.items():
    if len(rows) == complete:  # a run stopped half-way would skew the means
        runs.setdefault(path.parent.parent.name, []).append(rows)
print("\n| regime | seeds | round | images | boxes | clicks | cost (s) | mAP | mAP50 | mAP/1000 s |")
print("|---|---|---|---|---|---|---|---|---|---|")
def mean_sd(xs):
    m = statistics.mean(xs)
    return f"{m:.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{m:.3f}"
for regime, seeds in runs.items():
    for r in range(complete):
        col = lambda k, r=r: [float(rows[r][k]) for rows in seeds]
        rate = "" if r == 0 else f"{1000 * (statistics.mean(col('mAP')) - statistics.mean(col('mAP', r - 1))) / (statistics.mean(col('cost_s')) - statistics.mean(col('cost_s', r - 1))):.3f}"
        print(f"| {regime} | {len(seeds)} | {r} | {statistics.mean(col('images')):.0f} | "
              f"{statistics.mean(col('boxes')):.0f} | {statistics.mean(col('clicks')):.0f} | "
              f"{statistics.mean(col('cost_s')):.0f} | {mean_sd(col('mAP'))} | {mean_sd(col('mAP50'))} | {rate} |")
print("\n| regime | mAP gain per 1000 s, round 0 -> 1 (per seed) | mean | wall per run (s) |")
print("|---|---|---|---|")
for regime, seeds in runs.items():
    rates = [1000 * (float(s[1]["mAP"]) - float(s[0]["mAP"]))
             / (float(s[1]["cost_s"]) - float(s[0]["cost_s"])) for s in seeds if len(s) > 1]
    wall = [w for (g, _), w in walls.items() if g == regime]
    print(f"| {regime} | {', '.join(f'{x:.3f}' for x in rates)} | "
          f"{statistics.mean(rates):.3f} | {statistics.mean(wall):.0f} |")
EOF
