"""A small causal GQA case per step, for compute-sanitizer (memcheck, racecheck, synccheck).

Usage: compute-sanitizer --tool racecheck python3 tools/sanitize_case.py [--step N ...] [--fp8]
Without --step: every 16-bit forward step present. The extension must already be built
(tools/device.sh builds it first), so the sanitizer sees only the kernels.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fa3_lab import api  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--step", type=int, action="append", default=[], help="a 16-bit step id (repeatable)")
ap.add_argument("--fp8", action="store_true", help="step 05 through fa3_lab.flash_attn_fp8_func")
args = ap.parse_args()
steps = args.step or ([] if args.fp8 else api.forward_steps16())
g = torch.Generator(device="cuda").manual_seed(0)


def case(q_shape, kv_shape, causals=(True,), step=None):
    """One call per causal flag on bf16 randn inputs (step 05 when step is None); outputs must be finite."""
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
               for shape in (q_shape, kv_shape, kv_shape))
    for causal in causals:
        out = (fa3_lab.flash_attn_fp8_func(q, k, v, causal=causal) if step is None
               else fa3_lab.flash_attn_func(q, k, v, causal=causal, step=step))
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()


for step in steps:
    for d in (64, 128, 256):
        case((1, 203, 4, d), (1, 333, 2, d), step=step)
    if step >= 6:  # persistent grid (06+): more tiles than SMs, and causal tiles with no key (07+: dynamic)
        case((2, 1200, 16, 128), (2, 600, 4, 128), causals=(False, True), step=step)
        case((2, 1200, 16, 64), (2, 600, 4, 64), causals=(False,), step=step)
    if step >= 7:  # causal beyond kDynamicMaxSeqlen keys: one CTA per tile instead of the dynamic scheduler
        case((1, 300, 4, 128), (1, 8300, 2, 128), step=step)
    if step >= 8:  # headdim 256, one CTA per tile: O staged for its TMA store in the K ring
        case((1, 203, 4, 256), (1, 333, 2, 256), causals=(False,), step=step)
        case((1, 200, 2, 256), (1, 8300, 1, 256), step=step)
if args.fp8:
    for d in (64, 128, 256):
        case((1, 203, 4, d), (1, 333, 2, d))
    for d in (64, 128):  # more tiles than SMs, GQA
        case((2, 1100, 12, d), (2, 700, 4, d), causals=(False,))
    steps.append(5)
print("sanitize case done for steps", steps)
