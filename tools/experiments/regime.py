"""Per-call times of ours (the default step, fa3_lab.registry.DEFAULT_STEP), FA3 and cuDNN under two regimes, with the SM clock beside them.

    python tools/experiments/regime.py [--dtypes bf16,fp16] [--seqlens 2048,16384] [--headdim 128] [--calls 40]
                                [--blocks 3] [--out FILE.json]

Why: in the grid (do_bench: an L2 flush before every call) our rounds at headdim 128 non-causal move by up
to 7 % while FA3's agree to 0.1 %, and FA3 measures above its sustained rate where ours measures below it
(docs/archive/notes_sessions_1-7.md, session 6). Here every implementation runs, in blocks rotating over them:
  - ``flush``: ``--calls`` calls, each after zeroing a 256 MB buffer (do_bench's L2 flush), one event pair
    around each call;
  - ``steady``: ``--calls`` calls back to back, an event pair around each.
``nvidia-smi -lms 20`` samples the SM clock and power during each block. Prints per block the median ms, the
first and last five calls' medians, and the median clock; ``--out`` keeps every call's time.
Reads only; changes no clock or power setting.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def smi_start(interval_ms: int):
    """Start sampling SM clock (MHz), power (W) and temperature (C) with ``nvidia-smi -lms``."""
    return subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                             "--format=csv,noheader,nounits", "-lms", str(interval_ms)], stdout=subprocess.PIPE,
                            text=True)


def smi_stop(proc, trim: bool = False):
    """Stop ``smi_start``'s sampler; ([MHz, W, C] medians of its samples, NaN if none; the sample count).
    ``trim`` drops the first three and the last sample (the edges of the window), where there are more."""
    proc.terminate()
    out = proc.communicate()[0]
    rows = [[float(x) for x in line.split(",")] for line in out.strip().splitlines() if line.count(",") == 2]
    if trim:
        rows = rows[3:-1] or rows
    return ([statistics.median(c) for c in zip(*rows)] if rows else [float("nan")] * 3), len(rows)


def _block(fn, calls, flush_buf):
    import torch

    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for a, b in ev:
        if flush_buf is not None:
            flush_buf.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--seqlens", default="2048,16384")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.calls < 10:
        ap.error(f"--calls: expected >= 10 (first and last five calls are reported), got {args.calls}")
    if args.blocks < 1:
        ap.error(f"--blocks: expected >= 1, got {args.blocks}")
    import torch

    import fa3_lab
    from fa3_lab.lab import bench, results

    peers = bench.peers()
    flush_buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    record = []
    print(f"{'dtype':<5} {'seqlen':>6} {'impl':<7} {'regime':<6} {'blk':>3} {'ms':>8} {'first5':>8} {'last5':>8} "
          f"{'TFLOPs':>7} {'MHz':>5} {'W':>4} {'C':>3}")
    for dtype in args.dtypes.split(","):
        for s in (int(x) for x in args.seqlens.split(",")):
            cfg = next(bench.grid_configs([dtype], [args.headdim], [s], [args.causal]))
            b, h, d = cfg["batch"], cfg["nheads"], cfg["headdim"]
            tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=tdt) for _ in range(3))
            impls = {"step10": lambda: fa3_lab.flash_attn_func(q, k, v, causal=args.causal)}
            for name in ("fa3", "cudnn"):
                if name in peers:
                    fn = (lambda f: (lambda: f(q, k, v, args.causal)))(peers[name])
                    try:
                        fn()
                        impls[name] = fn
                    except Exception as e:  # FA3's wheel has no fp16
                        print(f"  {name} skipped at {dtype}: {type(e).__name__}")
            torch.cuda.synchronize()
            fl = results.flops(b, h, s, s, d, args.causal)
            names = list(impls)
            for blk in range(args.blocks):
                for name in names[blk % len(names):] + names[:blk % len(names)]:
                    for regime in ("flush", "steady"):
                        _block(impls[name], 3, None)  # warm
                        smi = smi_start(20)
                        time.sleep(0.1)
                        ms = _block(impls[name], args.calls, flush_buf if regime == "flush" else None)
                        (mhz, watts, temp), _ = smi_stop(smi)
                        med = statistics.median(ms)
                        print(f"{dtype:<5} {s:>6} {name:<7} {regime:<6} {blk:>3} {med:>8.4f} "
                              f"{statistics.median(ms[:5]):>8.4f} {statistics.median(ms[-5:]):>8.4f} "
                              f"{fl / med / 1e9:>7.0f} {mhz:>5.0f} {watts:>4.0f} {temp:>3.0f}")
                        record.append(dict(dtype=dtype, seqlen=s, impl=name, regime=regime, block=blk, ms=ms,
                                           sm_mhz=mhz, power_w=watts, temp_c=temp))
    if args.out:
        meta = results.collect_meta("python tools/experiments/regime.py " + " ".join(argv or sys.argv[1:]))
        Path(args.out).write_text(json.dumps(dict(meta=meta, calls=record)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
