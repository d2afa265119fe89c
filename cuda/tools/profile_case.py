"""One forward on the paper grid's shape, for a profiler (ncu/nsys) to look at: our step or the official FA3.

    ncu --section SpeedOfLight -k regex:'fwd_kernel|Flash' --launch-skip 2 --launch-count 1 \\
        python cuda/tools/profile_case.py --impl step04 --headdim 128 --seqlen 8192

Runs the call three times (the profiler skips the first two: module load, caches). Inputs as
``python -m fa3_lab bench`` (16k tokens, hidden 2048, bf16, randn).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="step04", help="step01..step04 or fa3")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args(argv)
    import torch

    import fa3_lab
    from fa3_lab.lab import bench

    cfg = next(bench.grid_configs(["bf16"], [args.headdim], [args.seqlen], [args.causal]))
    q, k, v = (torch.randn(cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["headdim"], device="cuda",
                           dtype=torch.bfloat16) for _ in range(3))
    if args.impl == "fa3":
        fn = bench.peers()["fa3"]
        call = lambda: fn(q, k, v, args.causal)  # noqa: E731
    else:
        step = int(args.impl.removeprefix("step"))
        call = lambda: fa3_lab.flash_attn_func(q, k, v, causal=args.causal, step=step)  # noqa: E731
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    print(args.impl, cfg, "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
