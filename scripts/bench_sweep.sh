#!/usr/bin/env bash
# Wall time of ONE small sweep (2 runs: random + entropy, smoke-sized) launched two ways:
#   sequential: Hydra's basic launcher, one job after the other, torch's default thread count;
#   parallel:   Hydra's joblib launcher (pip install 'alrun[parallel]'), JOBS jobs at once,
#               one torch thread per job (OMP_NUM_THREADS=1).
# On a shared machine the numbers are noisy: run it when the machine is otherwise idle, and
# more than once. Usage: scripts/bench_sweep.sh [extra overrides...]
#
# README=1 scripts/bench_sweep.sh times the README's sweep instead (experiment=demo, random +
# least_confidence + entropy x seeds 0,1,2 = 9 runs, then the report) once per joblib job count
# in JOBS_LIST (default "2 3"), one torch thread per job; ~15 min per entry on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
OUT=$(mktemp -d /tmp/alrun-bench-sweep.XXXXXX)
export ALRUN_CACHE=${ALRUN_CACHE:-$HOME/.cache/alrun}

if [[ "${README:-0}" == 1 ]]; then
  rows=()
  for n in ${JOBS_LIST:-2 3}; do
    s=$(date +%s.%N)
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" -m alrun.cli -m experiment=demo \
      strategy=random,least_confidence,entropy seed=0,1,2 hydra/launcher=joblib \
      hydra.launcher.n_jobs="$n" hydra.sweep.dir="$OUT/jobs$n" "$@" >"$OUT/jobs$n.log" 2>&1
    e=$(date +%s.%N)
    rows+=("$(printf '%-44s %10.1f' "joblib, $n jobs x 1 torch thread" "$(awk "BEGIN{print $e - $s}")")")
  done
  printf '%-44s %10s\n' "README sweep, 9 runs ($(nproc) CPU cores)" "wall (s)"
  printf '%s\n' "${rows[@]}"
  echo "outputs and logs: $OUT"
  exit 0
fi
SWEEP=(experiment=smoke strategy=random,entropy seed=0 budget.rounds=1
       hydra.callbacks.sweep_report.enabled=false "$@")

# generate the synthetic images once, so that neither timing pays for it
"$PY" -m alrun.cli experiment=smoke budget.rounds=1 trainer.iterations=1 \
  trainer.first_iterations=1 quiet=true hydra.run.dir="$OUT/warm" >/dev/null

now() { date +%s.%N; }
t0=$(now)
"$PY" -m alrun.cli -m "${SWEEP[@]}" hydra.sweep.dir="$OUT/sequential" >"$OUT/sequential.log" 2>&1
t1=$(now)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" -m alrun.cli -m "${SWEEP[@]}" hydra/launcher=joblib \
  hydra.launcher.n_jobs="$JOBS" hydra.sweep.dir="$OUT/parallel" >"$OUT/parallel.log" 2>&1
t2=$(now)

printf '%-44s %10s\n' "launcher (2 runs, $(nproc) CPU cores)" "wall (s)"
printf '%-44s %10.1f\n' "basic, sequential, default torch threads" "$(awk "BEGIN{print $t1 - $t0}")"
printf '%-44s %10.1f\n' "joblib, $JOBS jobs in parallel, 1 thread each" "$(awk "BEGIN{print $t2 - $t1}")"
echo "outputs and logs: $OUT"
