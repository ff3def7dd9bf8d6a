#!/usr/bin/env bash
# GPU smoke check: installs alrun (make install, if .venv is missing), then runs a 2-round loop
# (round 0 + one acquisition round) of torchvision RetinaNet R50-FPN on the demo data, upscaled
# to a realistic detection size (800 px shorter side, 1333 max), on CUDA, and prints per-round
# train / predict time and mAP50 from results.csv. Never part of CI.
#
#   bash scripts/gpu_smoke.sh                 # on a GPU machine
#   GPU_SMOKE_TINY=1 bash scripts/gpu_smoke.sh  # CPU, tiny sizes: checks the script itself
#
# ALRUN_CMD overrides the alrun command (default .venv/bin/alrun; tests use `python -m alrun.cli`);
# GPU_SMOKE_DIR the output directory (default outputs/gpu_smoke/<date-time>).
set -euo pipefail
cd "$(dirname "$0")/.."

TINY="${GPU_SMOKE_TINY:-0}"
OUT="${GPU_SMOKE_DIR:-outputs/gpu_smoke/$(date +%Y%m%d-%H%M%S)}"
if [ -z "${ALRUN_CMD:-}" ]; then
  [ -x .venv/bin/alrun ] || make install
  ALRUN_CMD=.venv/bin/alrun
fi

if [ "$TINY" = 1 ]; then
  settings=(detector.device=cpu detector.builder.min_size=64 detector.builder.max_size=96
            dataset.max_pool_images=8 dataset.max_test_images=4 budget.initial=4
            budget.per_round=2 trainer.batch_size=2 trainer.first_iterations=2
            trainer.iterations=1 trainer.warmup_iters=1 trainer.lr=0.001)
else
  # without CUDA alrun stops at once: "detector.device: 'cuda' requested but CUDA is not available"
  settings=(detector.device=cuda detector.builder.min_size=800 detector.builder.max_size=1333
            trainer.first_iterations=300 trainer.iterations=150 trainer.num_workers=4
            detector.predict_batch_size=16)
fi

echo "gpu_smoke: $ALRUN_CMD experiment=demo detector=retinanet_resnet50_fpn budget.rounds=1 ${settings[*]}"
start=$(date +%s)
# shellcheck disable=SC2086  # ALRUN_CMD may be a command with arguments
$ALRUN_CMD experiment=demo detector=retinanet_resnet50_fpn budget.rounds=1 quiet=true \
  "hydra.run.dir=$OUT" "${settings[@]}"
echo "gpu_smoke: total wall time $(( $(date +%s) - start )) s; per round (results.csv):"
python3 - "$OUT/results.csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{'round':>5} {'images':>6} {'train_s':>8} {'predict_s':>9} {'mAP50':>6}")
for r in rows:
    print(f"{r['round']:>5} {r['images']:>6} {float(r['train_s']):8.1f} "
          f"{float(r['predict_s']):9.1f} {float(r['mAP50']):6.3f}")
PYEOF
