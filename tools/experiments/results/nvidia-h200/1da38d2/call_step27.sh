# session 18, call B: step 27 (the shared window: LDS/STS, L_i under Sᵀ) against 26: bitwise, grid at every headdim, tests, sanitizers, ncu
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/bench_27.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,26,27 FA3_LAB_COMMIT=$(cat ../g.commit)
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
sed -e 's/for st in (21, 22, 23)/for st in (26, 27)/' -e 's/for st in (22, 23):/for st in (27,):/' -e 's/g\[21\]/g[26]/g' ../cmp_template.py > /tmp/cmp.py
timeout -k 5 60 python3 /tmp/cmp.py > $L/cmp.log 2>&1; echo "CMP $(el) s $(grep -c '^ok' $L/cmp.log)/36 exact $(grep -c 'maxdiff 0 ' $L/cmp.log)"; grep -m5 'BAD\|Error' $L/cmp.log
timeout -k 5 260 python3 -m fa3_lab bench --backward --steps 26,27 --seqlens 2048,4096,8192,16384 --headdims 64,128,256 --dtypes bf16,fp16 --passes bwd --rounds 3 --name bench_27 > $L/grid.log 2>&1; echo "GRID rc=$? $(el) s"
timeout -k 5 100 python3 -m pytest -o addopts= -p no:cacheprovider -q -rs tests/test_backward_kernel.py -m "gpu and not slow" -k "step27" --maxfail=10 > $L/tests27.log 2>&1; tail -1 $L/tests27.log; echo "TESTS $(el) s"
timeout -k 5 60 compute-sanitizer --tool racecheck python3 tools/bwd_sanitize_case.py 27 > $L/san27_racecheck.log 2>&1; echo "racecheck: $(tail -1 $L/san27_racecheck.log) $(el) s"
timeout -k 5 50 compute-sanitizer --tool memcheck python3 tools/bwd_sanitize_case.py 27 > $L/san27_memcheck.log 2>&1; echo "memcheck: $(tail -1 $L/san27_memcheck.log) $(el) s"
timeout -k 5 90 ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SourceCounters --import-source no -k regex:"bwd_kernel" -c 1 -o $L/ncu27 python3 tools/experiments/ncu_bwd_case.py --step 27 --headdim 128 --seqlens 2048 > $L/ncu_run.log 2>&1; echo "NCU rc=$? $(el) s"
ncu --import $L/ncu27.ncu-rep --page source --csv --print-source sass > $L/ncu27_source.csv 2>&1
ncu --import $L/ncu27.ncu-rep --page details > $L/ncu27_details.txt 2>&1; grep -E "Duration|SM Frequency|Warp Cycles Per Issued" $L/ncu27_details.txt
python3 - <<'PY'
import json, glob, statistics
from collections import defaultdict
f = glob.glob("fa3_lab/results/*/bench_27.json")
if f:
    t = defaultdict(dict)
    for r in json.load(open(f[0]))["rows"]:
        t[(r["headdim"], r["dtype"], r["causal"], r["seqlen_q"])][r["impl"]] = r["tflops"]
    by = defaultdict(list)
    for k in sorted(t):
        v = t[k]; cd = v.get("cudnn", 0) or 1; fa2 = v.get("sdpa_flash", 0) or 1; r = v['step27'] / v['step26']; by[k[0]].append(r)
        print(*k, f"26 {v['step26']:.0f} 27 {v['step27']:.0f} 27/26 {r:.3f} 26/cuDNN {v['step26']/cd:.3f} 27/cuDNN {v['step27']/cd:.3f} 27/FA2 {v['step27']/fa2:.3f}")
    for hd, rs in by.items(): print("hd", hd, "27/26 geomean", round(statistics.geometric_mean(rs), 4), "min", round(min(rs), 3), "max", round(max(rs), 3))
PY
