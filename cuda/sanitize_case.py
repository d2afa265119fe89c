"""A small causal GQA case per step, for compute-sanitizer (memcheck, racecheck, synccheck).

Usage: compute-sanitizer --tool racecheck python3 cuda/sanitize_case.py [step ...]
The extension must already be built (cuda/device.sh builds it first), so the sanitizer sees only
the kernels.
"""
import sys

import torch

sys.path.insert(0, ".")
import fa3_lab  # noqa: E402

steps = [int(s) for s in sys.argv[1:]] or [s.id for s in fa3_lab.steps() if "bf16" in s.dtypes]
g = torch.Generator(device="cuda").manual_seed(0)
for step in steps:
    for d in (64, 128, 256):
        q = torch.randn(1, 203, 4, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 333, 2, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 333, 2, d, device="cuda", dtype=torch.bfloat16, generator=g)
        out = fa3_lab.flash_attn_func(q, k, v, causal=True, step=step)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
print("sanitize case done for steps", steps)
