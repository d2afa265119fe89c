"""New default step against a base commit's kernel, same process, rotating rounds; and the step ablation.

    python tools/experiments/grid_vs_base.py --base-cuda /path/to/base/cuda --base-step 4 --new-step 10 \
        --base-commit cfb378a --rounds 3 [--ablation]

The base commit's ``cuda/`` sources (e.g. ``git archive cfb378a cuda``) are built as a second extension
(``fa3_base_<commit>``) and its ``fwd(step, q, k, v, causal, scale, out, None, 0)`` binding is called
directly, as is the current tree's, on the same inputs: the paper grid (batch = 16384 / seqlen, nheads =
2048 / headdim, seqlen 512…16k, headdim 64/128/256, causal and not, bf16 and fp16). Writes
``fa3_lab/results/<gpu>/grid_vs_<commit>.json`` (rows ``step10`` = new, ``step04`` = base, each with
``"build"``) and, with --ablation, ``ablation.json`` (every 16-bit step at the Table 2 shape and a few more).
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from fa3_lab import _build, api  # noqa: E402
from fa3_lab.lab import bench, results  # noqa: E402


def load_base(cuda_dir: Path, step: int, commit: str):
    import torch.utils.cpp_extension as cpp_ext

    src = sorted((cuda_dir / "steps").glob(f"{step:02d}_*.cu"))
    defines = [f"-DFA3_HAS_STEP{step:02d}"]
    build = Path(os.environ.get("FA3_LAB_CACHE", "/tmp/fa3cache")) / f"base_{commit}"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_ext.load(name=f"fa3_base_{commit}", sources=[str(cuda_dir / "binding.cpp"), *map(str, src),
                                                             str(cuda_dir / "fp8_quantize.cu")],
                        extra_include_paths=[str(cuda_dir / "include")], extra_cflags=["-O3", "-std=c++17"] + defines,
                        extra_cuda_cflags=_build.NVCC_FLAGS + defines, build_directory=str(build))


def row(impl, dtype, d, causal, b, s, h, ms, **extra):
    fl = results.flops(b, h, s, s, d, causal)
    return dict(impl=impl, dtype=dtype, headdim=d, causal=causal, batch=b, seqlen_q=s, seqlen_k=s, nheads=h,
                nheads_kv=h, ms=ms, tflops=fl / ms / 1e9, **extra)


def inputs(dtype, b, s, h, d):
    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    return [torch.randn(b, s, h, d, device="cuda", dtype=dt) for _ in range(3)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-cuda", type=Path, required=True)
    ap.add_argument("--base-step", type=int, default=4)
    ap.add_argument("--base-commit", default="cfb378a")
    ap.add_argument("--new-step", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON files here")
    args = ap.parse_args()
    new = _build.load()
    t0 = time.time()
    base = load_base(args.base_cuda, args.base_step, args.base_commit)
    print(f"base extension built in {time.time() - t0:.0f} s", flush=True)
    cmd = "python tools/experiments/grid_vs_base.py " + " ".join(sys.argv[1:])

    def keep(path):  # written at once, and copied to --out at once (a later time limit cannot lose it)
        print("saved", path, flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / path.name).write_text(path.read_text())
    if not args.no_grid:
        rows, ratios = [], []
        try:  # a time limit (SIGINT) keeps the rows measured so far
            for dtype in args.dtypes.split(","):
                for d in (64, 128, 256):
                    for causal in (False, True):
                        for s in map(int, args.seqlens.split(",")):
                            b, h = 16384 // s, 2048 // d
                            q, k, v = inputs(dtype, b, s, h, d)
                            out = torch.empty_like(q)
                            scale = 1 / math.sqrt(d)
                            jobs = {"new": bench.round_timer(lambda: new.fwd(args.new_step, q, k, v, causal, scale, out, None, 0)),
                                    "base": bench.round_timer(lambda: base.fwd(args.base_step, q, k, v, causal, scale, out, None, 0))}
                            vals, _ = bench.rotating_rounds(jobs, args.rounds)
                            ms_new, ms_base = statistics.median(vals["new"]), statistics.median(vals["base"])
                            rows.append(row(f"step{args.new_step:02d}", dtype, d, causal, b, s, h, ms_new, build="new",
                                            ms_rounds=vals["new"]))
                            rows.append(row(f"step{args.base_step:02d}", dtype, d, causal, b, s, h, ms_base,
                                            build=args.base_commit, ms_rounds=vals["base"]))
                            ratios.append(ms_base / ms_new)
                            print(f"{dtype} d{d} {'causal' if causal else 'full  '} {s:6d}: new {rows[-2]['tflops']:6.1f} "
                                  f"base {rows[-1]['tflops']:6.1f} TFLOPs/s  new/base {ratios[-1]:.3f}", flush=True)
                            del q, k, v, out
        except KeyboardInterrupt:
            print(f"GRID interrupted after {len(ratios)} points", flush=True)
        if not ratios:
            return
        print(f"GRID new/base: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}, "
              f"points < 0.97: {sum(r < 0.97 for r in ratios)} of {len(ratios)}", flush=True)
        keep(results.save(f"grid_vs_{args.base_commit}", rows, results.collect_meta(cmd)))
    if args.ablation:
        rows = []
        steps = api.forward_steps16()
        shapes = [("bf16", 128, False, 4, 8448, 16), ("bf16", 128, True, 4, 8448, 16), ("bf16", 64, False, 4, 8448, 32),
                  ("bf16", 256, False, 4, 8448, 8), ("bf16", 128, True, 8, 2048, 16), ("bf16", 256, True, 8, 2048, 8)]
        try:
            for dtype, d, causal, b, s, h in shapes:
                q, k, v = inputs(dtype, b, s, h, d)
                out = torch.empty_like(q)
                scale = 1 / math.sqrt(d)
                jobs = {st: bench.round_timer(lambda st=st: new.fwd(st, q, k, v, causal, scale, out, None, 0)) for st in steps}
                vals, _ = bench.rotating_rounds(jobs, args.rounds)
                line = []
                for st in steps:
                    r = row(f"step{st:02d}", dtype, d, causal, b, s, h, statistics.median(vals[st]), ms_rounds=vals[st])
                    rows.append(r)
                    line.append(f"{st:02d}:{r['tflops']:.0f}")
                print(f"ABL {dtype} d{d} {'causal' if causal else 'full'} ({b},{s},{h},{d}): " + " ".join(line), flush=True)
        except KeyboardInterrupt:
            print(f"ABL interrupted after {len(rows)} rows", flush=True)
        if rows:
            keep(results.save("ablation", rows, results.collect_meta(cmd + " --ablation")))


if __name__ == "__main__":
    main()
