"""Where a backward's time goes: the CUDA kernels of one backward call (ours, and SDPA-cuDNN's) with their
device times, from torch.profiler — preprocess, main kernel, postprocess, memsets (the five longest).

    python tools/experiments/bwd_kernel_times.py --step 16 --headdim 128 --seqlens 2048,8192

Inputs as ``python -m fa3_lab bench --backward`` (16k tokens, hidden 2048, bf16, randn); each call runs
five times after two warm-ups and the table gives the mean per call. Prints one table per shape.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def bwd_case(headdim: int, seqlen: int, causal: bool):
    """The bench grid's backward inputs at one shape (bf16, randn, 16k tokens): (cfg, q, k, v, dout, out, lse), BSHD on
    CUDA, out and lse from our forward. Shared by bwd_trace.py and ncu_bwd_case.py."""
    import torch

    import fa3_lab
    from fa3_lab.lab import bench

    cfg = next(bench.grid_configs(["bf16"], [headdim], [seqlen], [causal]))
    q, k, v, dout = (torch.randn(cfg["batch"], seqlen, cfg["nheads"], headdim, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    out, lse = fa3_lab.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    return cfg, q, k, v, dout, out, lse


def cudnn_backward(q, k, v, dout, causal: bool):
    """A callable that runs SDPA-cuDNN's backward for these inputs (its forward once, here)."""
    import torch

    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        o_ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    g = dout.transpose(1, 2)
    return lambda: torch.autograd.grad(o_ref, (qt, kt, vt), g, retain_graph=True)


def kernel_times(fn, reps: int = 5) -> dict[str, float]:
    """{kernel name: mean µs per call} of the CUDA kernels ``fn`` launches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            times[e.key] = times.get(e.key, 0.0) + e.device_time_total / reps
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=int, default=None, help="backward step (default: the default one)")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args(argv)
    import math

    import torch

    import fa3_lab  # noqa: F401 (registers torch.ops.fa3_lab)
    from fa3_lab import api

    step = args.step or api.default_bwd_step()
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        cfg, q, k, v, dout, out, lse = bwd_case(args.headdim, seqlen, args.causal)
        scale = 1 / math.sqrt(args.headdim)
        ours = kernel_times(lambda: torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, args.causal, scale,
                                                                     False, step))
        cudnn = kernel_times(cudnn_backward(q, k, v, dout, args.causal))
        print(f"--- bf16 headdim {args.headdim} seqlen {seqlen} {'causal' if args.causal else 'full'} "
              f"(batch {cfg['batch']}, {cfg['nheads']} heads), µs per backward call")
        for name, times in ((f"step{step}", ours), ("cudnn", cudnn)):
            total = sum(times.values())
            print(f"{name:>8} total {total:9.1f}")
            for k_, t in sorted(times.items(), key=lambda kv: -kv[1])[:5]:
                print(f"{'':>8} {t:9.1f} {100 * t / total:5.1f} %  {k_[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
