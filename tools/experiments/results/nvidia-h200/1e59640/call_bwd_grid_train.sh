# session 18, call C1: the recorded run's backward grid (step 27, the default) and the training run; one GPU-test seed re-checked on steps 26 and 27
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/*.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
rm -f fa3_lab/results/nvidia-h200/*.json
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,26,27 FA3_LAB_COMMIT=$(cat ../g.commit) COLUMNS=200
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 330 python3 -m fa3_lab bench --backward --steps 27 --dtypes bf16,fp16 --rounds 3 > $L/bgrid.log 2>&1; echo "BGRID rc=$? $(el) s"
timeout -k 5 120 python3 -m fa3_lab.examples.train --out $OUT > $L/train.log 2>&1; echo "TRAIN rc=$? $(el) s"; grep -v "━" $L/train.log | tail -4
timeout -k 5 40 python3 - > $L/seed.log 2>&1 <<'PY'
import sys; sys.path.insert(0, "tests")
import test_backward_kernel as t
q, k, v, do = t.make_inputs("fp16", 256, 1, 1000, 7, 2, 2, seed=74059230)
for st in (26, 27):
    try:
        r = t.check_grads("fp16", q, k, v, do, True, f"step {st}", bwd_step=st); print(st, "ok", {n: (f"{e:.4g}", f"{tl:.4g}") for n, (e, tl) in r.items()})
    except AssertionError as e:
        print(st, "FAIL", str(e)[:300])
PY
cat $L/seed.log | grep -v Warn; echo "SEED $(el) s"
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
            ks = sorted(k for k in t if k[:3] == (hd, dt, c))
            print(hd, dt, "causal" if c else "full  ", " ".join(f"{t[k]['step27']/t[k]['cudnn']:.3f}" for k in ks), "| FA2", " ".join(f"{t[k]['step27']/t[k]['sdpa_flash']:.2f}" for k in ks))
PY
