#!/usr/bin/env bash
# Issue 10, benchmark 3: synthetic pre-training vs training from scratch on BCCD
# (../shared/datasets/bccd), tiny FCOS at 192 px, batch 4, random acquisition, 20 + 20 images,
# same seeds and iterations; the pre-training (400 synthetic images, 400 iterations) is computed
# once and cached under $ALRUN_CACHE/pretrain. Sized for a shared 2-core CPU.
# Usage: [VARIANTS="..."] scripts/bench_pretrain.sh [OUT_DIR] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/bench_pretrain}
SEEDS=${2:-0,1,2}
VARIANTS=${VARIANTS:-scratch synthetic_pretrain}  # a subset re-runs only those
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
COMMON=(dataset=bccd detector.builder.image_size=192 strategy=random trainer.batch_size=4
        budget.initial=20 budget.per_round=20 budget.rounds=1
        trainer.first_iterations=200 trainer.iterations=100 trainer.warmup_iters=20
        quiet=true hydra.callbacks.sweep_report.enabled=false)
start=$(date +%s)
run() {
  local variant=$1; shift
  [[ " $VARIANTS " == *" $variant "* ]] || return 0
  local t0; t0=$(date +%s)
  "$PY" -m alrun.cli -m "${COMMON[@]}" seed="$SEEDS" hydra.sweep.dir="$OUT/$variant" \
    'hydra.sweep.subdir=seed${seed}' "$@" \
    >"$OUT/$variant.log" 2>&1
  echo "$variant: $(( $(date +%s) - t0 )) s"
}
mkdir -p "$OUT"
run scratch supervision=full
run synthetic_pretrain supervision=synthetic_pretrain supervision.num_images=400 \
  supervision.iterations=400
"$PY" scripts/bench_table.py "$OUT/scratch" "$OUT/synthetic_pretrain"
echo "total wall time: $(( $(date +%s) - start )) s (pre-training included once)"
