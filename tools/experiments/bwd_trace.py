"""Where a backward CTA's time goes: the FA3_TRACE build of step 18 stamps every CTA of the main kernel, and this
tool splits each CTA into its prologue (start → K/V landed → first Q_i landed), its m_block loop (per iteration,
and the waits for the ring between iterations), its epilogue (dK, dV stores) and the dQ writer's last add, plus the
gap between one CTA's end and the next CTA's start on the same SM. GPU only.

Usage: python tools/experiments/bwd_trace.py [--step 18] [--headdim 128] [--seqlens 2048,8192] [--causal]
           [--out DIR]
Shapes are the bench grid's (batch × seqlen = 16k tokens, bf16). Stamps are SM cycles (clock64) of one thread
per row (cuda/include/fa3/trace.h, rows: producer, dQ writer, consumer 0, consumer 1); µs use the clock measured
from each CTA's %globaltimer span. Writes DIR/bwd_trace_stepNN.json (default $OUT or /tmp).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from fa3_lab.lab.trace import HEADER, read_rows  # noqa: F401 (HEADER: the record header trace.h writes)

ROWS = ("producer", "dq_writer", "consumer0", "consumer1")
CODES = {20: "issue_kv", 21: "issue_q", 22: "dq_full", 23: "dq_added", 24: "kv_ready", 25: "iter_begin",
         26: "iter_end", 27: "epilogue_end"}
CAPACITY = 2 * 260 + 8  # rows of the longest CTA at 16k: two stamps per m_block (205 at 16k, headdim 128)


def decode(buf):
    """int64 (ctas, 4, 2·capacity) → [{"smid", "start", "end", "ghz", "rows": {row: [(cycle, event, tile)]}}],
    cycles as stamped (one SM's clock64, so CTAs on one SM compare); the records are read by fa3_lab.lab.trace."""
    import numpy as np

    out = []
    for cta in range(buf.shape[0]):
        smid, raw = read_rows(buf[cta], ROWS, CODES)
        if not raw:
            continue
        ends = {name: (ev[-1][0] if ev else start) for name, (start, _, _, ev) in raw.items()}
        ghz = [(ends[name] - start) / (g1 - g0) for name, (start, g0, g1, _) in raw.items()
               if g1 > g0 and ends[name] > start]
        out.append({"cta": cta, "smid": smid, "start": min(start for start, *_ in raw.values()),
                    "end": max(ends.values()), "ghz": float(np.median(ghz)) if ghz else None,
                    "rows": {name: ev for name, (*_, ev) in raw.items()}})
    return out


def phases(cta):
    """Cycles of one CTA's phases, from consumer 0's row and the dQ writer's."""
    c = cta["rows"].get("consumer0", [])
    times = {}
    for t, ev, tile in c:
        times.setdefault(ev, []).append(t)
    begins, ends = times.get("iter_begin", []), times.get("iter_end", [])
    if not begins or not ends or "epilogue_end" not in times:
        return None
    writer = [t for t, ev, _ in cta["rows"].get("dq_writer", []) if ev == "dq_added"]
    iters = [e - b for b, e in zip(begins, ends)]
    waits = [b - e for e, b in zip(ends[:-1], begins[1:])]
    return {"m_blocks": len(begins), "to_kv_ready": times.get("kv_ready", [begins[0]])[0] - cta["start"],
            "to_first_q": begins[0] - cta["start"], "loop": ends[-1] - begins[0], "iter_median": sorted(iters)[len(iters) // 2],
            "ring_waits": sum(waits), "epilogue": times["epilogue_end"][0] - ends[-1],
            "writer_after_epilogue": max(0, (writer[-1] if writer else 0) - times["epilogue_end"][0]),
            "span": cta["end"] - cta["start"]}


def summarize(ctas):
    """Medians over CTAs of each phase (cycles), and the median gap between CTAs on one SM."""
    import numpy as np

    ph = [p for p in map(phases, ctas) if p]
    by_sm = {}
    for c in ctas:
        by_sm.setdefault(c["smid"], []).append(c)
    gaps = []
    for lst in by_sm.values():
        lst.sort(key=lambda c: c["start"])
        gaps += [b["start"] - a["end"] for a, b in zip(lst, lst[1:]) if b["start"] > a["end"]]
    med = {k: float(np.median([p[k] for p in ph])) for k in ph[0]} if ph else {}
    med["gap_between_ctas"] = float(np.median(gaps)) if gaps else float("nan")
    med["ghz"] = float(np.median([c["ghz"] for c in ctas if c["ghz"]]))
    return med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=int, default=18)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args(argv)
    import torch

    from bwd_kernel_times import bwd_case  # this folder
    from fa3_lab import _build
    from fa3_lab.lab import bench, results
    from reference.backward import kernel_tiles

    plain, traced = _build.load(), _build.load(traced=True)
    doc = {"meta": results.collect_meta(command="python tools/experiments/bwd_trace.py " + " ".join(argv or sys.argv[1:])),
           "step": args.step, "headdim": args.headdim, "causal": args.causal, "runs": []}
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        cfg, q, k, v, dout, out, lse = bwd_case(args.headdim, seqlen, args.causal)
        scale = 1 / math.sqrt(args.headdim)
        ctas = cfg["batch"] * cfg["nheads"] * -(-seqlen // kernel_tiles(args.headdim)[1])  # one per n_block (Bc)
        buf = torch.zeros(ctas, len(ROWS), 2 * CAPACITY, device="cuda", dtype=torch.int64)

        def call(ext, trace):
            return ext.bwd(args.step, dout, q, k, v, out, lse, args.causal, scale, False, trace,
                           ctas if trace is not None else 0)
        call(traced, buf)
        buf.zero_()
        call(traced, buf)
        torch.cuda.synchronize()
        decoded = decode(buf.cpu().numpy())
        summ = summarize(decoded)
        ms_plain = float(bench.time_ms(lambda: call(plain, None)))
        ms_traced = float(bench.time_ms(lambda: call(traced, buf)))
        run = {"seqlen": seqlen, "batch": cfg["batch"], "nheads": cfg["nheads"], "ctas": ctas, "recorded": len(decoded),
               "ms_untraced": ms_plain, "ms_traced": ms_traced, "median_cycles": summ}
        doc["runs"].append(run)
        ghz = summ["ghz"]
        print(f"--- step {args.step} bf16 headdim {args.headdim} seqlen {seqlen} {'causal' if args.causal else 'full'}: "
              f"{len(decoded)} of {ctas} CTAs; backward {ms_plain:.3f} ms untraced, {ms_traced:.3f} ms traced; "
              f"{ghz:.2f} GHz")
        for key, val in summ.items():
            if key != "ghz":
                print(f"  {key:<24} {val:10.0f} cycles  {val / ghz / 1000:8.2f} µs")
    path = Path(args.out) / f"bwd_trace_step{args.step:02d}{'_causal' if args.causal else ''}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
