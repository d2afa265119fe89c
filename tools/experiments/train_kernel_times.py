"""Where a training step's GPU time goes: the example's two models (fa3_lab.examples.train), their CUDA kernels
from torch.profiler, attention's kernels apart from the rest.

    python tools/experiments/train_kernel_times.py --steps 5 --out DIR

Builds both models as the example does (same weights), runs ``--warmup`` steps of each, then profiles
``--steps`` steps of each (in turn, on the same batches) and prints, per implementation, the device time per
step of the attention kernels (ours: every kernel of our extension; SDPA: cuDNN's and SDPA's kernels), of
everything else, and the ten longest kernels. ``--out`` writes kernel_times.json.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

#: Substrings (lower case) of the kernel names counted as attention.
ATTENTION = ("step", "fa3", "cudnn", "sdpa", "fmha", "flash", "attn", "preprocess", "postprocess")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fa3_lab import registry
    from fa3_lab.examples import train

    runs = {impl: train.Run(impl, num_hidden_layers=args.layers) for impl in train.IMPLS}
    vocab = runs["sdpa"].model.config.vocab_size
    batches = list(train.synthetic_batches(args.warmup + args.steps, train.BATCH, train.SEQLEN, vocab,
                                           device="cuda"))
    report = {}
    for impl, run in runs.items():
        for toks in batches[:args.warmup]:
            run.step(toks, train.LR)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for toks in batches[args.warmup:]:
                run.step(toks, train.LR)
        kernels = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0 and e.key not in ("ProfilerStep*",):
                kernels[e.key] = kernels.get(e.key, 0) + t / args.steps / 1e3  # ms per step
        attn = {k: v for k, v in kernels.items() if any(s in k.lower() for s in ATTENTION)}
        total = sum(kernels.values())
        report[impl] = {"ms_per_step_total": total, "ms_per_step_attention": sum(attn.values()),
                        "attention_kernels": attn, "top": sorted(kernels.items(), key=lambda kv: -kv[1])[:10],
                        "wall_ms": [t * 1e3 for t in run.times[args.warmup:]]}
    for impl, r in report.items():
        print(f"{impl}: device {r['ms_per_step_total']:.2f} ms/step, attention {r['ms_per_step_attention']:.2f} ms, "
              f"wall {sorted(r['wall_ms'])[len(r['wall_ms']) // 2]:.2f} ms")
        for name, ms in sorted(r["attention_kernels"].items(), key=lambda kv: -kv[1]):
            print(f"   attn {ms:7.3f} ms  {name[:110]}")
        for name, ms in r["top"]:
            print(f"   top  {ms:7.3f} ms  {name[:110]}")
    if args.out:
        from fa3_lab.lab import results

        doc = {"meta": results.collect_meta("python tools/experiments/train_kernel_times.py " + " ".join(argv or sys.argv[1:])),
               "steps": args.steps, "warmup": args.warmup, "layers": args.layers, "bwd_step": registry.DEFAULT_BWD_STEP,
               "runs": report}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernel_times.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
