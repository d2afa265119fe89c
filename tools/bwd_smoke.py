"""Device smoke of the backward (step 11): one case per (headdim, causal, dtype), a table of max errors vs
FA3's tolerance, JSON to $OUT/bwd_smoke.json. Usage: python tools/bwd_smoke.py"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_backward_kernel as T  # noqa: E402

rows = []
for hd in (64, 128, 256):
    for causal in (False, True):
        for dt in ("bf16", "fp16"):
            for shape in ((2, 113, 203, 4, 2), (1, 1031, 1000, 8, 1)):
                q, k, v, dout = T.make_inputs(dt, hd, *shape, seed=hd + causal)
                try:
                    rep = T.check_grads(dt, q, k, v, dout, causal)
                    rows.append(dict(hd=hd, causal=causal, dtype=dt, shape=shape, ok=True,
                                     **{n: e for n, (e, t) in rep.items()}, **{n + "_tol": t for n, (e, t) in rep.items()}))
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(hd=hd, causal=causal, dtype=dt, shape=shape, ok=False, error=str(e)[:300]))
                    traceback.print_exc(limit=1)
out = os.environ.get("OUT", "/tmp")
Path(out, "bwd_smoke.json").write_text(json.dumps(rows, indent=1))
print(f"{'hd':>3} {'causal':>6} {'dt':>4} {'shape':>20} {'ok':>3} {'dq/tol':>17} {'dk/tol':>17} {'dv/tol':>17}")
for r in rows:
    if r["ok"]:
        cells = " ".join(f"{r[n]:.1e}/{r[n + '_tol']:.1e}" for n in ("dq", "dk", "dv"))
    else:
        cells = r["error"][:120]
    print(f"{r['hd']:>3} {str(r['causal']):>6} {r['dtype']:>4} {'x'.join(map(str, r['shape'])):>20} "
          f"{'Y' if r['ok'] else 'N':>3} {cells}")
