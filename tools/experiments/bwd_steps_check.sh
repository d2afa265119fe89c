#!/usr/bin/env bash
# One device call for new backward steps: build, the smoke of each step against FA3's rule, the backward timed
# (steps vs cuDNN and FA2, a few shapes), compute-sanitizer on the newest step. Logs and JSON go to $OUT.
# Usage (repo root on the GPU machine): FA3_LAB_COMMIT=<sha> bash tools/experiments/bwd_steps_check.sh STEPS
#   STEPS: comma list, e.g. 11,12,13; SAN_STEPS (default the last of STEPS) are sanitized. Stage limits: SMOKE_S,
#   BENCH_S, SAN_S seconds (per tool and step); HEADDIMS (default 64,128,256) are timed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fa3_out}; mkdir -p "$OUT"
STEPS=${1:?comma list of backward steps}; LAST=${STEPS##*,}
export PYTHONUNBUFFERED=1 FA3_LAB_CACHE=${FA3_LAB_CACHE:-/tmp/fa3cache} MAX_JOBS=16 PYTHONPATH=$PWD
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -c "from fa3_lab import _build; _build.load()" 2>&1 | tail -3
echo "BUILD done at $(el) s"
timeout -k 5 ${SMOKE_S:-100} python3 tools/bwd_smoke.py ${STEPS//,/ } > "$OUT/bwd_smoke.log" 2>&1
echo "SMOKE ($(el) s): $(grep -c ' Y ' "$OUT/bwd_smoke.log") Y, $(grep -c ' N ' "$OUT/bwd_smoke.log") N"
grep -E " N |Error|error" "$OUT/bwd_smoke.log" | head -8
timeout -s INT -k 5 ${BENCH_S:-150} python3 -m fa3_lab bench --backward --steps "$STEPS" --dtypes bf16 \
  --seqlens 2048,8192 --headdims ${HEADDIMS:-64,128,256} --rounds 3 --name bench_backward_steps > "$OUT/bwd_bench.log" 2>&1
cp fa3_lab/results/*/bench_backward_steps.json "$OUT/" 2>/dev/null
echo "BENCH ($(el) s)"; grep -vE "^\s*$" "$OUT/bwd_bench.log" | tail -40
for st in ${SAN_STEPS:-$LAST}; do for tool in racecheck synccheck memcheck; do
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool $tool --print-limit 5 python3 tools/bwd_sanitize_case.py "$st" 2>&1 \
    | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize case done|Error" | head -4 | tr '\n' ' '; echo " <- $tool step $st ($(el) s)"
done; done
