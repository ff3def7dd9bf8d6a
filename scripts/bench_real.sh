#!/usr/bin/env bash
# Real-data benchmark on CPU: random vs least_confidence vs entropy, 3 seeds each, on BCCD and
# on the playing cards (experiment=bccd / experiment=cards), then alrun-report per dataset
# (every -m sweep writes <sweep dir>/report/; the summary table is printed at the end).
#
#   nice -n 15 bash scripts/bench_real.sh > bench_real.log 2>&1 &
#
# DATASETS (default "bccd cards"), STRATEGIES, SEEDS and JOBS (parallel sweep jobs through
# hydra/launcher=joblib; default 1 = one run after another) change the grid; OUT the folder
# (default outputs/bench_real). Extra arguments are passed to every alrun call.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"

ALRUN_CMD="${ALRUN_CMD:-.venv/bin/alrun}"
REPORT_CMD="${REPORT_CMD:-.venv/bin/alrun-report}"
DATASETS="${DATASETS:-bccd cards}"
STRATEGIES="${STRATEGIES:-random,least_confidence,entropy}"
SEEDS="${SEEDS:-0,1,2}"
JOBS="${JOBS:-1}"
OUT="${OUT:-outputs/bench_real}"

launcher=()
if [ "$JOBS" -gt 1 ]; then
  launcher=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
fi

for dataset in $DATASETS; do
  start=$(date +%s)
  echo "bench_real: $dataset: strategy=$STRATEGIES seed=$SEEDS ($(date))"
  # shellcheck disable=SC2086  # ALRUN_CMD may be a command with arguments
  $ALRUN_CMD -m "experiment=$dataset" "strategy=$STRATEGIES" "seed=$SEEDS" \
    "hydra.sweep.dir=$OUT/$dataset" "${launcher[@]}" "$@"
  echo "bench_real: $dataset: $(( $(date +%s) - start )) s"
done
for dataset in $DATASETS; do  # the sweep wrote report/ on mAP; the same on mAP50
  # shellcheck disable=SC2086
  $REPORT_CMD "$OUT/$dataset" --metric mAP50 --out "$OUT/$dataset/report_mAP50"
done
