# session 19, call 2: the forward part of the recorded run at fc86c39 (paper grid with every peer, Table 2, FP8); the backward grid ran in call 1
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/*.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../../.whlfa3/*.whl > $L/pip.log 2>&1 || echo WHEEL FAILED
rm -f fa3_lab/results/nvidia-h200/*.json
export PYTHONPATH=$PWD:/tmp/site FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=1,2,3,4,5,6,7,8,9,10 FA3_LAB_COMMIT=$(cat ../g.commit) COLUMNS=200
python3 -c "import fa3_fwd_interface; print('fa3-fwd OK')" 2>&1 | tail -1
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 120 python3 -m fa3_lab bench --ablation --rounds 5 > $L/ablation.log 2>&1; echo "ABLATION rc=$? $(el) s"; grep -v "^\s*$" $L/ablation.log | tail -4
timeout -k 5 120 python3 -m fa3_lab bench --fp8 --rounds 3 > $L/fp8.log 2>&1; echo "FP8 rc=$? $(el) s"
timeout -k 5 $(( 575 - $(el) )) python3 -m fa3_lab bench --steps 10 --rounds 3 > $L/grid.log 2>&1; echo "GRID rc=$? $(el) s"
grep -i "skipped" $L/grid.log | head -5
tail -32 $L/fp8.log | grep -v "^\s*$" | tail -10
python3 - <<'PY'
import json, statistics
from collections import defaultdict
try:
    rows = json.load(open("fa3_lab/results/nvidia-h200/bench.json"))["rows"]
except Exception as e:
    print("no bench.json", e); raise SystemExit
t = defaultdict(dict)
for r in rows: t[(r["dtype"], r["headdim"], r["causal"], r["seqlen_q"])][r["impl"]] = r["tflops"]
for peer in ("fa3", "cudnn", "sdpa_flash"):
    rs = [v["step10"] / v[peer] for v in t.values() if peer in v and "step10" in v]
    if rs: print(peer, "n", len(rs), "median", round(statistics.median(rs), 3), "min", round(min(rs), 3), "max", round(max(rs), 3))
PY
