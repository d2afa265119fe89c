"""GQA backward: backward steps side by side on grouped-query shapes (the bench grid has none), with cuDNN.

    python tools/experiments/gqa_bwd.py --steps 20,21 [--rounds 5] [--out DIR]

Shapes (bf16, headdim 128 unless named): the training example's attention (batch 8, seqlen 2048, 8 query heads, 4 KV
heads, causal), Llama-3-8B-like heads (32/8) at 4k and 8k tokens per sequence, causal and not, MQA (8/1) at batch 1
(where step 21 keeps one query head per CTA: too few CTAs otherwise). Per shape: the backward alone (the backward op
on the forward's out and lse) of each step, and SDPA-cuDNN's (``enable_gqa=True``), each a do_bench median, in
rotating rounds; the table gives the median over rounds in ms and the speed relative to the first step
(its ms ÷ this one's).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = [  # (name, batch, seqlen, nheads, nheads_kv, headdim, causal)
    ("train", 8, 2048, 8, 4, 128, True),
    ("32/8 4k causal", 4, 4096, 32, 8, 128, True),
    ("32/8 4k", 4, 4096, 32, 8, 128, False),
    ("32/8 8k causal", 2, 8192, 32, 8, 128, True),
    ("32/8 4k hd64 causal", 4, 4096, 32, 8, 64, True),
    ("mqa 8/1 4k causal", 1, 4096, 8, 1, 128, True),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="20,21")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fa3_lab
    from fa3_lab.lab import bench, results

    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for name, b, s, h, hkv, d, causal in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        dout = torch.randn_like(q)
        out, lse = fa3_lab.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        scale = d ** -0.5
        fns = {f"step{st}": (lambda st=st: torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, causal, scale,
                                                                            False, st)) for st in steps}
        qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ot = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
        dot = dout.transpose(1, 2)
        fns["cudnn"] = lambda: torch.autograd.grad(ot, (qt, kt, vt), dot, retain_graph=True)
        times, _ = bench.rotating_rounds({key: bench.round_timer(fn) for key, fn in fns.items()}, args.rounds)
        med = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
        rows.append({"shape": name, "batch": b, "seqlen": s, "nheads": h, "nheads_kv": hkv, "headdim": d,
                     "causal": causal, "ms": med})
        first = med[f"step{steps[0]}"]
        print(f"{name:22s} " + "  ".join(f"{key} {ms:7.3f} ms ({first / ms:5.3f}x)" for key, ms in med.items()),
              flush=True)
        del q, k, v, dout, out, lse, qt, kt, vt, ot
    if args.out:
        doc = {"meta": results.collect_meta("python tools/experiments/gqa_bwd.py " + " ".join(argv or sys.argv[1:])),
               "rounds": args.rounds, "rows": rows}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gqa_bwd.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
