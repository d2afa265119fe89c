# session 19, call 4: a second, independent timing of the recorded run's closest points (backward alone, headdim 128, non-causal, 2k-16k, bf16 + fp16, 5 rounds) at the same commit fc86c39
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/replicate_bwd_hd128.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
rm -f fa3_lab/results/nvidia-h200/*.json
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,27 FA3_LAB_COMMIT=$(cat ../g.commit) COLUMNS=200
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 300 python3 -m fa3_lab bench --backward --steps 27 --headdims 128 --seqlens 2048,4096,8192,16384 --dtypes bf16,fp16 --causal false --passes bwd --name replicate_bwd_hd128 > $L/replicate.log 2>&1; echo "REPL rc=$? $(el) s"
python3 - <<'PY'
import json, statistics
from collections import defaultdict
rows = json.load(open("fa3_lab/results/nvidia-h200/replicate_bwd_hd128.json"))["rows"]
t = defaultdict(dict)
for r in rows: t[(r["dtype"], r["seqlen_q"])][r["impl"]] = r
for k in sorted(t):
    v = t[k]; o, c, f = v["step27"], v["cudnn"], v["sdpa_flash"]
    per = [a / b for a, b in zip(c["ms_rounds"], o["ms_rounds"])]
    print(*k, f"cuDNN {c['ms']/o['ms']:.3f} FA2 {f['ms']/o['ms']:.3f} per-round cuDNN", " ".join(f"{x:.3f}" for x in per))
PY
