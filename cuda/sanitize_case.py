"""A small causal GQA case per step, for compute-sanitizer (memcheck, racecheck, synccheck).

Usage: compute-sanitizer --tool racecheck python3 cuda/sanitize_case.py [step ...] [--fp8]
The extension must already be built (cuda/device.sh builds it first), so the sanitizer sees only
the kernels.
"""
import sys

import torch

sys.path.insert(0, ".")
import fa3_lab  # noqa: E402

args = sys.argv[1:]
fp8 = "--fp8" in args  # step 05 through fa3_lab.flash_attn_fp8_func
steps = [int(s) for s in args if s != "--fp8"] or ([] if fp8 else [s.id for s in fa3_lab.steps() if "bf16" in s.dtypes])
g = torch.Generator(device="cuda").manual_seed(0)
for step in steps:
    for d in (64, 128, 256):
        q = torch.randn(1, 203, 4, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 333, 2, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 333, 2, d, device="cuda", dtype=torch.bfloat16, generator=g)
        out = fa3_lab.flash_attn_func(q, k, v, causal=True, step=step)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
if 4 in steps:  # step 04's persistent grid: more tiles than SMs, and causal tiles with no key
    q = torch.randn(2, 1200, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 600, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, 600, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    for causal in (False, True):
        out = fa3_lab.flash_attn_func(q, k, v, causal=causal, step=4)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
    # non-causal headdim 64: Bc = 192, persistent
    q = torch.randn(2, 1200, 16, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 600, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, 600, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    out = fa3_lab.flash_attn_func(q, k, v, causal=False, step=4)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    # causal beyond FA3_DYNAMIC_MAX_SEQLEN keys: one CTA per tile instead of the dynamic scheduler
    q = torch.randn(1, 300, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8300, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8300, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    out = fa3_lab.flash_attn_func(q, k, v, causal=True, step=4)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
if fp8:
    for d in (64, 128, 256):
        q = torch.randn(1, 203, 4, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 333, 2, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 333, 2, d, device="cuda", dtype=torch.bfloat16, generator=g)
        out = fa3_lab.flash_attn_fp8_func(q, k, v, causal=True)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
    # step 05's persistent grid (non-causal, headdim 64/128): more tiles than SMs
    for d in (64, 128):
        q = torch.randn(2, 1100, 12, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(2, 700, 4, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(2, 700, 4, d, device="cuda", dtype=torch.bfloat16, generator=g)
        out = fa3_lab.flash_attn_fp8_func(q, k, v, causal=False)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
    steps.append(5)
print("sanitize case done for steps", steps)
