"""A small backward case for compute-sanitizer (tools/device.sh bwdsanitize): every
headdim, causal and not, GQA, ragged lengths, deterministic and not."""
import math

import torch

import fa3_lab

for hd in (64, 128, 256):
    for causal in (False, True):
        for det in (False, True):
            g = torch.Generator(device="cuda").manual_seed(hd)
            q = torch.randn(1, 150, 4, hd, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, 130, 2, hd, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, 130, 2, hd, device="cuda", dtype=torch.bfloat16, generator=g)
            out, lse = fa3_lab.flash_attn_func(q, k, v, causal=causal, return_lse=True)
            dq, dk, dv = torch.ops.fa3_lab.flash_attn_bwd(torch.randn_like(q), q, k, v, out, lse, causal,
                                                          1 / math.sqrt(hd), det)
torch.cuda.synchronize()
print("sanitize case done")
