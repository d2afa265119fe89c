# session 19, call 1: the recorded run's backward grid (step 27, the default) with the bench's default 5 rounds
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/*.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
rm -f fa3_lab/results/nvidia-h200/*.json
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,27 FA3_LAB_COMMIT=$(cat ../g.commit) COLUMNS=200
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 $(( 585 - $(el) )) python3 -m fa3_lab bench --backward --steps 27 --dtypes bf16,fp16 > $L/bgrid.log 2>&1; echo "BGRID rc=$? $(el) s"
python3 - <<'PY'
import json
from collections import defaultdict
try:
    rows = json.load(open("fa3_lab/results/nvidia-h200/bench_backward.json"))["rows"]
except Exception as e:
    print("no bench_backward.json", e); raise SystemExit
t = defaultdict(dict)
for r in rows:
    if r["pass"] == "bwd": t[(r["headdim"], r["dtype"], r["causal"], r["seqlen_q"])][r["impl"]] = r["tflops"]
for hd in (64, 128, 256):
    for dt in ("bf16", "fp16"):
        for c in (False, True):
            ks = sorted(k for k in t if k[:3] == (hd, dt, c) and k[3] >= 2048)
            print(hd, dt, "causal" if c else "full  ", " ".join(f"{t[k]['step27']/t[k]['cudnn']:.3f}" for k in ks), "| FA2", " ".join(f"{t[k]['step27']/t[k]['sdpa_flash']:.2f}" for k in ks))
PY
