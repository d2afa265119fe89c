# session 19, call 5 (experiment, not a step of the repo): step 27 with L_i read before the Sᵀ/dPᵀ GEMMs are issued (a dev-only step 28), bitwise and A/B at headdim 128/256
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .; cp fa3_lab/results/nvidia-h200/bench_28.json $OUT/ 2>/dev/null' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
rm -f fa3_lab/results/nvidia-h200/*.json
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,27,28 FA3_LAB_COMMIT=$(cat ../g.commit)+l_first COLUMNS=200
python3 -c "from fa3_lab import _build; _build.load()" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 60 python3 - > $L/cmp.log 2>&1 <<'PY'
import torch, fa3_lab
ok = 0
for hd in (64, 128, 256):
    for causal in (False, True):
        for dt in (torch.bfloat16, torch.float16):
            g = torch.Generator(device="cuda").manual_seed(hd * 7 + causal)
            q, k, v = (torch.randn(2, 1000, 4, hd, device="cuda", dtype=dt, generator=g).requires_grad_() for _ in range(3))
            do = torch.randn(2, 1000, 4, hd, device="cuda", dtype=dt, generator=g)
            grads = {}
            for st in (27, 28):
                o = fa3_lab.flash_attn_func(q, k, v, causal=causal, deterministic=True, bwd_step=st)
                grads[st] = torch.autograd.grad(o, (q, k, v), do)
            same = all(torch.equal(a, b) for a, b in zip(grads[27], grads[28]))
            ok += same
            print(hd, causal, dt, "bitwise" if same else "DIFFERENT")
print("ok", ok, "of 12")
PY
tail -1 $L/cmp.log; grep -m3 "DIFF\|Error" $L/cmp.log; echo "CMP $(el) s"
timeout -k 5 $(( 290 - $(el) )) python3 -m fa3_lab bench --backward --steps 27,28 --headdims 128,256 --seqlens 2048,8192,16384 --dtypes bf16 --passes bwd --no-peers --rounds 3 --name bench_28 > $L/ab.log 2>&1; echo "AB rc=$? $(el) s"
python3 - <<'PY'
import json, statistics
from collections import defaultdict
rows = json.load(open("fa3_lab/results/nvidia-h200/bench_28.json"))["rows"]
t = defaultdict(dict)
for r in rows: t[(r["headdim"], r["causal"], r["seqlen_q"])][r["impl"]] = r
rs = []
for k in sorted(t):
    a, b = t[k]["step27"], t[k]["step28"]; rs.append(a["ms"] / b["ms"])
    print(*k, f"28/27 {a['ms']/b['ms']:.3f}", "rounds", " ".join(f"{x/y:.3f}" for x, y in zip(a["ms_rounds"], b["ms_rounds"])))
print("geomean", round(statistics.geometric_mean(rs), 4))
PY
