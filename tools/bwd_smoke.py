"""Device smoke of the backward steps: one case per (step, headdim, causal, dtype, shape, deterministic or not), a
table of max errors vs FA3's tolerance, JSON to $OUT/bwd_smoke.json.
Usage: python tools/bwd_smoke.py [step ...]   (default: every backward step built)"""
from __future__ import annotations

import itertools
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_backward_kernel as T  # noqa: E402

from fa3_lab import api  # noqa: E402

CASES = (((2, 113, 203, 4, 2), False), ((1, 1031, 1000, 8, 1), False), ((2, 515, 777, 4, 4), True),
         ((1, 1031, 1000, 8, 2), True))  # (shape, deterministic): sq > sk and sq < sk in each mode
rows = []
for step, hd, causal, dt, (shape, det) in itertools.product([int(a) for a in sys.argv[1:]] or api.backward_steps(),
                                                          (64, 128, 256), (False, True), ("bf16", "fp16"), CASES):
    q, k, v, dout = T.make_inputs(dt, hd, *shape, seed=hd + causal)
    try:
        rep = T.check_grads(dt, q, k, v, dout, causal, deterministic=det, bwd_step=step)
        rows.append(dict(step=step, hd=hd, causal=causal, dtype=dt, shape=shape, det=det, ok=True,
                         **{n: e for n, (e, t) in rep.items()}, **{n + "_tol": t for n, (e, t) in rep.items()}))
    except Exception as e:  # noqa: BLE001
        rows.append(dict(step=step, hd=hd, causal=causal, dtype=dt, shape=shape, det=det, ok=False, error=str(e)[:300]))
        traceback.print_exc(limit=1)
out = os.environ.get("OUT", "/tmp")
Path(out, "bwd_smoke.json").write_text(json.dumps(rows, indent=1))
print(f"{'st':>2} {'hd':>3} {'causal':>6} {'dt':>4} {'shape':>20} {'ok':>3} {'dq/tol':>17} {'dk/tol':>17} {'dv/tol':>17}")
for r in rows:
    if r["ok"]:
        cells = " ".join(f"{r[n]:.1e}/{r[n + '_tol']:.1e}" for n in ("dq", "dk", "dv"))
    else:
        cells = r["error"][:120]
    print(f"{r['step']:>2} {r['hd']:>3} {str(r['causal']):>6} {r['dtype']:>4} {'x'.join(map(str, r['shape'])) + ('d' if r['det'] else ''):>20} "
          f"{'Y' if r['ok'] else 'N':>3} {cells}")
