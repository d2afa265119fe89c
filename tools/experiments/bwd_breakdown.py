"""Where the backward's time goes: per-kernel CUDA time of our backward step and of SDPA's cuDNN backward.

    python tools/experiments/bwd_breakdown.py [--step 11] [--iters 20]

torch.profiler over ``iters`` backward calls (``torch.autograd.grad`` of a saved forward, fixed dout) at a few
paper-grid shapes (bf16, 16k tokens); prints each kernel's mean µs and its share, and the whole backward's
TFLOPs/s (2.5 × forward FLOPs) from the kernel times. A/B tool: nothing in the lab reads its output.
"""
import argparse
import collections
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fa3_lab import api  # noqa: E402
from fa3_lab.lab.results import flops  # noqa: E402

SHAPES = [(128, False, 8192), (128, True, 8192), (128, False, 2048), (64, False, 8192), (256, False, 8192)]


def kernel_times(fn, iters):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name] += e.device_time / iters
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=int, default=11)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    for d, causal, s in SHAPES:
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
        fl = 2.5 * flops(b, h, s, s, d, causal)
        out = api.flash_attn_func(q, k, v, causal=causal, bwd_step=args.step)
        ours = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        dref = dout.transpose(1, 2)
        cudnn = lambda: torch.autograd.grad(ref, (qt, kt, vt), dref, retain_graph=True)  # noqa: E731
        for name, fn in (("ours", ours), ("cudnn", cudnn)):
            t = kernel_times(fn, args.iters)
            total = sum(t.values())
            print(f"hd{d} {'causal' if causal else 'full'} s{s} {name}: {total:8.1f} us  "
                  f"{fl / total / 1e6:6.1f} TFLOPs/s", flush=True)
            for kname, us in list(t.items())[:6]:
                print(f"    {us:8.1f} us {100 * us / total:5.1f}%  {kname[:110]}")
        del q, k, v, out, qt, kt, vt, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
