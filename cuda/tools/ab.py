"""Interleaved A/B timing of compile-time variants of one kernel step (the A/B runs of cuda/NOTES.md).

Separate runs of one build move by 3–8 % on the device (clocks, temperature), which is as large as the
effects we look for. So this tool builds the extension once per variant (``FA3_LAB_DEFINES``), loads all
builds into one process, and times them in turn on the same inputs, round after round, in a rotating
order: drift then hits every variant alike. The peer (the official FA3, when installed) is timed in the
same rounds.

Writes one results file per variant (and one for the peer) to
``fa3_lab/results/experiments/<gpu-slug>/<name>_<variant>.json``, in the schema of :mod:`fa3_lab.lab.results`
(``ms`` is the median over rounds of do_bench medians; extra row key ``ms_rounds``; the variant's
defines are in ``meta.command``).

Usage (on the GPU machine, repo root)::

    python cuda/tools/ab.py --name ab_overlap --step 4 \\
        --variant new= --variant base="-DFA3_WAIT_AFTER_SOFTMAX=0 -DFA3_STEP04_EARLY_RESCALE=0" \\
        --headdims 64,128,256 --causal both --seqlens 2048,8192 --rounds 3

``--step 5`` times the FP8 kernel (``ext.fwd_fp8``) on inputs quantized once by
:func:`fa3_lab.fp8.quantize_for_kernel`, and FA3's e4m3 forward on e4m3 casts of the same inputs.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fa3_lab import _build, fp8
from fa3_lab.lab import bench, results  # noqa: E402


def parse_variant(text: str) -> tuple[str, str]:
    """``label=-DA=1 -DB=0`` → (label, defines); the defines may be empty (the default build)."""
    label, sep, defines = text.partition("=")
    if not sep or not label or not label.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant: expected LABEL=DEFINES (LABEL letters/digits/_), got {text!r}")
    if any(not d.startswith("-D") for d in defines.split()):
        raise argparse.ArgumentTypeError(f"--variant {label}: expected -DNAME[=VALUE] flags, got {defines!r}")
    return label, defines.strip()


def load_variant(defines: str):
    """Build (or load from the cache) the extension with these extra defines; one module per variant."""
    os.environ["FA3_LAB_DEFINES"] = defines
    try:
        return _build.load.__wrapped__(False)  # bypass load()'s cache: it is keyed on `traced` only
    finally:
        os.environ.pop("FA3_LAB_DEFINES", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="file stem prefix, e.g. ab_overlap")
    ap.add_argument("--step", type=int, default=4)
    ap.add_argument("--variant", type=parse_variant, action="append", required=True,
                    help="LABEL=DEFINES, at least two; the first is the one the ratios are taken for")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--headdims", default="64,128,256")
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--causal", default="both", choices=["both", "true", "false"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="do not time the official FA3")
    args = ap.parse_args(argv)
    if len(args.variant) < 2:
        ap.error("--variant: give at least two")
    import torch

    variants = {label: (defines, load_variant(defines)) for label, defines in args.variant}
    peer = None if args.no_peer else bench.peers().get("fa3")
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    headdims = [int(x) for x in args.headdims.split(",")]
    seqlens = [int(x) for x in args.seqlens.split(",")]
    configs = list(bench.grid_configs([args.dtype], headdims, seqlens, causals))
    labels = list(variants) + (["fa3"] if peer else [])
    rows = {label: [] for label in labels}
    first, second = labels[0], labels[1]
    print(f"{'hd':>4} {'causal':>6} {'seqlen':>6} " + " ".join(f"{lb:>9}" for lb in labels)
          + f"  {first}/{second}" + (f"  {first}/fa3" if peer else ""), flush=True)
    for cfg in configs:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
        b, s, h, d, causal = cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["headdim"], cfg["causal"]
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dt) for _ in range(3))
        scale = 1.0 / math.sqrt(d)
        if args.step == 5:  # FP8: the kernel alone on quantized inputs; FA3's e4m3 forward on e4m3 casts
            t = fp8.quantize_for_kernel(q, k, v)
            fns = {label: (lambda ext=ext: ext.fwd_fp8(t.q8, t.k8, t.vt8, t.q_descale, t.k_descale, t.v_descale,
                                                       fp8.BLOCK_M, fp8.BLOCK_N, causal, scale, None))
                   for label, (_, ext) in variants.items()}
            if peer:
                q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
                fns["fa3"] = lambda: peer(q8, k8, v8, causal)
        else:
            fns = {label: (lambda ext=ext: ext.fwd(args.step, q, k, v, causal, scale, None, None, 0))
                   for label, (_, ext) in variants.items()}
            if peer:
                fns["fa3"] = lambda: peer(q, k, v, causal)
        jobs = {label: bench.round_timer(fns[label], warm_every_round=True) for label in labels}
        times, _ = bench.rotating_rounds(jobs, args.rounds)
        # the variants must agree with the first one (a faster wrong kernel is no result)
        ref_out = fns[first]()[0].float()
        worst = max(float((fns[label]()[0].float() - ref_out).abs().max()) for label in variants)
        if worst > 2e-2:
            raise SystemExit(f"hd{d} causal={causal} seqlen {s}: variants differ from {first} by {worst:.3e}")
        fl = results.flops(b, h, s, s, d, causal)
        tf = {}
        for label, ts in times.items():
            ms = statistics.median(ts)
            tf[label] = fl / ms / 1e9
            rows[label].append({"impl": "fa3" if label == "fa3" else f"step{args.step:02d}",
                                "dtype": "e4m3" if args.step == 5 else cfg["dtype"],
                                "headdim": d, "causal": causal, "batch": b, "seqlen_q": s, "seqlen_k": s,
                                "nheads": h, "nheads_kv": h, "ms": round(ms, 5), "tflops": round(tf[label], 2),
                                "ms_rounds": [round(t, 5) for t in ts]})
        print(f"{d:>4} {str(causal):>6} {s:>6} " + " ".join(f"{tf[lb]:>9.0f}" for lb in labels)
              + f"  {tf[first] / tf[second]:>6.3f}" + (f"  {tf[first] / tf['fa3']:>6.3f}" if peer else "")
              + f"  max|diff| {worst:.1e}",
              flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    command = "python cuda/tools/ab.py " + " ".join(sys.argv[1:] if argv is None else argv)
    root = results.RESULTS_DIR / "experiments"
    for label in labels:
        defines = variants[label][0] if label in variants else ""
        if defines:
            os.environ["FA3_LAB_DEFINES"] = defines
        meta = results.collect_meta(command + (f"  # variant {label}" if label in variants else "  # peer"))
        os.environ.pop("FA3_LAB_DEFINES", None)
        print("saved", results.save(f"{args.name}_{label}", rows[label], meta, root=root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
