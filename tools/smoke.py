"""Quick device check: every step × dtype × headdim × causal on a few shapes; max error and a timing.

Prints one line per case (error vs a float32 reference, and vs the same-precision emulation) so a
broken descriptor or mask shows at once which configuration it hits. Not a test: tests/test_kernel.py is.
"""
import math
import sys

import torch

sys.path.insert(0, ".")
import fa3_lab  # noqa: E402
from fa3_lab import api  # noqa: E402
from fa3_lab.torch_ref import attention_ref  # noqa: E402

torch.manual_seed(0)
worst = 0
for step in api.forward_steps16():
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128, 256):
            for causal in (False, True):
                for (b, sq, sk, h, hkv) in ((1, 1, 1, 1, 1), (2, 113, 203, 4, 2), (1, 257, 129, 2, 1), (1, 1024, 1024, 2, 2)):
                    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
                    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
                    v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
                    out = torch.full_like(q, float("nan"))
                    try:
                        out, lse = fa3_lab.flash_attn_func(q, k, v, causal=causal, step=step, return_lse=True, out=out)
                        torch.cuda.synchronize()
                    except Exception as e:
                        print(f"step{step:02d} {dtype} d={d} causal={causal} {(b,sq,sk,h,hkv)}: ERROR {e}")
                        sys.exit(1)
                    ref, lse_ref = attention_ref(q, k, v, causal, 1 / math.sqrt(d))
                    emul, _ = attention_ref(q, k, v, causal, 1 / math.sqrt(d), upcast=False)
                    err = (out.float() - ref).abs().max().item()
                    eerr = (emul.float() - ref).abs().max().item()
                    fin = torch.isfinite(lse_ref)
                    lerr = (lse[fin] - lse_ref[fin]).abs().max().item() if fin.any() else 0
                    ok = err <= 2 * eerr + 1e-3
                    worst = max(worst, 0 if ok else 1)
                    if not ok or sq == 1024:
                        print(f"step{step:02d} {str(dtype)[6:]} d={d} causal={causal} {(b,sq,sk,h,hkv)}: err {err:.2e} "
                              f"emul {eerr:.2e} lse {lerr:.1e} {'ok' if ok else 'FAIL'}")
print("smoke:", "all ok" if not worst else "FAILURES")

# timing, Table 2 shape, vs SDPA FA2 / cuDNN / FA3
from fa3_lab.lab.bench import peers, time_ms
from fa3_lab.lab.results import flops  # noqa: E402

for d, causal in ((128, False), (128, True), (64, False), (256, False)):
    s = 8192; b = 16384 // s; h = 2048 // d
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    fl = flops(b, h, s, s, d, causal)
    line = f"d={d} causal={causal} s={s}:"
    for step in api.forward_steps16():
        ms = time_ms(lambda: fa3_lab.flash_attn_func(q, k, v, causal=causal, step=step))
        line += f" step{step:02d} {fl / ms / 1e9:.0f}"
    for name, fn in peers().items():
        if name in ("sdpa_math", "sdpa_efficient"):
            continue
        try:
            ms = time_ms(lambda: fn(q, k, v, causal))
            line += f" {name} {fl / ms / 1e9:.0f}"
        except Exception as e:
            line += f" {name} n/a({type(e).__name__})"
    print(line, "TFLOPs/s")
