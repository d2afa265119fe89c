# session 19, call 3: the backward ablation of the recorded run at fc86c39 (steps 11-27 + deterministic 27, bwd alone), the training run, notebook 09 live, step 27's GPU tests (crc32 seeds)
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/*.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../../.whl/*.whl > /dev/null 2>&1 || echo WHEELS FAILED
rm -f fa3_lab/results/nvidia-h200/*.json
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27 FA3_LAB_COMMIT=$(cat ../g.commit) COLUMNS=250
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 260 python3 -m fa3_lab bench --backward --steps 11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27 --deterministic --seqlens 2048,8192 --dtypes bf16 --passes bwd --rounds 3 --name ablation_backward > $L/abl.log 2>&1; echo "ABL rc=$? $(el) s"
timeout -k 5 120 python3 -m fa3_lab.examples.train --out $OUT > $L/train.log 2>&1; echo "TRAIN rc=$? $(el) s"; grep -v "━" $L/train.log | tail -4
PYTHONPATH=$PWD:/tmp/site timeout -k 5 80 python3 -m pytest -p no:cacheprovider -o addopts= --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks/09_backward.ipynb -q > $L/nbval09.log 2>&1; tail -1 $L/nbval09.log; echo "NBVAL $(el) s"
timeout -k 5 $(( 570 - $(el) )) python3 -m pytest -o addopts= -p no:cacheprovider -q -rs tests/test_backward_kernel.py -m "gpu and not slow" -k "step27" --maxfail=10 > $L/tests27.log 2>&1; tail -1 $L/tests27.log; grep -m5 "^FAILED" $L/tests27.log; echo "TESTS $(el) s"
python3 - <<'PY'
import json
from collections import defaultdict
try:
    rows = json.load(open("fa3_lab/results/nvidia-h200/ablation_backward.json"))["rows"]
except Exception as e:
    print("no ablation_backward.json", e); raise SystemExit
t = defaultdict(dict)
for r in rows: t[(r["headdim"], r["causal"], r["seqlen_q"])][r["impl"]] = r["tflops"]
for k in sorted(t):
    v = t[k]; print(*k, " ".join(f"{v[f'step{n}']:.0f}" for n in range(11, 28) if f"step{n}" in v), "| det", f"{v.get('step27_det',0):.0f}", "cudnn", f"{v.get('cudnn',0):.0f}", "fa2", f"{v.get('sdpa_flash',0):.0f}")
PY
