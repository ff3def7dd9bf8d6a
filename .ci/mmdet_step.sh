#!/usr/bin/env bash
# The MMDetection step of .ci/run (see there). Exits 1 when an mmdet test fails; otherwise 0, with
# a one-line reason when it skips (turned off, no time left, install failed or timed out, tests
# timed out). Its pytest output goes to a log, printed in full when a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ci_start="${1:-$(date +%s)}"
limit=$(( ${ALRUN_CI_MINUTES:-80} * 60 ))      # stop everything this long after CI started
install_cap=$(( ${ALRUN_CI_MMDET_INSTALL_MINUTES:-50} * 60 ))
tests_cap=$(( ${ALRUN_CI_MMDET_TEST_MINUTES:-15} * 60 ))  # 38 tests: 11:50 on a loaded 2-core box; 42: 3:53 at load 3
log_dir="${ALRUN_CI_LOGS:-outputs/ci}"
mkdir -p "$log_dir"

if [ "${ALRUN_CI_MMDET:-1}" != 1 ]; then
  echo "ci: mmdet step: skipped (ALRUN_CI_MMDET=${ALRUN_CI_MMDET}; unset it to build and test mmdet)"; exit 0
fi
left=$(( ci_start + limit - $(date +%s) ))
if [ "$left" -lt $(( tests_cap + 300 )) ]; then
  echo "ci: mmdet step: skipped (only ${left}s left of the CI budget)"; exit 0
fi
budget=$(( left - tests_cap < install_cap ? left - tests_cap : install_cap ))
echo "ci: mmdet step: building .venv-mmdet (at most ${budget}s; log $log_dir/mmdet-install.log)"
step_start=$(date +%s)
if ! MAX_JOBS="${MAX_JOBS:-2}" timeout --kill-after=30 "$budget" \
    bash scripts/install_mmdet.sh > "$log_dir/mmdet-install.log" 2>&1; then
  echo "ci: mmdet step: mmdet tests skipped: the install did not finish in ${budget}s or failed" \
       "($(tail -n 1 "$log_dir/mmdet-install.log" | cut -c1-200))"
  exit 0
fi
echo "ci: mmdet step: .venv-mmdet built in $(( $(date +%s) - step_start ))s"
test_start=$(date +%s)
timeout --kill-after=30 "$tests_cap" .venv-mmdet/bin/python -m pytest -q -m mmdet \
  tests/detectors/test_mmdet*.py > "$log_dir/mmdet-tests.log" 2>&1
status=$?
summary=$(tail -n 1 "$log_dir/mmdet-tests.log" | tr -d '=' | sed 's/^ *//')
echo "ci: mmdet step: tests exit status $status in $(( $(date +%s) - test_start ))s" \
     "(pytest says: ${summary//passed/ok}; log $log_dir/mmdet-tests.log)"
case "$status" in
  0) exit 0 ;;
  124|137) echo "ci: mmdet step: the mmdet tests did not finish in ${tests_cap}s: counted as skipped"; exit 0 ;;
  *) cat "$log_dir/mmdet-tests.log"; echo "ci: mmdet step: FAILED (mmdet tests, exit status $status)"; exit 1 ;;
esac
