#!/usr/bin/env bash
# Issue 10, benchmark 2: target-domain mAP on TXL-PBC (source Raabin -> target BCCD, both from
# ../shared/datasets/txl_pbc/domains.csv), three variants, same seeds, same iterations:
#   source_only  trained on the labelled Raabin images alone (round 0; target labels unused)
#   uda          + EMA-teacher pseudo-labels and adversarial alignment on unlabelled BCCD
#   uda_al       uda + BCCD labels bought by active learning (entropy), 10 + 2 x 10 images
#   src_tgt_al   the same bought BCCD labels + the Raabin labels, no adaptation (no adversarial
#                loss, no pseudo-labels): what uda_al gains from adapting rather than from labels
# Sized for a shared 2-core CPU (128 px, batch 4, 150 + 50 iterations): a small, honest
# measurement, not the paper setting. Usage: scripts/bench_uda.sh [OUT_DIR] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/bench_uda}
SEEDS=${2:-0,1,2}
VARIANTS=${VARIANTS:-source_only uda uda_al src_tgt_al}  # a subset re-runs only those
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
COMMON=(experiment=uda_txl detector.builder.image_size=128 trainer.batch_size=4
        trainer.first_iterations=150 trainer.iterations=50 trainer.warmup_iters=20
        budget.initial=10 budget.per_round=10 quiet=true
        hydra.callbacks.sweep_report.enabled=false)
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
run source_only budget.rounds=0 supervision.use_target_labels=false \
  supervision.adversarial_weight=0 supervision.pseudo_weight=0
run uda budget.rounds=0 supervision.use_target_labels=false
run uda_al budget.rounds=2
run src_tgt_al budget.rounds=2 supervision.adversarial_weight=0 supervision.pseudo_weight=0
tables=()
for variant in source_only uda uda_al src_tgt_al; do
  [ -d "$OUT/$variant" ] && tables+=("$OUT/$variant")
done
"$PY" scripts/bench_table.py "${tables[@]}"
echo "total wall time: $(( $(date +%s) - start )) s"
