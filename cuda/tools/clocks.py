"""SM clock and power while one kernel runs back to back: ours (step 04) against the official FA3.

    python cuda/tools/clocks.py [--headdim 128] [--seqlen 16384] [--seconds 4] [--causal]

Each implementation runs for ``--seconds`` in turn, twice (ours, FA3, ours, FA3: drift in temperature
hits both), while ``nvidia-smi -lms 100`` samples clocks.sm, power.draw and temperature. Prints, per
window, the median SM clock (MHz), power (W), temperature (C) and the TFLOPs/s of the calls in it.
Reads only; changes no clock or power setting.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from regime import smi_start, smi_stop  # noqa: E402  (cuda/tools, the script's own folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args(argv)
    import torch

    import fa3_lab
    from fa3_lab.lab import bench, results

    cfg = next(bench.grid_configs(["bf16"], [args.headdim], [args.seqlen], [args.causal]))
    b, s, h, d = cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["headdim"]
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fa3 = bench.peers()["fa3"]
    impls = {"step04": lambda: fa3_lab.flash_attn_func(q, k, v, causal=args.causal),
             "fa3": lambda: fa3(q, k, v, args.causal)}
    fl = results.flops(b, h, s, s, d, args.causal)
    for fn in impls.values():
        fn()
    torch.cuda.synchronize()
    print(f"shape ({b}, {s}, {h}, {d}) causal={args.causal}")
    print(f"{'impl':<8} {'SM MHz':>7} {'W':>6} {'C':>4} {'TFLOPs/s':>9} {'samples':>8}")
    for name in ("step04", "fa3", "step04", "fa3"):
        fn = impls[name]
        smi = smi_start(100)
        time.sleep(0.3)
        n, t0 = 0, time.time()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        while time.time() - t0 < args.seconds:
            for _ in range(10):
                fn()
            n += 10
            torch.cuda.synchronize()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / n
        med, samples = smi_stop(smi, trim=True)  # the samples at the edges of the window dropped
        print(f"{name:<8} {med[0]:>7.0f} {med[1]:>6.0f} {med[2]:>4.0f} {fl / ms / 1e9:>9.0f} {samples:>8}")
        time.sleep(1.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
