#!/usr/bin/env bash
# One device call for the backward (step 11): build (forward step 01 + backward only), then the actions named.
# Usage (repo root, GPU machine): bash tools/device_bwd.sh smoke test ...   Logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fa3_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FA3_LAB_CACHE=${FA3_LAB_CACHE:-/tmp/fa3cache} MAX_JOBS=16
export FA3_LAB_STEPS=${FA3_LAB_STEPS:-1,11}
t0=$(date +%s)
python3 -c "from fa3_lab import _build; _build.load()" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
PT="python3 -m pytest -o addopts= -p no:cacheprovider -q -rs"
for what in "$@"; do
  t1=$(date +%s)
  case "$what" in
    smoke) python3 tools/bwd_smoke.py 2>&1 | tee "$OUT/smoke.log" | tail -30 ;;
    test) $PT tests/test_backward_kernel.py -m "gpu and not slow" --maxfail=10 2>&1 | tail -30 | tee "$OUT/test.log" ;;
    slow) $PT tests/test_backward_kernel.py -m "gpu and slow" 2>&1 | tail -10 | tee "$OUT/slow.log" ;;
    integ) $PT tests/test_integration.py -m gpu 2>&1 | tail -15 | tee "$OUT/integ.log" ;;
    hf) $PT -s tests/test_backward_hf.py 2>&1 | tail -15 | tee "$OUT/hf.log" ;;
    mem) $PT -s tests/test_backward_kernel.py -k peak_memory 2>&1 | tail -6 | tee "$OUT/mem.log" ;;
    bench) python3 tools/bwd_bench.py 2>&1 | tail -8 | tee "$OUT/bench.log" ;;
    sass) for o in "$FA3_LAB_CACHE"/fa3_lab_ext-*/11_bwd.cuda.o; do cuobjdump -sass "$o" > "$OUT/sass11.txt"
        echo "HGMMA in 11_bwd: $(grep -c HGMMA "$OUT/sass11.txt"), spills (STL): $(grep -c 'STL' "$OUT/sass11.txt")"; done ;;
    memcheck|racecheck|synccheck)
      compute-sanitizer --tool "$what" --print-limit 20 python3 tools/bwd_sanitize_case.py 2>&1 | tail -8 | tee "$OUT/$what.log" ;;
  esac
  echo "== $what: $(( $(date +%s) - t1 )) s"
done
