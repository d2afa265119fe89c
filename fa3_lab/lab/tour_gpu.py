"""The GPU half of `python -m fa3_lab tour`: build, verify and time the kernels on one real layer.

The layer: a Llama-3-8B attention layer at prefill — 32 query heads, 8 KV heads (GQA), headdim 128,
seqlen 4096, bf16, causal, batch 1. Each kernel step is checked against the NumPy float64 reference
(`reference.attention.standard_attention`) with FA3's tolerance rule (max error ≤ 2 × the error of
bf16 standard attention + 1e-3), then timed with the peers (docs/design.md timing protocol). Last, a
Llama-style model built from a config (random weights, no download) runs its prefill with our kernel
through transformers' attention interface and with SDPA (fa3_lab.examples.llama_prefill).
"""
from __future__ import annotations

#: One Llama-3-8B attention layer (GQA 32/8, headdim 128): the layer both halves of the tour use.
LLAMA3_8B = {"nheads": 32, "nheads_kv": 8, "headdim": 128}
SEQLEN = 4096


def run(console) -> int:
    import math

    import numpy as np
    import torch
    from rich.progress import Progress
    from rich.table import Table

    import fa3_lab
    from reference.attention import standard_attention

    from .. import _build, api
    from . import bench
    from ..torch_ref import attention_ref

    gpu = torch.cuda.get_device_name(0)
    m = LLAMA3_8B
    b, s, h, hkv, d = 1, SEQLEN, m["nheads"], m["nheads_kv"], m["headdim"]
    console.print(f"[bold]{gpu}[/]: a Llama-3-8B attention layer ({h} query heads, {hkv} KV heads, headdim {d}), "
                  f"batch {b}, seqlen {s}, bf16, causal.")
    with console.status("building the kernels (first use compiles them; cached afterwards)…"):
        _build.load()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = 1.0 / math.sqrt(d)
    step_ids = api.forward_steps16()

    # float64 NumPy reference, one KV group at a time (S and P of 4 heads: 0.5 GB each)
    qn, kn, vn = (t.float().cpu().numpy() for t in (q, k, v))
    group = h // hkv
    ref = np.empty((b, s, h, d))
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("NumPy float64 reference", total=hkv)
        for j in range(hkv):
            out_j, _ = standard_attention(qn[:, :, j * group:(j + 1) * group], kn[:, :, j:j + 1], vn[:, :, j:j + 1],
                                          causal=True, softmax_scale=scale)
            ref[:, :, j * group:(j + 1) * group] = out_j
            prog.advance(task)
    ref_t = torch.from_numpy(ref).to("cuda", torch.float32)
    emul, _ = attention_ref(q, k, v, True, scale, upcast=False)
    emul_err = (emul.float() - ref_t).abs().max().item()
    tol = 2 * emul_err + 1e-3

    table = Table(title=f"Correctness vs NumPy float64 (tolerance 2 × bf16 standard attention's {emul_err:.2e} + 1e-3)",
                  title_justify="left")
    for col in ("implementation", "max |err|", "mean |err|", "within tolerance"):
        table.add_column(col, justify="left" if col == "implementation" else "right")
    failures = 0
    for st in step_ids:
        out = fa3_lab.flash_attn_func(q, k, v, causal=True, step=st).float()
        err = (out - ref_t).abs()
        ok = err.max().item() <= tol
        failures += not ok
        table.add_row(f"step{st:02d}", f"{err.max().item():.2e}", f"{err.mean().item():.2e}", "yes" if ok else "[red]NO[/]")
    table.add_row("bf16 standard attention", f"{emul_err:.2e}", f"{(emul.float() - ref_t).abs().mean().item():.2e}", "—")
    console.print(table)

    cfg = dict(dtype="bf16", headdim=d, causal=True, batch=b, seqlen=s, nheads=h, nheads_kv=hkv)
    with console.status("timing our steps and the peers (do_bench, median)…"):
        rows = bench.run_grid([cfg], step_ids, with_peers=True)
    console.print(bench.format_table(rows, title=f"{gpu} — TFLOPs/s on this layer, median of do_bench"))
    console.print("Full paper grid: python -m fa3_lab bench (recorded runs: fa3_lab/results/, README, notebook 06).")

    # The kernel inside a model: a Llama-style GQA model through transformers' attention interface.
    from ..examples import llama_prefill

    console.rule("Llama-style model prefill: attn_implementation=\"fa3_lab\" vs \"sdpa\"")
    prefill = llama_prefill.run(console)
    failures += not prefill["ok"]
    if failures:
        console.print(f"[red]{failures} step(s) outside the tolerance[/]")
    return 1 if failures else 0
