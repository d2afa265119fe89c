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

    import fa3_lab  # noqa: F401 (registers torch.ops.fa3_lab)
    from bwd_kernel_times import bwd_case, cudnn_backward  # this folder
    from fa3_lab import api

    step = args.step or api.default_bwd_step()
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        _, q, k, v, dout, out, lse = bwd_case(args.headdim, seqlen, args.causal)
        torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, args.causal, 1 / math.sqrt(args.headdim), False,
                                         step)
        cudnn_backward(q, k, v, dout, args.causal)()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
