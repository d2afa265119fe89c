"""A small backward case for compute-sanitizer (tools/device.sh bwdsanitize): every
headdim, causal and not, GQA, ragged lengths, deterministic and not.
Usage: python tools/bwd_sanitize_case.py [step]   (default: the default backward step)"""
import math
import sys

import torch

import fa3_lab
from fa3_lab import api

step = int(sys.argv[1]) if len(sys.argv) > 1 else api.default_bwd_step()

for hd in (64, 128, 256):
    for causal in (False, True):
        for det in (False, True):
            g = torch.Generator(device="cuda").manual_seed(hd)
            q = torch.randn(1, 150, 4, hd, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, 130, 2, hd, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, 130, 2, hd, device="cuda", dtype=torch.bfloat16, generator=g)
            out, lse = fa3_lab.flash_attn_func(q, k, v, causal=causal, return_lse=True)
            dq, dk, dv = torch.ops.fa3_lab.flash_attn_bwd(torch.randn_like(q), q, k, v, out, lse, causal,
                                                          1 / math.sqrt(hd), det, step)
torch.cuda.synchronize()
print("sanitize case done")
