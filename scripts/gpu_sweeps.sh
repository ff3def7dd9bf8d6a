#!/usr/bin/env bash
# The comparison sweeps of docs/benchmarks.md ("Comparisons") in one go, for a machine with a GPU
# and many cores (a CPU machine runs them too, at ~10 CPU-minutes per lite0 run):
#   demo       experiment=demo (tiny FCOS, synthetic): random vs the strategies whose computation
#              changed for fidelity (ppal, ccms, loc_stability, cald, tta_inconsistency,
#              loss_prediction, box_in_box, badge), SEEDS seeds
#   demo_weak  experiment=demo, entropy: supervision=full vs weak_point_soft (Desai's soft switch)
#   bccd       experiment=bccd_lite0 (ImageNet-pretrained lite0 on BCCD): random vs entropy,
#              least_confidence, mc_entropy, al_mdn, coreset, badge, ppal
#   bccd_weak  experiment=bccd_lite0, random: supervision=full vs weak_point, weak_point_soft,
#              pseudo_label
#   cards, cards_weak, txl, txl_weak   the same two sweeps on experiment=cards_lite0 and
#              experiment=txlpbc_lite0 (datasets at their presets' roots under ../shared)
# Each is one `alrun -m` sweep with Hydra's joblib launcher (JOBS jobs, one torch thread each);
# each ends with its alrun-report (<sweep dir>/report/). Then every report's table is printed.
#
#   bash scripts/gpu_sweeps.sh                          # all four, 3 seeds
#   WHICH="bccd" SEEDS=0 BCCD_ROOT=/data/bccd bash scripts/gpu_sweeps.sh
# Env: PY (python with alrun importable; default .venv/bin/python, else python3), JOBS (12),
# SEEDS (0,1,2), WHICH, BCCD_ROOT (../shared/datasets/bccd), GPU_SWEEPS_DIR (outputs/gpu_sweeps),
# DEMO_STRATEGIES / BCCD_STRATEGIES (the bccd, cards and txl sweeps) / REGIMES (the *_weak sweeps;
# without `full`, report them beside the strategy sweep's random runs) as comma lists to run
# fewer, EXTRA (overrides added to every
# sweep, e.g. EXTRA="trainer.iterations=1 trainer.first_iterations=1 budget.rounds=1" to check
# the script itself in a minute).
# Runs already complete in GPU_SWEEPS_DIR are kept (alrun refuses to overwrite a finished run and
# resumes a killed one), so a stopped call can be repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
JOBS=${JOBS:-12}
SEEDS=${SEEDS:-0,1,2}
WHICH=${WHICH:-demo demo_weak bccd bccd_weak}
BCCD_ROOT=${BCCD_ROOT:-../shared/datasets/bccd}
DIR=${GPU_SWEEPS_DIR:-outputs/gpu_sweeps}
DEMO_STRATEGIES=${DEMO_STRATEGIES:-random,ppal,ccms,loc_stability,cald,tta_inconsistency,loss_prediction,box_in_box,badge}
BCCD_STRATEGIES=${BCCD_STRATEGIES:-random,entropy,least_confidence,mc_entropy,al_mdn,coreset,badge,ppal}
REGIMES=${REGIMES:-full,weak_point,weak_point_soft,pseudo_label}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-disabled}

sweep() {  # name, report group key, baseline, overrides...
  local name=$1 group=$2 baseline=$3 start
  shift 3
  start=$(date +%s)
  echo "gpu_sweeps: $name: alrun -m $*"
  # shellcheck disable=SC2086  # EXTRA is a list of overrides
  "$PY" -m alrun.cli -m "$@" ${EXTRA:-} "seed=$SEEDS" quiet=true hydra/launcher=joblib \
    "hydra.launcher.n_jobs=$JOBS" "hydra.sweep.dir=$DIR/$name" \
    "hydra.callbacks.sweep_report.group_by=$group" >"$DIR/$name.log" 2>&1 || true
  echo "gpu_sweeps: $name took $(( $(date +%s) - start )) s"
  # the sweep's own report compares against random; regime sweeps against full boxes
  "$PY" -m alrun.report.cli "$DIR/$name" --group-by "$group" --baseline "$baseline" \
    >"$DIR/$name.report.txt" 2>&1 || true
}

mkdir -p "$DIR"
for which in $WHICH; do
  case $which in
    demo) sweep demo strategy.name random experiment=demo "strategy=$DEMO_STRATEGIES" ;;
    demo_weak) sweep demo_weak choices.supervision full experiment=demo strategy=entropy \
      supervision=full,weak_point_soft ;;
    bccd) sweep bccd strategy.name random experiment=bccd_lite0 "dataset.root=$BCCD_ROOT" \
      "strategy=$BCCD_STRATEGIES" ;;
    bccd_weak) sweep bccd_weak choices.supervision full experiment=bccd_lite0 \
      "dataset.root=$BCCD_ROOT" strategy=random "supervision=$REGIMES" ;;
    cards) sweep cards strategy.name random experiment=cards_lite0 "strategy=$BCCD_STRATEGIES" ;;
    cards_weak) sweep cards_weak choices.supervision full experiment=cards_lite0 strategy=random \
      "supervision=$REGIMES" ;;
    txl) sweep txl strategy.name random experiment=txlpbc_lite0 "strategy=$BCCD_STRATEGIES" ;;
    txl_weak) sweep txl_weak choices.supervision full experiment=txlpbc_lite0 strategy=random \
      "supervision=$REGIMES" ;;
    *) echo "gpu_sweeps: unknown sweep '$which' (demo, demo_weak, bccd, bccd_weak, cards, cards_weak, txl, txl_weak)" >&2; exit 2 ;;
  esac
done
for which in $WHICH; do
  echo "=== $which"; tail -n 40 "$DIR/$which.report.txt"
done
