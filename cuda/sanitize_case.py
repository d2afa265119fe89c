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
if 4 in steps:  # step 04's persistent grid: more tiles than SMs, and causal tiles with no key
    case((2, 1200, 16, 128), (2, 600, 4, 128), causals=(False, True), step=4)
    # non-causal headdim 64, persistent (Bc = 192 in the FA3_BLOCK_N_HD64=192 A/B build)
    case((2, 1200, 16, 64), (2, 600, 4, 64), causals=(False,), step=4)
    # causal beyond FA3_DYNAMIC_MAX_SEQLEN keys: one CTA per tile instead of the dynamic scheduler
    case((1, 300, 4, 128), (1, 8300, 2, 128), step=4)
    # headdim 256 with one CTA per tile: O is staged for its TMA store in the K ring (non-causal; causal
    # beyond FA3_DYNAMIC_MAX_SEQLEN keys)
    case((1, 203, 4, 256), (1, 333, 2, 256), causals=(False,), step=4)
    case((1, 200, 2, 256), (1, 8300, 1, 256), step=4)
if fp8:
    for d in (64, 128, 256):
        case((1, 203, 4, d), (1, 333, 2, d))
    # step 05's persistent grid (non-causal, headdim 64/128): more tiles than SMs
    for d in (64, 128):
        case((2, 1100, 12, d), (2, 700, 4, d), causals=(False,))
    steps.append(5)
print("sanitize case done for steps", steps)
