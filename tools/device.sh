#!/usr/bin/env bash
# One device call: install carried wheels, build the extension, then the named actions, in order.
# Usage (from the repo root, on the GPU machine):  bash tools/device.sh [smoke|test|gputests|sanitize|bench|
#   ablation|fp8test|fp8sanitize|fp8bench|bwdsmoke|bwdtest|bwdslow|bwdhf|bwdmem|bwdbench|bwdablation|bwdsass|bwdsanitize|
#   bwdtrace|
#   notebooks|results|pack] ...
# FA3_LAB_STEPS=1,11 builds only those steps (e.g. a quick backward call: the forward's step 01 and step 11).
# BWD_STEPS="12 13" restricts the bwd* actions to those backward steps (default: every backward step built).
# Results and logs go under $OUT when it is set. A/B experiments: tools/experiments/ (ab.py, regime.py, …).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fa3_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 FA3_LAB_CACHE=${FA3_LAB_CACHE:-/tmp/fa3cache} MAX_JOBS=16
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
t0=$(date +%s)
python3 -c "from fa3_lab import _build; _build.load()" 2>&1 | tail -30 || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
steps16=$(python3 -c "from fa3_lab import api; print(' '.join(str(s) for s in api.forward_steps16()))")
bwd_steps=${BWD_STEPS:-$(python3 -c "from fa3_lab import api; print(' '.join(str(s) for s in api.backward_steps()))")}
PT="python3 -m pytest -o addopts= -p no:cacheprovider -q -rs"
for what in "$@"; do
  case "$what" in
    smoke) python3 tools/smoke.py 2>&1 | tee "$OUT/smoke.log" ;;
    test) python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_kernel.py -q -m gpu -x --maxfail=3 -rs 2>&1 | tail -40 | tee "$OUT/test.log" ;;
    gputests) python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_kernel.py tests/test_integration.py tests/test_grading.py -q -m gpu -rs 2>&1 | tail -25 | tee "$OUT/gputests.log" ;;
    sanitize)  # memcheck, racecheck, synccheck on a small case per step (tools/sanitize_case.py --step N)
      for st in $steps16; do for tool in memcheck racecheck synccheck; do
        printf 'step %s %s: ' "$st" "$tool"
        compute-sanitizer --tool $tool --print-limit 20 python3 tools/sanitize_case.py --step "$st" 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|error" | head -3 | tr '\n' ' '; echo
      done; done 2>&1 | tee "$OUT/sanitize.log" ;;
    memcheck|racecheck|synccheck)
      compute-sanitizer --tool "$what" --print-limit 20 python3 tools/sanitize_case.py 2>&1 | tail -15 | tee "$OUT/$what.log" ;;
    bench) python3 -m fa3_lab bench 2>&1 | tail -60 ;;
    ablation) python3 -m fa3_lab bench --ablation 2>&1 | tail -30 ;;
    fp8test) python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_fp8_kernel.py $(ls tests/test_fp8_quantize.py 2>/dev/null) -q -m gpu -rs 2>&1 | tail -25 | tee "$OUT/fp8test.log" ;;
    fp8sanitize) for tool in memcheck racecheck synccheck; do echo "== $tool"
      compute-sanitizer --tool $tool --print-limit 20 python3 tools/sanitize_case.py --fp8 2>&1 | tail -4; done 2>&1 | tee "$OUT/fp8sanitize.log" ;;
    fp8bench) python3 -m fa3_lab bench --fp8 2>&1 | tail -30 ;;
    bwdsmoke) python3 tools/bwd_smoke.py $bwd_steps 2>&1 | tee "$OUT/bwd_smoke.log" | tail -30 ;;
    bwdtest) $PT tests/test_backward_kernel.py -m "gpu and not slow" --maxfail=10 2>&1 | tail -30 | tee "$OUT/bwd_test.log" ;;
    bwdslow) $PT tests/test_backward_kernel.py -m "gpu and slow" 2>&1 | tail -10 | tee "$OUT/bwd_slow.log" ;;
    bwdhf) $PT -s tests/test_backward_hf.py 2>&1 | tail -15 | tee "$OUT/bwd_hf.log" ;;
    bwdmem) $PT -s tests/test_backward_kernel.py -k peak_memory 2>&1 | tail -6 | tee "$OUT/bwd_mem.log" ;;
    bwdbench) python3 -m fa3_lab bench --backward --steps "${bwd_steps// /,}" 2>&1 | tail -40 ;;
    bwdablation)  # every backward step (and the last one deterministic) with the peers, a few shapes, bf16
      python3 -m fa3_lab bench --backward --steps "${bwd_steps// /,}" --deterministic --seqlens 2048,8192 \
        --dtypes bf16 --rounds 3 --name ablation_backward 2>&1 | tail -40 ;;
    bwdsass) for st in $bwd_steps; do for o in "$FA3_LAB_CACHE"/fa3_lab_ext-*/${st}_bwd*.cuda.o; do
        cuobjdump -sass "$o" > "$OUT/sass$st.txt"
        echo "step $st: HGMMA $(grep -c HGMMA "$OUT/sass$st.txt"), local memory (STL) $(grep -c 'STL' "$OUT/sass$st.txt")"
      done; done ;;
    bwdtrace)  # every CTA of the last backward step stamped (its FA3_TRACE build): prologue, loop, epilogue, gaps
      python3 tools/experiments/bwd_trace.py --step "${bwd_steps##* }" --out "$OUT" 2>&1 | grep -v Warn | tail -30 ;;
    bwdsanitize) for st in $bwd_steps; do for tool in memcheck racecheck synccheck; do echo "== step $st $tool"
      compute-sanitizer --tool $tool --print-limit 20 python3 tools/bwd_sanitize_case.py $st 2>&1 | tail -4
      done; done 2>&1 | tee "$OUT/bwd_sanitize.log" ;;
    notebooks) python3 tools/run_notebooks.py 2>&1 | tee "$OUT/notebooks.log"
      python3 -m pytest -p no:cacheprovider --nbval notebooks -q 2>&1 | tail -15 | tee "$OUT/nbval.log"
      mkdir -p "$OUT/pack/notebooks" && cp notebooks/0*.ipynb "$OUT/pack/notebooks/" ;;
    results) find fa3_lab/results -name '*.json' -mmin -30 | while read f; do d="$OUT/results/$(basename "$(dirname "$f")")"; mkdir -p "$d"; cp "$f" "$d/"; done; ls -R "$OUT/results" ;;
    pack) mkdir -p "$OUT/pack" && cp -r fa3_lab/results/nvidia-* "$OUT/pack/" 2>/dev/null; tar -C "$OUT/pack" -cf "$OUT/run.tar" . && rm -rf "$OUT/pack" && tar -tf "$OUT/run.tar" ;;
    *) echo "unknown action: $what (see the usage line at the top of tools/device.sh)"; exit 2 ;;
  esac
done
