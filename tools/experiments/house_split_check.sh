#!/usr/bin/env bash
# One device call for the split of step 04 into steps 04-10 (issue #19): build, GPU tests, sanitizers, then
# the new step 10 against a base commit's step 04 (same process, rotating rounds) and the step ablation.
# Usage (repo root on the GPU machine, base sources unpacked under .base/cuda):
#   FA3_LAB_COMMIT=<sha> bash tools/experiments/house_split_check.sh [budget_s]
# Every stage has its own time limit (TEST_S, SAN_S seconds; the grid gets what is left of budget_s) so that
# the later ones still run; logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fa3_out}; mkdir -p "$OUT"
BUDGET=${1:-560}
export PYTHONUNBUFFERED=1 FA3_LAB_CACHE=${FA3_LAB_CACHE:-/tmp/fa3cache} MAX_JOBS=16 PYTHONPATH=$PWD
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
python3 -c "import sys; sys.path.insert(0, 'tools/experiments'); from pathlib import Path; import grid_vs_base as g; \
g.load_base(Path('.base/cuda'), 4, 'cfb378a')" > "$OUT/base_build.log" 2>&1 &
python3 -c "from fa3_lab import _build; _build.load()" 2>&1 | tail -3
wait
echo "BUILD done at $(el) s (base: $(tail -1 "$OUT/base_build.log"))"
timeout -s INT ${TEST_S:-150} python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_kernel.py tests/test_fp8_kernel.py \
  -q -m gpu -rs -x > "$OUT/test.log" 2>&1
echo "TESTS ($(el) s): $(tail -1 "$OUT/test.log")"; grep -E "^(FAILED|ERROR)" "$OUT/test.log" | head -5
san() {  # tool, then sanitize_case.py arguments
  local tool=$1; shift
  printf '%-10s %-14s ' "$tool" "$*"
  compute-sanitizer --tool "$tool" --print-limit 5 python3 tools/sanitize_case.py "$@" 2>&1 \
    | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize case done|Error|Traceback" | tr '\n' ' '; echo
}
export -f san
timeout ${SAN_S:-140} bash -c 'for t in memcheck racecheck synccheck; do san $t --step 10; san $t --fp8; san $t --step 4; done
  for st in 7 8 6 9; do san memcheck --step $st; done; for st in 7 8; do san racecheck --step $st; done' \
  > "$OUT/sanitize.log" 2>&1
cat "$OUT/sanitize.log"; echo "SANITIZERS done at $(el) s"
left=$(( BUDGET - $(el) ))
timeout -s INT -k 15 $left python3 tools/experiments/grid_vs_base.py --base-cuda .base/cuda --rounds 3 --ablation --out "$OUT" \
  > "$OUT/grid.log" 2>&1
grep -E "GRID|ABL|saved|Error|error" "$OUT/grid.log"; echo "END at $(el) s"
