# session 17, call E: step 26 (dO released after dV) against 25: bitwise (deterministic), timed at headdim 64/128, tests, sanitizers
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/bench_26.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,25,26 FA3_LAB_COMMIT=$(cat ../g.commit)
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
sed -e 's/for st in (21, 22, 23)/for st in (25, 26)/' -e 's/for st in (22, 23):/for st in (26,):/' -e 's/g\[21\]/g[25]/g' ../cmp_template.py > /tmp/cmp.py
timeout -k 5 60 python3 /tmp/cmp.py > $L/cmp.log 2>&1; echo "CMP $(el) s $(grep -c '^ok' $L/cmp.log)/36 exact $(grep -c 'maxdiff 0 ' $L/cmp.log)"; grep -m5 'BAD\|Error' $L/cmp.log
timeout -k 5 150 python3 -m fa3_lab bench --backward --steps 25,26 --seqlens 2048,4096,8192,16384 --headdims 64,128 --dtypes bf16,fp16 --passes bwd --rounds 3 --name bench_26 > $L/grid.log 2>&1; echo "GRID rc=$? $(el) s"
python3 - <<'PY'
import json, glob, statistics
from collections import defaultdict
f = glob.glob("fa3_lab/results/*/bench_26.json")
if f:
    t = defaultdict(dict)
    for r in json.load(open(f[0]))["rows"]:
        t[(r["headdim"], r["dtype"], r["causal"], r["seqlen_q"])][r["impl"]] = r["tflops"]
    rs = []
    for k in sorted(t):
        v = t[k]; cd = v.get("cudnn", 0) or 1; r = v['step26'] / v['step25']; rs.append(r)
        print(*k, f"s25 {v['step25']:.0f} s26 {v['step26']:.0f} 26/25 {r:.3f} 25/cuDNN {v['step25']/cd:.3f} 26/cuDNN {v['step26']/cd:.3f}")
    print("26/25 geomean", round(statistics.geometric_mean(rs), 4), "min", round(min(rs), 3), "max", round(max(rs), 3))
PY
timeout -k 5 100 python3 -m pytest -o addopts= -p no:cacheprovider -q -rs tests/test_backward_kernel.py -m "gpu and not slow" -k "step26" --maxfail=10 > $L/tests26.log 2>&1; tail -1 $L/tests26.log; echo "TESTS $(el) s"
timeout -k 5 60 compute-sanitizer --tool racecheck python3 tools/bwd_sanitize_case.py 26 > $L/san26_racecheck.log 2>&1; echo "racecheck: $(tail -1 $L/san26_racecheck.log) $(el) s"
timeout -k 5 50 compute-sanitizer --tool memcheck python3 tools/bwd_sanitize_case.py 26 > $L/san26_memcheck.log 2>&1; echo "memcheck: $(tail -1 $L/san26_memcheck.log) $(el) s"
