"""`python -m fa3_lab trace` — pipeline timelines of a kernel step, recorded on the GPU.

The ``FA3_TRACE`` build of the kernels (cuda/include/fa3/trace.h) stamps, for the first few CTAs:
row 0 the producer's TMA issues, row 1 when each K/V tile landed (an idle producer warp watching the
full barriers), rows 2–3 each consumer warpgroup's GEMM0 (Q·Kᵀ), softmax and GEMM1 (P·V) windows.
Stamps are SM cycles (clock64), converted to ns with the CTA's %globaltimer span. This module runs
the traced build, decodes the buffer into events, measures how much of each warpgroup's softmax lies
under the other warpgroup's GEMMs (the pingpong of paper §3.1, Fig. 1), draws a Gantt chart per SM,
and saves everything as JSON (``fa3_lab/results/traces/<gpu>/trace_stepNN.json``) so notebooks draw it
without a GPU.
"""
from __future__ import annotations

from .cli import UsageError

HELP = "record pipeline timelines of a kernel step on the GPU (FA3_TRACE build) and draw them"

ROWS = ("tma_issue", "tma_arrival", "consumer0", "consumer1")
CODES = {1: "tma_issue_k", 2: "tma_issue_v", 3: "arrive_k", 4: "arrive_v", 10: "gemm0_issue", 11: "gemm0_done",
         12: "softmax_begin", 13: "softmax_end", 14: "gemm1_issue", 15: "gemm1_done"}
HEADER = 0xFFFF
WINDOWS = {"gemm0": ("gemm0_issue", "gemm0_done"), "softmax": ("softmax_begin", "softmax_end"),
           "gemm1": ("gemm1_issue", "gemm1_done")}
DEFAULT_SHAPE = "4,8448,16,128"  # paper Table 2
CAPACITY = 1024


def add_arguments(p):
    p.add_argument("--step", required=True, help="kernel step id, e.g. 03")
    p.add_argument("--shape", default=DEFAULT_SHAPE, help=f"batch,seqlen,nheads,headdim (default {DEFAULT_SHAPE})")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--ctas", type=int, default=4, help="how many CTAs record (default 4)")
    p.add_argument("--out", default=None, help="folder for JSON and PNG (default fa3_lab/results/traces/<gpu>/)")


def parse_shape(text):
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--shape: expected batch,seqlen,nheads,headdim integers, got {text!r}") from None
    if len(vals) != 4 or min(vals) < 1 or vals[3] not in (64, 128, 256):
        raise UsageError(f"--shape: expected 4 positive integers with headdim in 64/128/256, got {text!r}")
    return vals


def read_rows(cta_buf, rows=ROWS, codes=CODES):
    """One CTA's records as trace.h writes them, int64 (len(rows), 2·capacity), undecoded in time:
    ``(smid, {row: (start_clk, globaltimer_start, globaltimer_end, [(clk, event, tile)])})`` for the rows that
    recorded (smid None when none did). ``rows``/``codes`` name the rows and event codes (the forward's by default;
    tools/experiments/bwd_trace.py passes the backward's)."""
    import numpy as np

    raw, smid = {}, None
    for r, name in enumerate(rows):
        rec = np.asarray(cta_buf[r]).reshape(-1, 2)
        if rec[0, 1] & 0xFFFFFFFF != HEADER:
            continue
        smid = int(rec[0, 1] >> 32)
        events = [(int(c), codes.get(int(w >> 32), f"code{int(w >> 32)}"), int(w & 0xFFFFFFFF))
                  for c, w in rec[2:] if c != 0]
        raw[name] = (int(rec[0, 0]), int(rec[1, 0]), int(rec[1, 1]), events)
    return smid, raw


def decode(buf, sm_clock_ghz=None):
    """Decode the int64 buffer (ctas, 4, 2·capacity) into a list of CTAs with events in ns.

    Returns [{"cta", "smid", "rows": {row: [(t_ns, event, tile)]}, "span_ns"}]; times are relative to
    the CTA's earliest stamp. Cycles → ns with the CTA's own %globaltimer span unless
    ``sm_clock_ghz`` is given.
    """
    import numpy as np

    buf = np.asarray(buf)
    out = []
    for cta in range(buf.shape[0]):
        rows, ghz = {}, sm_clock_ghz
        smid, raw = read_rows(buf[cta])
        if not raw:
            continue
        if ghz is None:  # calibrate on the longest row: cycles between its first and last stamp vs ns
            spans = [(ev[-1][0] - s, g1 - g0) for s, g0, g1, ev in raw.values() if ev and g1 > g0]
            cyc, ns = max(spans) if spans else (1, 1)
            ghz = cyc / ns if ns > 0 else 1.0
        t0 = min(s for s, *_ in raw.values())
        for name, (s, g0, g1, events) in raw.items():
            rows[name] = [((c - t0) / ghz, ev, tile) for c, ev, tile in events]
        span = max((ev[-1][0] for ev in rows.values() if ev), default=0.0)
        out.append({"cta": cta, "smid": smid, "ghz": ghz, "span_ns": span, "rows": rows})
    return out


def windows(events):
    """[(kind, start_ns, end_ns, tile)] for one consumer row, pairing begin/end events by tile."""
    open_, out = {}, []
    for t, ev, tile in events:
        for kind, (b, e) in WINDOWS.items():
            if ev == b:
                open_[(kind, tile)] = t
            elif ev == e and (kind, tile) in open_:
                out.append((kind, open_.pop((kind, tile)), t, tile))
    return out


def _merge(intervals):
    """Union of intervals as sorted, disjoint (start, end) pairs."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _overlap_len(a, intervals):
    s, e = a
    return sum(max(0.0, min(e, y) - max(s, x)) for x, y in intervals)


def softmax_under_other_gemms(cta):
    """Fraction of each consumer's softmax time that lies under the other consumer's GEMM windows.

    The other warpgroup's GEMM windows (issue → retiring wait; in steps 03/04 two of them are in flight
    at once) are merged into their union first, so time is never counted twice and the fraction is
    ≤ 1. Windows run from issue to the wait that retires them, so this is an upper bound on the
    tensor-core overlap, and exactly the quantity the pingpong schedule is meant to raise.
    """
    w = {r: windows(cta["rows"].get(r, [])) for r in ("consumer0", "consumer1")}
    res = {}
    for me, other in (("consumer0", "consumer1"), ("consumer1", "consumer0")):
        gemms = _merge([(s, e) for k, s, e, _ in w[other] if k in ("gemm0", "gemm1")])
        soft = [(s, e) for k, s, e, _ in w[me] if k == "softmax"]
        total = sum(e - s for s, e in soft)
        res[me] = (sum(_overlap_len(x, gemms) for x in soft) / total) if total > 0 else 0.0
    return res


def summarize(ctas):
    """Mean per-CTA numbers: softmax-under-other-GEMMs fraction, mean window lengths (ns)."""
    import numpy as np

    fr, lens = [], {k: [] for k in WINDOWS}
    for cta in ctas:
        f = softmax_under_other_gemms(cta)
        fr.extend(f.values())
        for r in ("consumer0", "consumer1"):
            for kind, s, e, _ in windows(cta["rows"].get(r, [])):
                lens[kind].append(e - s)
    return {"softmax_under_other_gemms": float(np.mean(fr)) if fr else 0.0,
            **{f"mean_{k}_ns": float(np.median(v)) if v else 0.0 for k, v in lens.items()}}


def plot(ctas, title="", max_ctas=2, window_ns=None):
    """Gantt chart: per SM (CTA), rows TMA issue / arrival / consumer 0 / consumer 1."""
    import matplotlib.pyplot as plt

    colors = {"gemm0": "#4c72b0", "gemm1": "#55a868", "softmax": "#dd8452"}
    shown = ctas[:max_ctas]
    fig, axes = plt.subplots(len(shown), 1, figsize=(12, 2.2 * len(shown)), squeeze=False)
    for ax, cta in zip(axes[:, 0], shown):
        labels = []
        for y, r in enumerate(ROWS):
            labels.append(r)
            ev = cta["rows"].get(r, [])
            if r.startswith("consumer"):
                for kind, s, e, _ in windows(ev):
                    ax.barh(y, e - s, left=s, color=colors[kind], height=0.7)
            else:
                ax.scatter([t for t, _, _ in ev], [y] * len(ev), marker="|", s=120,
                           c=["#937860" if "k" == e[-1] else "#8172b3" for _, e, _ in ev])
        ax.set_yticks(range(len(ROWS)), labels)
        ax.set_title(f"SM {cta['smid']} (CTA {cta['cta']})", fontsize=9, loc="left")
        if window_ns:
            ax.set_xlim(*window_ns)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("ns since the CTA's first stamp")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, ["GEMM0 (Q·Kᵀ)", "GEMM1 (P·V)", "softmax"], loc="upper right", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    return fig


def record(step, batch, seqlen, nheads, headdim, causal=False, ctas=4, capacity=CAPACITY):
    """Run the traced build once (after a warm-up) and return the decoded CTAs. Needs an sm_90 GPU."""
    import torch

    from .. import _build

    ext = _build.load(traced=True)
    q = torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    buf = torch.zeros(ctas, len(ROWS), 2 * capacity, device="cuda", dtype=torch.int64)
    ext.fwd(step, q, k, v, causal, headdim ** -0.5, None, buf, ctas)  # warm-up
    buf.zero_()
    ext.fwd(step, q, k, v, causal, headdim ** -0.5, None, buf, ctas)
    torch.cuda.synchronize()
    return decode(buf.cpu().numpy())


def traced_overhead(step, batch, seqlen, nheads, headdim, causal=False, ctas=4):
    """(ms untraced, ms traced) for the same shape, median of do_bench: the cost of tracing."""
    import torch
    from .. import _build
    from .bench import time_ms

    plain, traced = _build.load(), _build.load(traced=True)
    q = torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    buf = torch.zeros(ctas, len(ROWS), 2 * CAPACITY, device="cuda", dtype=torch.int64)
    s = headdim ** -0.5
    a = time_ms(lambda: plain.fwd(step, q, k, v, causal, s, None, None, 0))
    b = time_ms(lambda: traced.fwd(step, q, k, v, causal, s, None, buf, ctas))
    return float(a), float(b)


def run(args):
    import json
    from pathlib import Path

    from rich.console import Console

    from .. import _env, api
    from . import results

    console = Console()
    try:
        step = int(args.step)
    except ValueError:
        raise UsageError(f"--step: expected a step id like 03, got {args.step!r}") from None
    ids = api.forward_steps16()
    if step not in ids:
        raise UsageError(f"--step: expected one of {ids}, got {args.step}")
    b, s, h, d = parse_shape(args.shape)
    if not 1 <= args.ctas <= 64:
        raise UsageError(f"--ctas: expected 1..64, got {args.ctas}")
    reason = _env.why_no_sm90()
    if reason:  # nothing to record here: point at what was recorded (not an error)
        folder = results.RESULTS_DIR / "traces"
        rel = folder.relative_to(_env.REPO_ROOT) if folder.is_relative_to(_env.REPO_ROOT) else folder
        console.print(f"The kernels cannot run here ({reason}), so nothing is traced. Recorded traces: "
                      f"{rel.as_posix()}/<gpu>/trace_stepNN.json and .png (notebook 04 draws them).", soft_wrap=True)
        found = sorted(folder.glob(f"*/trace_step{step:02d}.json"))
        for p in found:
            doc = json.loads(p.read_text())
            m, sm = doc["meta"], doc.get("summary", {})
            under = sm.get("softmax_under_other_gemms")
            console.print(f"  {rel.as_posix()}/{p.parent.name}/{p.name} (and .png): {m['gpu']}, {m['date'][:10]}, "
                          f"commit {m['commit']}, `{m['command']}`"
                          + (f"; softmax under the other warpgroup's GEMMs {under:.2f}" if under is not None else ""),
                          soft_wrap=True)
        if not found:
            console.print(f"  none of step {step:02d} yet (python -m fa3_lab trace --step {step:02d} on an H100/H200 records one)")
        return 0
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"step {step:02d}: building the traced kernel (minutes the first time) and recording", total=None)
        ctas = record(step, b, s, h, d, args.causal, args.ctas)
        summary = summarize(ctas)
        progress.update(task, description=f"step {step:02d}: timing the traced build against the plain one")
        plain_ms, traced_ms = traced_overhead(step, b, s, h, d, args.causal, args.ctas)
    meta = results.collect_meta(command=f"python -m fa3_lab trace --step {args.step} --shape {args.shape}"
                                        + (" --causal" if args.causal else ""))
    doc = {"meta": meta, "step": step, "shape": {"batch": b, "seqlen": s, "nheads": h, "headdim": d, "causal": args.causal},
           "summary": summary, "overhead": {"untraced_ms": plain_ms, "traced_ms": traced_ms}, "ctas": ctas}
    out_dir = Path(args.out) if args.out else results.RESULTS_DIR / "traces" / results.gpu_slug(meta["gpu"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"trace_step{step:02d}.json"
    path.write_text(json.dumps(doc, indent=1))
    mid = ctas[0]["span_ns"] / 2 if ctas else 0.0
    fig = plot(ctas, window_ns=(mid - 4000, mid + 4000), title=f"step {step:02d}, {args.shape}{' causal' if args.causal else ''} — {meta['gpu']}, "
                           f"{meta['date'][:10]}, commit {meta['commit']}")
    fig.savefig(out_dir / f"trace_step{step:02d}.png", dpi=90)
    console.print(f"step {step:02d}: softmax under the other warpgroup's GEMMs {summary['softmax_under_other_gemms']:.2f}; "
                  f"median windows GEMM0 {summary['mean_gemm0_ns']:.0f} ns, softmax {summary['mean_softmax_ns']:.0f} ns, "
                  f"GEMM1 {summary['mean_gemm1_ns']:.0f} ns; traced build {traced_ms:.3f} ms vs {plain_ms:.3f} ms "
                  f"({100 * (traced_ms / plain_ms - 1):+.1f}%). Saved {path}")
    return 0
