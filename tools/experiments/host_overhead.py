"""The host (CPU) time of one attention call, ours against SDPA-cuDNN: what a launch-bound training step pays.

    python tools/experiments/host_overhead.py [--calls 100] [--rounds 7] [--profile] [--out DIR]

A tiny shape (batch 1, seqlen 128, 8 query heads, 4 KV heads, headdim 128, bf16, causal: the training example's
heads), so the GPU finishes each kernel before the host has launched the next. Per call, in µs, the host's time
(the launching loop alone, before it waits for the GPU) and the total (until the GPU is done; where it is
much above the host's, the GPU set the pace and the host column is only a floor), of the forward alone (no grad) and of the forward + backward (``torch.autograd.grad``), for

* ``fa3_lab``: :func:`fa3_lab.flash_attn_func` (the public entry point, every check; eager: no dispatcher);
* ``op``: ``torch.ops.fa3_lab.flash_attn_fwd`` (the custom op and its autograd, as a compiled graph calls it);
* ``ext``: the extension's ``fwd``/``bwd`` bindings called directly (no autograd: the floor);
* ``sdpa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` under ``CUDNN_ATTENTION``.

``--profile`` adds cProfile's 25 most expensive functions (by own time) of the fa3_lab forward + backward.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None, help="write host_overhead.json here")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fa3_lab
    from fa3_lab import ops, registry
    from fa3_lab.lab import bench, results

    ext = ops._ext()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 128, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 128, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    dout = torch.randn_like(q)
    scale = 128 ** -0.5
    step, bwd_step = registry.DEFAULT_STEP, registry.DEFAULT_BWD_STEP

    def fa3_fwd():
        return fa3_lab.flash_attn_func(q, k, v, causal=True)

    def op_fwd():
        return torch.ops.fa3_lab.flash_attn_fwd(q, k, v, True, scale, step, False, bwd_step)[0]

    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    doutt = dout.transpose(1, 2)

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    def ext_fwd():
        return ext.fwd(step, q.detach(), k.detach(), v.detach(), True, scale, None, None, 0)

    def ext_both():
        out, lse = ext_fwd()
        return ext.bwd(bwd_step, dout, q.detach(), k.detach(), v.detach(), out, lse, True, scale, False, None, 0)

    def both(fwd, inputs, d):
        def run():
            out = fwd()
            return torch.autograd.grad(out, inputs, d)
        return run

    cases = {
        "fa3_lab": (fa3_fwd, both(fa3_fwd, (q, k, v), dout)),
        "op": (op_fwd, both(op_fwd, (q, k, v), dout)),
        "ext": (ext_fwd, ext_both),
        "sdpa": (sdpa_fwd, both(sdpa_fwd, (qt, kt, vt), doutt)),
    }

    def loop(fn, no_grad):
        """(host µs, host + GPU µs) per call of ``fn``: the loop's time before and after it waits for the GPU."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            for _ in range(args.calls):
                fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        return (t1 - t0) / args.calls * 1e6, (t2 - t0) / args.calls * 1e6

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2.0:  # the GPU's clocks up before anything is timed
        a @ a
    for fwd, fb in cases.values():
        for _ in range(20):
            fwd(), fb()
    jobs = {}
    for name, (fwd, fb) in cases.items():
        jobs[(name, "fwd")] = lambda first, fn=fwd: loop(fn, True)
        jobs[(name, "fwd+bwd")] = lambda first, fn=fb: loop(fn, False)
    samples, _ = bench.rotating_rounds(jobs, args.rounds)
    names = list(cases)
    med = {key: tuple(sorted(x[i] for x in v)[len(v) // 2] for i in (0, 1)) for key, v in samples.items()}
    print(f"per call, median of {args.rounds} rounds of {args.calls} calls; host = the launching loop alone")
    print(f"{'impl':8s} {'fwd host µs':>12s} {'fwd total µs':>13s} {'fwd+bwd host µs':>16s} {'fwd+bwd total µs':>17s}")
    for name in names:
        f, b = med[(name, "fwd")], med[(name, "fwd+bwd")]
        print(f"{name:8s} {f[0]:12.1f} {f[1]:13.1f} {b[0]:16.1f} {b[1]:17.1f}")
    if args.out:
        meta = results.collect_meta("python tools/experiments/host_overhead.py " + " ".join(argv or sys.argv[1:]))
        doc = {"meta": meta, "shape": "batch 1, seqlen 128, nheads 8, nheads_kv 4, headdim 128, bf16, causal",
               "calls": args.calls, "rounds": args.rounds,
               "median_us": {f"{n}/{k}": {"host": v[0], "total": v[1]} for (n, k), v in med.items()}}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "host_overhead.json").write_text(json.dumps(doc, indent=1) + "\n")
    if args.profile:
        import cProfile
        import pstats

        run = cases["fa3_lab"][1]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            run()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
