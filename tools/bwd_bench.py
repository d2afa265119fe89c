"""Time step 11's backward (the op alone, given out and lse) beside SDPA's cuDNN backward; bf16, TFLOPs/s with
FLOPs = 2.5 × 4·b·h·sq·sk·d (halved when causal; docs/design.md). Usage: python tools/bwd_bench.py"""
import json
import math
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import fa3_lab

rows = []
for hd, seqlen, causal in ((128, 2048, False), (128, 8192, False), (128, 8192, True), (64, 8192, False),
                           (256, 8192, False)):
    b, h = 16384 // seqlen, 2048 // hd
    q, k, v, do = (torch.randn(b, seqlen, h, hd, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = fa3_lab.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    scale = 1 / math.sqrt(hd)
    ms = do_bench(lambda: torch.ops.fa3_lab.flash_attn_bwd(do, q, k, v, out, lse, causal, scale), return_mode="median")
    flops = 2.5 * 4 * b * h * seqlen * seqlen * hd / (2 if causal else 1)
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        dot = do.transpose(1, 2)
        ms_c = do_bench(lambda: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True), return_mode="median")
    rows.append(dict(headdim=hd, seqlen=seqlen, causal=causal, batch=b, nheads=h, ms=ms, tflops=flops / ms / 1e9,
                     cudnn_ms=ms_c, cudnn_tflops=flops / ms_c / 1e9))
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "bwd_bench.json"), "w") as f:
    json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
print(f"{'hd':>3} {'seqlen':>6} {'causal':>6} {'ours TF/s':>9} {'cuDNN TF/s':>10} {'ratio':>5}")
for r in rows:
    print(f"{r['headdim']:>3} {r['seqlen']:>6} {str(r['causal']):>6} {r['tflops']:9.1f} {r['cudnn_tflops']:10.1f} "
          f"{r['tflops'] / r['cudnn_tflops']:5.2f}")
