"""`python -m fa3_lab.lab.readme [--check]` — regenerate what the README, the docs and the step headers say about
steps and results (the headers' "Measured" paragraphs: :mod:`fa3_lab.lab.headers`).

Everything here is generated, never typed (a test runs ``--check``, which changes nothing and exits 1
when anything is stale):

* README.md, between ``<!-- steps:begin -->`` and ``<!-- steps:end -->``: the step table from
  :mod:`fa3_lab.registry` (a row per step whose kernel file is in the repository, then one line
  naming the steps that are not yet), and the notebooks (chapters) with the steps each covers;
* README.md, between ``<!-- results:begin -->`` and ``<!-- results:end -->``: the current run of the
  newest GPU (one commit, one protocol, said once), a Figure-5-style picture of our fastest step
  against FA3, cuDNN and FlashAttention-2, a short table, and sentences computed from the data;
* ``docs/img/fig5_<gpu>_<commit>.png``: that picture (the name ties it to its run);
* with a backward grid (``bench_backward.json``): the paper's Figure 6 redone, ``docs/img/fig6_<gpu>_<commit>.png``
  (our backward step against cuDNN and FlashAttention-2), its short table and sentences; with a backward ablation
  (``ablation_backward.json``): a sentence per shape, step 11 → 12 → … and the deterministic mode;
* ``docs/results.md``: every current run of every GPU in full (grid, ablation, FP8, backward).

A GPU folder of ``fa3_lab/results/`` holds one run (one commit; :func:`fa3_lab.lab.results.current_runs`
refuses more); older runs live in ``tools/experiments/results/`` and are never shown here. Step ids
come from the run itself, so a run of any set of steps renders: "the best step" is the fastest
``stepNN`` row at each point (a ``stepNN_det`` row, a step's deterministic mode, never is).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from fa3_lab import _env, registry
from fa3_lab.lab import headers, results

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
STEPS_BEGIN = "<!-- steps:begin -->"
STEPS_END = "<!-- steps:end -->"
README = _env.REPO_ROOT / "README.md"
RESULTS_MD = _env.REPO_ROOT / "docs" / "results.md"
IMG_DIR = _env.REPO_ROOT / "docs" / "img"

NO_RESULTS = ("No GPU results are recorded yet: `fa3_lab/results/` holds no run. "
              "They appear here once a run on an H100 or H200 is recorded there.")

#: What a "—" cell means, said once under every table that has one.
DASH = ("**—** = no measurement in this run: that implementation raised on that configuration and was "
        "skipped (the bench prints why), or was not run there")


# ------------------------------------------------------------------------------------- tables

_PASS_ORDER = tuple(results.PASSES)   # fwd, bwd, fwd_bwd


def _pass_index(pass_: str) -> int:
    """The index of ``pass_`` in :data:`_PASS_ORDER` (the last element of a :func:`_cells` key).

    Raises:
        ValueError: ``pass_`` not in :data:`results.PASSES`.
    """
    if pass_ not in _PASS_ORDER:
        raise ValueError(f"pass_: expected one of {', '.join(_PASS_ORDER)}, got {pass_!r}")
    return _PASS_ORDER.index(pass_)


def _cells(run: results.Run) -> dict[tuple, dict[str, float]]:
    """(dtype index, headdim, causal, sq, sk, batch, nheads, nheads_kv, pass index) -> {impl: median TFLOPs/s}."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for row in run.rows:
        key = (results.DTYPES.index(row["dtype"]), row["headdim"], row["causal"], row["seqlen_q"],
               row["seqlen_k"], row["batch"], row["nheads"], row["nheads_kv"],
               _PASS_ORDER.index(row.get("pass", "fwd")))
        cells.setdefault(key, {}).setdefault(row["impl"], []).append(float(row["tflops"]))
    return {key: {impl: statistics.median(v) for impl, v in by_impl.items()} for key, by_impl in cells.items()}


def _shape_cells(key, with_pass: bool = False) -> list[str]:
    dtype_i, headdim, causal, sq, sk, batch, nheads, nheads_kv, pass_i = key
    heads = results.heads_label(nheads, nheads_kv)
    return ([_PASS_ORDER[pass_i]] if with_pass else []) + [
        results.DTYPES[dtype_i], str(headdim), "causal" if causal else "full",
        str(sq) if sq == sk else f"{sq}→{sk}", f"{batch}×{heads}"]


def _best_step(tf: dict[str, float]):
    """(TFLOPs/s, impl) of our fastest step in one cell, or (None, None); only :data:`results.STEP_IMPLS` count
    (a deterministic mode ``stepNN_det`` is not a step of its own)."""
    ours = [(tf[s], s) for s in results.STEP_IMPLS if s in tf]
    return max(ours) if ours else (None, None)


def pivot(run: results.Run) -> tuple[list[str], list[list[str]]]:
    """One run's rows as a table: (header, rows of strings).

    Columns: dtype, headdim, mask, seqlen (``sq`` or ``sq→sk``), batch×heads (kv heads when
    GQA), TFLOPs/s of each impl present (in :data:`results.IMPLS` order; median of duplicate rows),
    ``best step`` (the fastest of ours), then ``best/<peer>`` for each peer present.
    Cells with no measurement are "—". A run with backward rows gets a first column ``pass``
    (fwd, bwd, fwd_bwd; backward TFLOPs/s count 2.5 × the forward FLOPs, :data:`results.PASSES`).
    """
    cells = _cells(run)
    present = {impl for by_impl in cells.values() for impl in by_impl}
    impls = [i for i in results.IMPLS if i in present]
    steps = [i for i in results.STEP_IMPLS if i in present]
    peers = [i for i in results.PEER_IMPLS if i in present]
    with_pass = any(key[-1] for key in cells)   # a backward run: say which pass each row times

    header = (["pass"] if with_pass else []) + ["dtype", "headdim", "mask", "seqlen", "batch×heads"] + impls
    if steps:
        header += ["best step"] + [f"best/{p}" for p in peers]
    table = []
    for key in sorted(cells):
        tf = cells[key]
        line = _shape_cells(key, with_pass) + [f"{tf[i]:.1f}" if i in tf else "—" for i in impls]
        if steps:
            best, best_step = _best_step(tf)
            if best is None:
                line += ["—"] * (1 + len(peers))
            else:
                line.append(f"{best_step} ({best:.1f})")
                line += [f"{best / tf[p]:.2f}×" if p in tf else "—" for p in peers]
        table.append(line)
    return header, table


#: Peers the compact view (the tour, the README) shows: FA3, cuDNN, FlashAttention-2.
MAIN_PEERS = ("fa3", "cudnn", "sdpa_flash")


def compact(run: results.Run, dtypes=None, passes=None) -> tuple[list[str], list[list[str]]]:
    """A narrow view of one run: the longest seqlen of each (dtype, headdim, mask, pass).

    Columns: dtype, hdim, mask, seqlen, ours ("TFLOPs/s stepNN", our best step; never a ``stepNN_det``), then each
    of :data:`MAIN_PEERS` present as "TFLOPs/s best/peer×"; a first column ``pass`` when the rows shown have more
    than one pass. ``dtypes``: only these (default all); ``passes``: only these of :data:`results.PASSES`
    (default all; e.g. ``("bwd",)`` for the backward alone).
    """
    cells = _cells(run)
    if dtypes is not None:
        cells = {k: v for k, v in cells.items() if results.DTYPES[k[0]] in dtypes}
    if passes is not None:
        cells = {k: v for k, v in cells.items() if _PASS_ORDER[k[-1]] in passes}
    longest: dict[tuple, tuple] = {}
    for key in cells:
        group = key[:3] + key[-1:]
        if group not in longest or (key[3], key[4]) > (longest[group][3], longest[group][4]):
            longest[group] = key
    present = {impl for by_impl in cells.values() for impl in by_impl}
    peers = [p for p in MAIN_PEERS if p in present]
    with_pass = len({k[-1] for k in cells}) > 1
    header = (["pass"] if with_pass else []) + ["dtype", "hdim", "mask", "seqlen", "ours"] + peers
    table = []
    for key in sorted(longest.values(), key=lambda k: (k[-1],) + k[:-1] if with_pass else k):
        tf = cells[key]
        best, best_step = _best_step(tf)
        line = _shape_cells(key, with_pass)[:4 + with_pass] + ["—" if best is None else f"{best:.0f} {best_step}"]
        for p in peers:
            if p not in tf:
                line.append("—")
            elif best is None:
                line.append(f"{tf[p]:.0f}")
            else:
                line.append(f"{tf[p]:.0f} {best / tf[p]:.2f}×")
        table.append(line)
    return header, table


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _rel(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(_env.REPO_ROOT).as_posix()
    except ValueError:  # a results folder outside the repo (tests)
        return Path(Path(path).parent.name, Path(path).name).as_posix()


def _protocol(runs: list[results.Run]) -> str:
    rounds = {len(r["ms_rounds"]) for run in runs for r in run.rows if "ms_rounds" in r}
    counts = (str(min(rounds)) if len(rounds) == 1 else f"{min(rounds)}–{max(rounds)}") if rounds else ""
    timing = (f"median of {counts} rounds (each file's `--rounds`) of `triton.testing.do_bench` in rotating order "
              f"(`ms_rounds` in the JSON)" if rounds else "median of `triton.testing.do_bench` timings")
    peers = any(not r["impl"].startswith("step") for run in runs for r in run.rows)
    return (f"TFLOPs/s = `fa3_lab.lab.results.flops` (exact visible pairs when causal) ÷ time, {timing}"
            + ("; ratios = our fastest step ÷ that peer, same run, same inputs" if peers else
               "; this run timed our steps only, no peers (FA3, cuDNN, FA2): `python -m fa3_lab bench` times them"))


def run_line(runs: list[results.Run]) -> str:
    """One sentence for the current run of one GPU (its files share one commit): GPU, date, commit,
    versions, the files and the commands that made them, and the timing protocol — said once."""
    m = runs[-1].meta
    dates = sorted(r.meta["date"][:10] for r in runs)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}"
    files = ", ".join(f"`{_rel(r.path)}` (`{r.meta['command'].strip()}`)" for r in runs)
    return (f"Current run on **{m['gpu']}** ({m['sm_count']} SMs), commit `{m['commit']}`, {when}; "
            f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}. Files: {files}. {_protocol(runs)}.")


_KIND_BY_NAME = {"bench": "grid", "ablation": "ablation", "bench_fp8": "fp8", "bench_backward": "backward",
                 "ablation_backward": "backward_ablation"}


def _kind(run: results.Run) -> str:
    """"grid", "ablation", "fp8", "backward" or "backward_ablation": by file name (``bench``, ``ablation``,
    ``bench_fp8``, ``bench_backward``, ``ablation_backward``), else by content (rows with a backward ``pass``:
    backward; e4m3 rows: fp8; step rows at several configurations: grid; otherwise ablation)."""
    name = run.path.stem if run.path is not None else ""
    if name in _KIND_BY_NAME:
        return _KIND_BY_NAME[name]
    if any(row.get("pass", "fwd") != "fwd" for row in run.rows):
        return "backward"
    if any(row["dtype"] == "e4m3" for row in run.rows):
        return "fp8"
    keys = {(row["headdim"], row["causal"], row["seqlen_q"]) for row in run.rows if row["impl"] in results.STEP_IMPLS}
    return "grid" if len(keys) > 1 else "ablation"


def grid_runs(runs):
    """The runs of the paper's Figure 5 grid (``bench.json``)."""
    return [r for r in runs if _kind(r) == "grid"]


def ablation_runs(runs):
    return [r for r in runs if _kind(r) == "ablation"]


def fp8_runs(runs):
    return [r for r in runs if _kind(r) == "fp8"]


def backward_runs(runs):
    """The backward grids (``bench_backward.json``; not the backward ablation)."""
    return [r for r in runs if _kind(r) == "backward"]


def backward_ablation_runs(runs):
    """The backward ablations (``ablation_backward.json``: the backward steps at a few shapes)."""
    return [r for r in runs if _kind(r) == "backward_ablation"]


def _fmt_range(xs) -> str:
    return f"median {statistics.median(xs):.2f}×, range {min(xs):.2f}–{max(xs):.2f}×"


def grid_sentences(run: results.Run, dtype: str = "bf16", pass_: str = "fwd") -> list[str]:
    """Sentences stating the grid's results (of one ``pass``), computed from the run (never typed)."""
    cells = {k: v for k, v in _cells(run).items()
             if results.DTYPES[k[0]] == dtype and _PASS_ORDER[k[-1]] == pass_}
    if not cells:
        return []
    wins: dict[str, int] = {}
    ratios: dict[str, list[float]] = {}
    for tf in cells.values():
        best, step = _best_step(tf)
        if best is None:
            continue
        wins[step] = wins.get(step, 0) + 1
        for p in MAIN_PEERS:
            if p in tf:
                ratios.setdefault(p, []).append(best / tf[p])
    n = sum(wins.values())
    if not n:
        return []
    what = {"fwd": "", "bwd": "backward, ", "fwd_bwd": "forward + backward, "}[pass_]
    order = sorted(wins.items(), key=lambda kv: (-kv[1], kv[0]))
    out = [f"Fastest of our steps, {what}{dtype} grid ({n} points): "
           + ", ".join(f"{s} at {c}" for s, c in order) + "."]
    names = {"fa3": "FA3", "cudnn": "cuDNN", "sdpa_flash": "FlashAttention-2 (SDPA)"}
    out += [f"Our fastest step ÷ {names[p]}, {what}{dtype}, {len(x)} points: {_fmt_range(x)}."
            for p, x in ratios.items()]
    return out


def ablation_sentence(run: results.Run, dtype: str = "bf16") -> str | None:
    """"At the Table 2 shape (…): step01 … → stepNN … TFLOPs/s; FA3 …; the paper (H100 SXM5): …"."""
    from fa3_lab.lab.bench import PAPER_ABLATION_TFLOPS

    rows = [r for r in run.rows if r["dtype"] == dtype]
    if not rows:
        return None
    r0 = rows[0]
    tf = {r["impl"]: r["tflops"] for r in rows}
    steps = [s for s in results.STEP_IMPLS if s in tf]
    peers = [p for p in MAIN_PEERS if p in tf]
    paper = [s for s in steps if s in PAPER_ABLATION_TFLOPS]
    text = (f"Table 2 shape ({dtype}, batch {r0['batch']}, seqlen {r0['seqlen_q']}, {r0['nheads']} heads, "
            f"headdim {r0['headdim']}, {'causal' if r0['causal'] else 'no mask'}): "
            + " → ".join(f"{s} {tf[s]:.0f}" for s in steps) + " TFLOPs/s")
    if peers:
        text += "; " + ", ".join(f"{p} {tf[p]:.0f}" for p in peers)
    if paper and dtype == "fp16":  # the paper's Table 2 is FP16: set beside our fp16 only
        text += ("; the paper's (H100 SXM5, FP16): " + " → ".join(f"{s} {PAPER_ABLATION_TFLOPS[s]}" for s in paper))
    return text + "."


_PEER_NAMES = {"fa3": "FA3", "cudnn": "cuDNN", "sdpa_flash": "FA2"}


def _pct(x: float) -> str:
    """A signed percentage with a true minus sign: -0.0423 -> "−4.2 %"."""
    return f"{'−' if x < 0 else '+'}{abs(x) * 100:.1f} %"


def backward_ablation_sentences(run: results.Run, dtype: str = "bf16", pass_: str = "bwd") -> list[str]:
    """One sentence per shape of a backward ablation (``ablation_backward.json``), computed from its rows.

    "Backward ablation (bf16, batch 2, seqlen 8192, 16 heads, headdim 128, no mask, bwd pass): step11 X → step12 Y
    → step13 Z → step14 W TFLOPs/s; deterministic step13: V (−p %); cuDNN C, FA2 F." — the steps in registry order
    (those the shape has), each ``stepNN_det`` against its own step, the peers of :data:`MAIN_PEERS` present. Median
    of repeated rows (:func:`pivot`'s cells). Shapes without a step row are left out; [] when none has one.

    Raises:
        ValueError: ``pass_`` not in :data:`results.PASSES`.
    """
    pass_i = _pass_index(pass_)
    out = []
    for key, tf in sorted(_cells(run).items()):
        if results.DTYPES[key[0]] != dtype or key[-1] != pass_i:
            continue
        steps = [s for s in results.STEP_IMPLS if s in tf]
        if not steps:
            continue
        _, headdim, causal, sq, sk, batch, nheads, nheads_kv, _ = key
        heads = results.heads_label(nheads, nheads_kv)
        text = (f"Backward ablation ({dtype}, batch {batch}, seqlen {sq if sq == sk else f'{sq}→{sk}'}, {heads} heads, "
                f"headdim {headdim}, {'causal' if causal else 'no mask'}, {pass_} pass): "
                + " → ".join(f"{s} {tf[s]:.0f}" for s in steps) + " TFLOPs/s")
        dets = []
        for d in (d for d in results.DET_IMPLS if d in tf):
            base = results.base_step(d)
            dets.append(f"deterministic {base}: {tf[d]:.0f}" + (f" ({_pct(tf[d] / tf[base] - 1)})" if base in tf else ""))
        if dets:
            text += "; " + ", ".join(dets)
        peers = [f"{_PEER_NAMES[p]} {tf[p]:.0f}" for p in MAIN_PEERS if p in tf]
        if peers:
            text += "; " + ", ".join(peers)
        out.append(text + ".")
    return out


def backward_ablation_table(run: results.Run, dtype: str = "bf16", pass_: str = "bwd"):
    """The backward ablation as the paper's Table 2 is laid out, one row per step: (header, rows of strings).

    Columns: ``step``, then one per shape of the run (headdim, seqlen, mask; e.g. ``128 8k causal``), sorted by
    headdim, mask and seqlen; rows: the steps in registry order, each deterministic mode (``stepNN_det``) after the
    steps, then cuDNN and FA2 where timed. Cells: median TFLOPs/s of ``dtype`` and ``pass_``, "—" where not timed.
    ([], []) when the run has no step row of that dtype and pass.

    Raises:
        ValueError: ``pass_`` not in :data:`results.PASSES`.
    """
    pass_i = _pass_index(pass_)
    cells = {k: v for k, v in _cells(run).items() if results.DTYPES[k[0]] == dtype and k[-1] == pass_i}
    keys = sorted(cells, key=lambda k: (k[1], k[2], k[3], k[4]))
    present = {impl for k in keys for impl in cells[k]}
    impls = ([i for i in results.STEP_IMPLS if i in present] + [i for i in results.DET_IMPLS if i in present]
             + [p for p in MAIN_PEERS if p in present])
    if not any(i in results.STEP_IMPLS for i in impls):
        return [], []
    header = ["step"] + [f"{k[1]} {results.seqlen_label(k[3])}{' causal' if k[2] else ''}" for k in keys]
    rows = []
    for impl in impls:
        label = (f"{results.base_step(impl)} deterministic" if impl in results.DET_IMPLS else
                 _PEER_NAMES.get(impl, impl))
        rows.append([label] + [f"{cells[k][impl]:.0f}" if impl in cells[k] else "—" for k in keys])
    return header, rows


def backward_by_headdim_sentences(run: results.Run, pass_: str = "bwd", min_seqlen: int = 2048) -> list[str]:
    """Per headdim, our fastest step ÷ cuDNN and ÷ FA2 over every dtype and mask at seqlen ≥ ``min_seqlen`` (the
    backward's acceptance lines, issue 22): "Backward alone, seqlen ≥ 2k, bf16 and fp16, causal and not, ÷ cuDNN:
    headdim 64 a–b× (n of m points ≥ 1.00×), …; ÷ FA2: …". [] when the run has no such cell with a peer.

    Raises:
        ValueError: ``pass_`` not in :data:`results.PASSES`.
    """
    pass_i = _pass_index(pass_)
    ratios: dict[str, dict[int, list[float]]] = {}
    dtypes = set()
    for key, tf in _cells(run).items():
        if key[-1] != pass_i or key[3] < min_seqlen:
            continue
        best, _ = _best_step(tf)
        if best is None:
            continue
        for p in ("cudnn", "sdpa_flash"):
            if p in tf:
                ratios.setdefault(p, {}).setdefault(key[1], []).append(best / tf[p])
                dtypes.add(results.DTYPES[key[0]])
    if not ratios:
        return []
    what = {"fwd": "Forward", "bwd": "Backward alone", "fwd_bwd": "Forward + backward"}[pass_]
    parts = []
    for p in ("cudnn", "sdpa_flash"):
        if p in ratios:
            parts.append(f"÷ {_PEER_NAMES[p]}: " + ", ".join(
                f"headdim {d} {min(x):.2f}–{max(x):.2f}× ({sum(v >= 1.0 for v in x)} of {len(x)} points ≥ 1.00×)"
                if p == "cudnn" else f"headdim {d} {min(x):.2f}–{max(x):.2f}×"
                for d, x in sorted(ratios[p].items())))
    return [f"{what}, seqlen ≥ {results.seqlen_label(min_seqlen)}, {' and '.join(sorted(dtypes))}, causal and not, "
            f"our fastest step " + "; ".join(parts) + "."]


def fp8_sentence(run: results.Run) -> str | None:
    """Step 05 (kernel alone) against FA3's e4m3 forward, from a ``bench --fp8`` run."""
    rows = [r for r in run.rows if r["dtype"] == "e4m3"]
    fp8_steps = [s.marker for s in registry.STEPS if "e4m3" in s.dtypes]
    ours = {(r["headdim"], r["causal"], r["seqlen_q"]): r["tflops"] for r in rows if r["impl"] in fp8_steps}
    fa3 = {(r["headdim"], r["causal"], r["seqlen_q"]): r["tflops"] for r in rows if r["impl"] == "fa3"}
    both = [ours[k] / fa3[k] for k in ours if k in fa3]
    if not ours:
        return None
    text = f"FP8 e4m3 ({len(ours)} points): our step {min(ours.values()):.0f}–{max(ours.values()):.0f} TFLOPs/s"
    if both:
        text += f"; ÷ FA3's e4m3 forward: {_fmt_range(both)}"
    return text + "."


def dash_note(run: results.Run) -> str | None:
    """:data:`DASH` plus, from the data, which implementations lack which rows; None without gaps."""
    cells = _cells(run)
    present = {impl for by_impl in cells.values() for impl in by_impl}
    gaps = []
    for impl in [i for i in results.IMPLS if i in present]:
        missing = [k for k, tf in cells.items() if impl not in tf]
        if not missing:
            continue
        dts = sorted({results.DTYPES[k[0]] for k in missing})
        if all(not any(impl in tf for k2, tf in cells.items() if k2[0] == results.DTYPES.index(d)) for d in dts):
            gaps.append(f"{impl}: no {'/'.join(dts)} rows")
        else:
            seqs = sorted({k[3] for k in missing})
            gaps.append(f"{impl}: {len(missing)} of {len(cells)} points (seqlen {', '.join(map(str, seqs))})")
    if not gaps:
        return None
    return f"{DASH}. In this run: " + "; ".join(gaps) + "."


# ------------------------------------------------------------------------------------ figure

#: The figures' file name prefixes: the paper's Figure 5 (forward grid) and Figure 6 (backward grid).
FIG_PREFIX = {"grid": "fig5", "backward": "fig6"}


def figure_path(run: results.Run) -> Path:
    """The README's picture of ``run``: ``docs/img/fig5_<gpu-slug>_<commit>.png`` for a forward grid (or any run not
    a backward grid), ``docs/img/fig6_<gpu-slug>_<commit>.png`` for a backward grid (``bench_backward.json``)."""
    prefix = FIG_PREFIX.get(_kind(run), "fig5")
    return IMG_DIR / f"{prefix}_{results.gpu_slug(run.meta['gpu'])}_{run.meta['commit']}.png"


def _fig_dtype(run: results.Run, pass_: str | None = None) -> str:
    have = {r["dtype"] for r in run.rows if pass_ is None or r.get("pass", "fwd") == pass_}
    return "bf16" if "bf16" in have else sorted(have)[0]


def write_figure(run: results.Run, path: Path) -> Path:
    """Draw ``run``'s picture into ``path`` (PNG, 80 dpi, no timestamp, so the same data gives the same bytes):
    :func:`fa3_lab.lab.plots.plot_backward` (the "bwd" pass) for a backward grid, else
    :func:`fa3_lab.lab.plots.plot_fig5`; bf16 when the run has it. Returns ``path``.

    Raises:
        ValueError: as the plot functions (e.g. a run without step rows, or without "bwd" rows for a backward grid).
    """
    import matplotlib.pyplot as plt

    from fa3_lab.lab import plots

    if _kind(run) == "backward":
        fig = plots.plot_backward(run, _fig_dtype(run, "bwd"), "bwd")
    else:
        fig = plots.plot_fig5(run, _fig_dtype(run))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ render

def render(runs_by_gpu: dict[str, list[results.Run]], img_base: str = "docs/img") -> str:
    """The README's results block (without the markers), ending in a newline: the newest GPU's run."""
    if not runs_by_gpu:
        return NO_RESULTS + "\n"
    slug, runs = next(iter(runs_by_gpu.items()))
    parts = [run_line(runs), ""]
    grids = grid_runs(runs)
    if grids:
        grid = grids[-1]
        dtype = _fig_dtype(grid)
        has_peers = any(not r["impl"].startswith("step") for r in grid.rows)
        against = "against FA3, cuDNN and FlashAttention-2" if has_peers else "(this run timed no peers)"
        parts += [f"![Figure 5 of the paper, redone: forward TFLOPs/s of our fastest step {against}, {dtype}, "
                  f"{grid.meta['gpu']}, commit {grid.meta['commit']}]({img_base}/{figure_path(grid).name})", ""]
        header, rows = compact(grid)
        parts += ["Longest sequence of each configuration (TFLOPs/s"
                  + ("; × = our fastest step ÷ that peer):" if has_peers else "):"), "",
                  _markdown(header, rows), ""]
        parts += [f"- {s}" for s in grid_sentences(grid)]
    for r in ablation_runs(runs):
        parts += [f"- {s}" for d in ("fp16", "bf16") if (s := ablation_sentence(r, d))]
    for r in fp8_runs(runs):
        s = fp8_sentence(r)
        if s:
            parts.append(f"- {s}")
    bwds = backward_runs(runs)
    for r in bwds:
        parts += ["", *_backward_block(r, img_base)]
    for r in backward_ablation_runs(runs):
        header, rows = backward_ablation_table(r, "bf16", "bwd")
        if rows:
            r0 = next(row for row in r.rows if row["impl"] in results.STEP_IMPLS)
            parts += ["", "Backward ablation, the paper's Table 2 for the backward: the backward alone (FLOPs 2.5 × "
                      f"forward), bf16, TFLOPs/s, every backward step at each shape (batch × seqlen = "
                      f"{r0['batch'] * r0['seqlen_q']} tokens, headdim × heads = {r0['headdim'] * r0['nheads']}; "
                      "what each step adds: the step table above):", "", _markdown(header, rows), ""]
    notes = [n for n in (dash_note(g) for g in grids + bwds) if n]
    parts += ["", *notes] if notes else []
    others = [f"{rs[0].meta['gpu']} (commit `{rs[0].meta['commit']}`)" for s, rs in runs_by_gpu.items() if s != slug]
    tail = "Every row of every current run: [docs/results.md](docs/results.md)"
    tail += f", also for {', '.join(others)}" if others else ""
    parts += ["", tail + ". Older runs are archived in `tools/experiments/results/` and not shown."]
    return "\n".join(parts).replace("\n\n\n", "\n\n") + "\n"


def _backward_block(run: results.Run, img_base: str) -> list[str]:
    """The README's lines for a backward grid: a link to the Figure-6 picture (the README shows one picture, the
    forward's; docs/results.md shows both), the "bwd" pass's longest seqlen per (headdim, mask) against cuDNN and
    FA2, and the sentences of both passes."""
    dtype = _fig_dtype(run, "bwd")
    peers = [p for p in MAIN_PEERS if any(r["impl"] == p for r in run.rows)]
    names = {"fa3": "FA3", "cudnn": "cuDNN", "sdpa_flash": "FlashAttention-2"}
    against = f"against {' and '.join(names[p] for p in peers)}" if peers else "(this run timed no peers)"
    header, rows = compact(run, dtypes=(dtype,), passes=("bwd",))
    lines = [f"Figure 6 of the paper, redone — [backward TFLOPs/s of our step {against}, {dtype}, "
             f"{run.meta['gpu']}, commit {run.meta['commit']}]({img_base}/{figure_path(run).name}).", ""]
    if rows:
        lines += [f"Backward alone (FLOPs 2.5 × forward), {dtype}, longest sequence of each configuration (TFLOPs/s"
                  + ("; × = our fastest step ÷ that peer):" if peers else "):"), "", _markdown(header, rows), ""]
    lines += [f"- {s}" for p in ("bwd", "fwd_bwd") for s in grid_sentences(run, dtype, p)[:2]]
    lines += [f"- {s}" for s in backward_by_headdim_sentences(run, "bwd")]
    return lines


def render_results_md(runs_by_gpu: dict[str, list[results.Run]]) -> str:
    """docs/results.md: every current run in full, one section per GPU."""
    lines = ["# Results", "",
             "Generated by `python -m fa3_lab.lab.readme` from `fa3_lab/results/` (do not edit; a test fails when",
             "this file is stale). One section per GPU, each the current run of that GPU: one commit, one protocol.",
             "Numbers from different sections are different runs and are not compared.", ""]
    if not runs_by_gpu:
        return "\n".join(lines + [NO_RESULTS, ""])
    for slug, runs in runs_by_gpu.items():
        lines += [f"## {runs[0].meta['gpu']}", "", run_line(runs), ""]
        for r in grid_runs(runs):
            lines += [f"![Figure 5, {r.meta['gpu']}](img/{figure_path(r).name})", ""]
        for r in backward_runs(runs):
            lines += [f"![Figure 6 (backward), {r.meta['gpu']}](img/{figure_path(r).name})", ""]
        for r in runs:
            header, rows = pivot(r)
            lines += [f"### `{r.path.name}`: `{r.meta['command'].strip()}`", "", _markdown(header, rows), ""]
            note = dash_note(r)
            if note:
                lines += [note, ""]
        sentences = [s for g in grid_runs(runs) for d in ("bf16", "fp16") for s in grid_sentences(g, d)]
        sentences += [s for r in ablation_runs(runs) for d in ("bf16", "fp16") if (s := ablation_sentence(r, d))]
        sentences += [s for r in fp8_runs(runs) if (s := fp8_sentence(r))]
        sentences += [s for r in backward_runs(runs) for d in ("bf16", "fp16") for p in ("bwd", "fwd_bwd")
                      for s in grid_sentences(r, d, p)]
        sentences += [s for r in backward_runs(runs) for p in ("bwd", "fwd_bwd")
                      for s in backward_by_headdim_sentences(r, p)]
        sentences += [s for r in backward_ablation_runs(runs) for d in ("bf16", "fp16") for p in ("bwd", "fwd_bwd")
                      for s in backward_ablation_sentences(r, d, p)]
        if sentences:
            lines += ["In short:", ""] + [f"- {s}" for s in sentences] + [""]
    return "\n".join(lines)


def render_steps() -> str:
    """The step table from :mod:`fa3_lab.registry` and the notebooks with the steps they cover."""
    def link(path):
        return f"[`{Path(path).name}`]({path})"

    present = [s for s in registry.STEPS if (_env.REPO_ROOT / s.path).exists()]
    missing = [s for s in registry.STEPS if s not in present]
    chapters = {s.id: [c for c in registry.CHAPTERS if s.id in c.steps] for s in registry.STEPS}
    lines = ["| id | kernel | extends | the one idea it adds | paper | NumPy twin | notebooks |",
             "|---|---|---|---|---|---|---|"]
    for s in present:
        twin = "—" if s.twin is None else link(s.twin.split("::")[0]) + (
            f" `{s.twin.split('::')[1]}`" if "::" in s.twin else "")
        nbs = ", ".join(f"[{c.id:02d}](notebooks/{c.name}.ipynb)" for c in chapters[s.id]) or "—"
        lines.append(f"| {s.id:02d} | {link(s.path)} | {'—' if s.parent is None else f'{s.parent:02d}'} | "
                     f"{s.adds} | {s.paper} | {twin} | {nbs} |")
    lines.append("")
    later = [f"step {s.id:02d} `{s.name}`: {s.adds}" for s in missing]
    if not registry.series("bwd"):
        later.append("the backward kernel (steps 11+ in `cuda/steps/bwd/`); its NumPy model is "
                     "[`reference/backward.py`](reference/backward.py)")
    if later:
        lines += ["**Not in the repository yet** (planned in `fa3_lab/registry.py`; no results, no notebook cells):", ""]
        lines += [f"- {x}" for x in later]
    lines += ["", "Notebooks (chapters), each naming the steps it covers:", ""]
    for c in registry.CHAPTERS:
        covered = ", ".join(f"{i:02d}" for i in c.steps) if c.steps else "none (NumPy only)"
        title = c.title if c.title.endswith(("?", ".")) else c.title + "."
        lines.append(f"- [`{c.name}`](notebooks/{c.name}.ipynb) — {title} Steps covered: {covered}.")
    return "\n".join(lines) + "\n"


def steps_line(chapter_id: int) -> str:
    """The "Steps covered: …" line each notebook's first markdown cell carries (tests check it)."""
    c = next(c for c in registry.CHAPTERS if c.id == chapter_id)
    if not c.steps:
        return "Steps covered: none (NumPy only)."
    names = ", ".join(f"{s:02d} ({registry.step(s).name.partition('_')[2].replace('_', ' ')})" for s in c.steps)
    return f"Steps covered: {names} — ids of `fa3_lab/registry.py`."


def _replace(text: str, begin: str, end: str, body: str, where: str) -> str:
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{where}: expected one {begin} followed by one {end}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body}{end}{tail}"


def update(text: str, runs_by_gpu, steps: bool | None = None) -> str:
    """``text`` with the results block (and the steps block, when ``text`` has its markers) regenerated.

    ``runs_by_gpu``: :func:`fa3_lab.lab.results.current_runs`, or a list of runs (each its own GPU).

    Raises:
        ValueError: the markers are missing, repeated or out of order.
    """
    if isinstance(runs_by_gpu, list):
        runs_by_gpu = {f"{i}": [r] for i, r in enumerate(runs_by_gpu)}
    text = _replace(text, BEGIN, END, render(runs_by_gpu), "README")
    if steps or (steps is None and STEPS_BEGIN in text):
        text = _replace(text, STEPS_BEGIN, STEPS_END, render_steps(), "README")
    return text


def figures(runs_by_gpu) -> list[tuple[results.Run, Path]]:
    """(run, its picture's path) for every forward grid and every backward grid of the current GPU runs."""
    return [(g, figure_path(g)) for runs in runs_by_gpu.values() for g in grid_runs(runs) + backward_runs(runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa3_lab.lab.readme",
                                     description="Regenerate README.md's steps and results, docs/results.md and "
                                                 "docs/img/fig5_*.png / fig6_*.png from fa3_lab/registry.py and fa3_lab/results/.")
    parser.add_argument("--check", action="store_true", help="exit 1 if anything is stale; change nothing")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default = args.readme == README
    try:
        text = args.readme.read_text()
        runs = results.current_runs(args.results)
        new = {args.readme: update(text, runs, steps=default or None)}
        if default:  # docs/results.md, the picture and the step headers belong to the repository's README only
            new[RESULTS_MD] = render_results_md(runs)
            headers_stale = headers.update(check=True)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    figs = figures(runs) if default else []
    stale = [p for p, t in new.items() if not p.exists() or p.read_text() != t]
    stale += [p for _, p in figs if not p.exists()]
    stale += headers_stale if default else []
    wanted = {p for _, p in figs}
    extra = ([p for prefix in FIG_PREFIX.values() for p in sorted(IMG_DIR.glob(f"{prefix}_*.png")) if p not in wanted]
             if default else [])
    if args.check:
        if stale or extra:
            for p in stale:
                print(f"{parser.prog}: {_rel(p)} is stale or missing", file=sys.stderr)
            for p in extra:
                print(f"{parser.prog}: {_rel(p)} belongs to no current run", file=sys.stderr)
            print(f"{parser.prog}: run `python -m fa3_lab.lab.readme`", file=sys.stderr)
            return 1
        print("README.md, docs/results.md, the figures and the step headers are up to date" if default
              else f"{args.readme.name} results table is up to date")
        return 0
    for p in (headers.update() if default else []):
        print(f"updated {_rel(p)} (its Measured paragraph)")
    for p, t in new.items():
        if not p.exists() or p.read_text() != t:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(t)
            print(f"updated {_rel(p)}")
    for run, p in figs:  # redrawn every time (same data and Matplotlib: same bytes)
        before = p.read_bytes() if p.exists() else None
        if write_figure(run, p).read_bytes() != before:
            print(f"wrote {_rel(p)}")
    for p in extra:
        p.unlink()
        print(f"removed {_rel(p)} (no current run)")
    if not stale and not extra:
        print("already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
