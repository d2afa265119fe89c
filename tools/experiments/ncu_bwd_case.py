"""One backward call of ours and one of SDPA-cuDNN's per seqlen, for Nsight Compute to profile (GPU only).

Usage (the device; keep the clocks as they are):
    ncu --clock-control none -k regex:"bwd_kernel|bprop" --section SpeedOfLight --section LaunchStats \\
        --section WarpStateStats python tools/experiments/ncu_bwd_case.py [--step N] [--headdim 128] \\
        [--seqlens 2048,8192] [--causal]
The shapes are the bench grid's (batch × seqlen = 16k tokens, bf16). Recorded: tools/experiments/results/nvidia-h200/
c4421d3/ncu18.txt (step 18 against cuDNN at headdim 128, 2k and 8k).
"""
from __future__ import annotations

import argparse
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=int, default=None, help="backward step (default: the default one)")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args(argv)
    import torch

    import fa3_lab
    from fa3_lab import api
    from fa3_lab.lab import bench

    step = args.step or api.default_bwd_step()
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        cfg = next(bench.grid_configs(["bf16"], [args.headdim], [seqlen], [args.causal]))
        q, k, v, dout = (torch.randn(cfg["batch"], seqlen, cfg["nheads"], args.headdim, device="cuda",
                                     dtype=torch.bfloat16) for _ in range(4))
        out, lse = fa3_lab.flash_attn_func(q, k, v, causal=args.causal, return_lse=True)
        torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, args.causal, 1 / math.sqrt(args.headdim), False,
                                         step)
        qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            o_ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal)
        torch.autograd.grad(o_ref, (qt, kt, vt), dout.transpose(1, 2))
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
