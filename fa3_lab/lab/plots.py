"""Figures from recorded GPU runs: the paper's Figure 5 layout, its Table 2 ablation, its Figure 6 (backward).

Both functions read rows in the one results schema (docs/design.md, "Timing protocol";
:mod:`fa3_lab.lab.results`) and draw with Matplotlib only. Nothing is random and nothing is measured
here, so the same JSON gives the same picture. Every figure carries a title line naming the GPU,
the date and the commit of the run it shows (taken from the run's ``meta``, never typed).

Numbers from different runs are never put side by side (docs/design.md: "never compare numbers taken on
different GPUs or in different runs"): each function takes one run, or rows without a ``meta``.
"""
from __future__ import annotations

from fa3_lab import registry as _registry

from .bench import PAPER_ABLATION_TFLOPS
from .results import DET_SUFFIX, IMPLS, PAPER_FA3_BWD_HD128, STEP_IMPLS, Run, seqlen_label

#: The paper's Table 2 / §3.1 numbers (H100 SXM5, TFLOPs/s) beside our steps 01-04.
PAPER_ABLATION = dict(PAPER_ABLATION_TFLOPS)

#: Bar order and legend labels: our steps first (ids and ideas from fa3_lab.registry), then the peers.
IMPL_ORDER = IMPLS
_SHORT = {1: "TMA+WGMMA", 2: "warp specialized", 3: "pingpong", 4: "intra-WG overlap", 5: "FP8",
          6: "persistent", 7: "causal scheduler", 8: "TMA-store epilogue", 9: "3 warpgroups", 10: "K/V multicast"}
LABELS = {
    **{s.marker: f"step {s.id:02d} {_SHORT.get(s.id, s.name.partition('_')[2].replace('_', ' '))}"
       for s in _registry.STEPS},
    **{s.marker + DET_SUFFIX: f"step {s.id:02d} deterministic" for s in _registry.series("bwd")},
    "fa3": "FA3 (fa3-fwd)", "cudnn": "cuDNN", "sdpa_flash": "SDPA FA2", "sdpa_efficient": "SDPA mem-efficient",
    "sdpa_math": "SDPA math (standard)",
}
#: One colour per implementation, told apart at a glance (issue #20: not three near-identical blues):
#: the steps take tab20's blues, purples, cyans, pinks and browns; the peers keep red (FA3), green
#: (cuDNN), orange (FA2) and olive/grey (SDPA's other backends), as in the paper's Figure 5.
_STEP_COLORS = ("#aec7e8", "#1f77b4", "#9467bd", "#17becf", "#e377c2",
                "#8c564b", "#c49c94", "#f7b6d2", "#c5b0d5", "#393b79")
COLORS = {
    **{s.marker: _STEP_COLORS[(s.id - 1) % len(_STEP_COLORS)] for s in _registry.STEPS},
    **{s.marker + DET_SUFFIX: _STEP_COLORS[(s.id - 1) % len(_STEP_COLORS)]  # its step's colour, drawn dashed
       for s in _registry.series("bwd")},
    "fa3": "#d62728", "cudnn": "#2ca02c", "sdpa_flash": "#ff7f0e", "sdpa_efficient": "#bcbd22",
    "sdpa_math": "#7f7f7f",
}
_FIG5_HEADDIMS = (64, 128, 256)


def _rows_and_meta(runs_or_rows, where: str):
    """(rows, meta or None) from one Run, a one-element list of Runs, a {"meta", "rows"} document or a
    list of row dicts. Raises TypeError for other types, ValueError for empty input or several runs."""
    if isinstance(runs_or_rows, Run):
        return list(runs_or_rows.rows), runs_or_rows.meta
    if isinstance(runs_or_rows, dict):
        if "rows" not in runs_or_rows:
            raise ValueError(f"{where}: expected a results document with 'rows', got keys {sorted(runs_or_rows)}")
        rows, meta = runs_or_rows["rows"], runs_or_rows.get("meta")
    elif isinstance(runs_or_rows, (list, tuple)):
        items = list(runs_or_rows)
        if not items:
            raise ValueError(f"{where}: expected a run or a non-empty list of rows, got an empty list")
        if all(isinstance(x, Run) for x in items):
            if len(items) > 1:
                names = ", ".join(x.path.name for x in items)
                raise ValueError(f"{where}: expected one run, got {len(items)} ({names}); numbers from "
                                 f"different runs must not share a figure — pass one of them")
            return list(items[0].rows), items[0].meta
        rows, meta = items, None
    else:
        raise TypeError(f"{where}: expected a fa3_lab.lab.results.Run, a results document or a list of row dicts, "
                        f"got {type(runs_or_rows).__name__}")
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"{where}: expected a non-empty list of rows, got {rows!r:.60}")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise TypeError(f"{where}: rows[{bad[0]}]: expected a dict, got {type(rows[bad[0]]).__name__}")
    return list(rows), meta


def latest_run(name: str, root=None) -> Run:
    """The newest recorded run called ``<name>.json``: :func:`fa3_lab.lab.results.find`, then loaded.

    The current run of a GPU first (``fa3_lab/results/<gpu>/``); an archived one
    (``tools/experiments/results/``) only when no current run has that file, and its ``describe()``
    says so.

    Raises:
        TypeError: ``name`` is not a str. FileNotFoundError: no such recorded run (the message
        names the folders searched). SchemaError: the file fails the schema.
    """
    from . import results

    return results.load(results.find(name, root))


def title_line(meta) -> str:
    """"<gpu> (<n> SMs), <YYYY-MM-DD>, commit <sha>, torch <v>, CUDA <v>" from a run's meta; a note
    when there is none."""
    if not meta:
        return "rows without run metadata (GPU, date and commit unknown)"
    return (f"{meta['gpu']} ({meta['sm_count']} SMs), {meta['date'][:10]}, commit {meta['commit']}, "
            f"torch {meta['torch']}, CUDA {meta['cuda']}")


def _check_dtype(dtype, rows, where):
    if not isinstance(dtype, str):
        raise TypeError(f"dtype: expected a str like 'bf16', got {type(dtype).__name__}")
    present = sorted({r["dtype"] for r in rows})
    if dtype not in present:
        raise ValueError(f"dtype: expected one of the dtypes in the rows {present}, got {dtype!r} ({where})")


def bench_table(runs_or_rows, dtype="bf16"):
    """The Figure-5 grid as a dict: {(headdim, causal, seqlen): {impl: tflops}} for one dtype.

    Args:
        runs_or_rows: one :class:`fa3_lab.lab.results.Run`, a results document, or a list of row dicts.
        dtype: "bf16", "fp16" or "e4m3" (must occur in the rows).

    Raises:
        TypeError: wrong input types. ValueError: empty input, several runs, a dtype not in the rows,
        or two rows for the same (impl, headdim, causal, seqlen) (e.g. two runs' rows mixed).
    """
    rows, _ = _rows_and_meta(runs_or_rows, "bench_table")
    _check_dtype(dtype, rows, "bench_table")
    table: dict = {}
    for r in rows:
        if r["dtype"] != dtype:
            continue
        key = (r["headdim"], r["causal"], r["seqlen_q"])
        cell = table.setdefault(key, {})
        if r["impl"] in cell:
            raise ValueError(f"rows: two rows for {r['impl']} {dtype} headdim {key[0]} causal={key[1]} "
                             f"seqlen {key[2]}; pass the rows of one run")
        cell[r["impl"]] = r["tflops"]
    return table


def plot_bench(runs_or_rows, dtype="bf16", ax=None):
    """The paper's Figure 5 layout: forward TFLOPs/s per seqlen, grouped bars per implementation.

    A 2 × 3 grid of panels — rows: causal no / yes; columns: headdim 64, 128, 256 (those present) —
    each with one group of bars per seqlen and one bar per implementation present in the rows (ours
    first, then FA3, cuDNN, SDPA's backends). The figure's title line names the GPU, date and commit.

    Args:
        runs_or_rows: one :class:`fa3_lab.lab.results.Run` (e.g. ``bench.json`` from ``load_all()``), a
            results document ``{"meta", "rows"}``, or a list of row dicts (then the title says the
            run is unknown).
        dtype: the rows' ``dtype`` to draw ("bf16" or "fp16" in our runs).
        ax: None (a new figure) or 2·(number of headdims) Matplotlib Axes (a 2-D array or a flat
            sequence, row-major: causal no first).

    Returns:
        matplotlib.figure.Figure.

    Raises:
        TypeError: wrong input types. ValueError: empty input, several runs at once, a dtype absent
        from the rows, duplicate rows, or the wrong number of Axes.

    Source: paper §4.1, Figure 5 (forward speed, head dim 64/128/256, with and without causal mask).
    """
    rows, meta = _rows_and_meta(runs_or_rows, "plot_bench")
    table = bench_table(rows, dtype)
    impls = [i for i in IMPL_ORDER if any(i in cell for cell in table.values())]
    return _draw_grid(table, impls, LABELS, f"Forward, {dtype} — {title_line(meta)}", ax)


#: The peers of the README's Figure 5 (the paper's: FA3, cuDNN, FlashAttention-2).
FIG5_PEERS = ("fa3", "cudnn", "sdpa_flash")


def best_step_table(runs_or_rows, dtype="bf16"):
    """:func:`bench_table` with our steps folded into one entry per point: ``"ours"`` = the fastest
    step's TFLOPs/s, ``"ours_step"`` = its impl (e.g. "step10"); the peers are kept as they are.

    Raises:
        as :func:`bench_table`; ValueError when no point has a step row.
    """
    table = {}
    for key, cell in bench_table(runs_or_rows, dtype).items():
        ours = [(cell[i], i) for i in STEP_IMPLS if i in cell]
        new = {k: v for k, v in cell.items() if k not in STEP_IMPLS}
        if ours:
            new["ours"], new["ours_step"] = max(ours)
        table[key] = new
    if not any("ours" in c for c in table.values()):
        raise ValueError(f"rows: no step rows in {dtype}; expected a `python -m fa3_lab bench` run")
    return table


def plot_fig5(runs_or_rows, dtype="bf16", peers=FIG5_PEERS, ax=None):
    """The paper's Figure 5 with one bar for us: our fastest step at each point against ``peers``.

    The layout of :func:`plot_bench` (rows: no mask / causal; columns: headdim), bars: "ours (best
    step)" then FA3, cuDNN, FlashAttention-2 (SDPA's flash backend), those the run has. Which step was
    fastest at each point is in the run's table (README, docs/results.md).

    Returns:
        matplotlib.figure.Figure.

    Raises:
        as :func:`plot_bench` and :func:`best_step_table`.
    """
    rows, meta = _rows_and_meta(runs_or_rows, "plot_fig5")
    table = best_step_table(rows, dtype)
    steps = sorted({c["ours_step"] for c in table.values() if "ours_step" in c})
    labels = dict(LABELS, ours=f"ours, fastest step ({', '.join(s.removeprefix('step') for s in steps)})")
    impls = ["ours"] + [p for p in peers if any(p in c for c in table.values())]
    what = "our fastest step vs its peers" if len(impls) > 1 else "our fastest step (this run timed no peers)"
    return _draw_grid(table, impls, labels, f"Forward, {dtype}: {what} — {title_line(meta)}",
                      ax, colors=dict(COLORS, ours="#1f3b73"))


def _draw_grid(table, impls, labels, title, ax=None, colors=COLORS):
    """Grouped bars of {(headdim, causal, seqlen): {impl: TFLOPs/s}} in the Figure 5 layout."""
    import matplotlib.pyplot as plt
    import numpy as np

    headdims = [d for d in _FIG5_HEADDIMS if any(k[0] == d for k in table)]
    headdims += sorted({k[0] for k in table} - set(headdims))
    if ax is None:
        fig, axes = plt.subplots(2, len(headdims), figsize=(4.6 * len(headdims), 6.4), squeeze=False)
    else:
        axes = np.asarray(ax, dtype=object).reshape(-1)
        if axes.size != 2 * len(headdims):
            raise ValueError(f"ax: expected {2 * len(headdims)} Axes (2 masks × {len(headdims)} headdims), "
                             f"got {axes.size}")
        axes = axes.reshape(2, len(headdims))
        fig = axes[0, 0].figure
    width = 0.8 / len(impls)
    for r, causal in enumerate((False, True)):
        for c, d in enumerate(headdims):
            a = axes[r, c]
            seqlens = sorted(k[2] for k in table if k[0] == d and k[1] == causal)
            x = np.arange(len(seqlens))
            for n, impl in enumerate(impls):
                ys = [table[(d, causal, s)].get(impl, np.nan) for s in seqlens]
                a.bar(x + (n - (len(impls) - 1) / 2) * width, ys, width, color=colors.get(impl),
                      label=labels.get(impl, impl))
            a.set_xticks(x, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            a.set_title(f"headdim {d}, {'causal' if causal else 'no mask'}", fontsize=9)
            a.grid(axis="y", alpha=0.3)
            if c == 0:
                a.set_ylabel("TFLOPs/s")
            if r == 1:
                a.set_xlabel("seqlen (batch = 16k / seqlen, nheads = 2048 / headdim)")
    handles, labs = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=min(len(impls), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return fig


def _two_lines(impl):
    label = LABELS.get(impl, impl)
    if impl in STEP_IMPLS:  # "step 01 TMA+WGMMA" -> "step 01" / "TMA+WGMMA"
        head, _, rest = label.partition(" ")[2].partition(" ")
        return f"step {head}\n" + rest.replace(" ", "\n")
    return label.replace(" ", "\n", 1)


#: (batch, seqlen_q, seqlen_k, nheads, headdim, causal) of the paper's Table 2 ablation.
TABLE2_CONFIG = (4, 8448, 8448, 16, 128, False)


def ablation_table(runs_or_rows, dtype="bf16", paper=None):
    """Rows of the ablation figure: [(impl, ours TFLOPs/s, paper TFLOPs/s or None)], steps first.

    Raises:
        as :func:`plot_ablation`.
    """
    paper = PAPER_ABLATION if paper is None else paper
    if not isinstance(paper, dict):
        raise TypeError(f"paper: expected a dict {{impl: TFLOPs/s}}, got {type(paper).__name__}")
    rows, _ = _rows_and_meta(runs_or_rows, "ablation_table")
    _check_dtype(dtype, rows, "ablation_table")
    rows = [r for r in rows if r["dtype"] == dtype]
    configs = sorted({(r["batch"], r["seqlen_q"], r["seqlen_k"], r["nheads"], r["headdim"], r["causal"])
                      for r in rows})
    if len(configs) > 1 and TABLE2_CONFIG in configs:  # a run of several shapes: the paper's is the ablation
        rows = [r for r in rows if (r["batch"], r["seqlen_q"], r["seqlen_k"], r["nheads"], r["headdim"],
                                    r["causal"]) == TABLE2_CONFIG]
        configs = [TABLE2_CONFIG]
    if len(configs) != 1:
        raise ValueError(f"rows: expected the rows of one configuration (the Table 2 run), got {len(configs)} "
                         f"configurations, e.g. {configs[:2]}")
    got = {}
    for r in rows:
        if r["impl"] in got:
            raise ValueError(f"rows: two rows for {r['impl']} {dtype}; pass the rows of one run")
        got[r["impl"]] = r["tflops"]
    return [(i, got[i], paper.get(i)) for i in IMPL_ORDER if i in got]


def plot_ablation(rows, paper=PAPER_ABLATION, dtype="bf16", ax=None):
    """Our steps 01-04 (and the peers of the same run) beside the paper's Table 2 / §3.1 numbers.

    One pair of bars per step (ours solid, the paper's H100 SXM5 number hatched), then one bar per
    peer (FA3, cuDNN, SDPA). Values are written above the bars, rounded to whole TFLOPs/s.

    Args:
        rows: one :class:`fa3_lab.lab.results.Run` (``ablation.json``), a results document, or a list
            of row dicts of ONE configuration (the paper's (4, 8448, 16, 128), non-causal).
        paper: {impl: TFLOPs/s} — default :data:`PAPER_ABLATION` (570 / 582 / 620 / 661).
        dtype: which of the rows' dtypes to draw.
        ax: a Matplotlib Axes, or None for a new figure.

    Returns:
        matplotlib.figure.Figure.

    Raises:
        TypeError: wrong input types. ValueError: empty input, several runs, several configurations,
        duplicate rows, a dtype absent from the rows.

    Source: paper §4.2, Table 2 (pipelining ablation); §3.1 (pingpong 570 → 620).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    table = ablation_table(rows, dtype, paper)
    _, meta = _rows_and_meta(rows, "plot_ablation")
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 4))
    else:
        fig = ax.figure
    x = np.arange(len(table), dtype=float)
    ours = [t for _, t, _ in table]
    is_step = [i in STEP_IMPLS for i, _, _ in table]
    w = 0.38
    xs_ours = [xi - w / 2 if (s and p is not None) else xi for xi, s, (_, _, p) in zip(x, is_step, table)]
    bars = ax.bar(xs_ours, ours, w, color=[COLORS.get(i) for i, _, _ in table], edgecolor="black", lw=0.5,
                  label=f"ours, {dtype}")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    px = [xi + w / 2 for xi, (_, _, p) in zip(x, table) if p is not None]
    pv = [p for _, _, p in table if p is not None]
    if pv:
        pbars = ax.bar(px, pv, w, color="white", edgecolor="black", hatch="//", lw=0.5,
                       label="paper (H100 SXM5)")
        ax.bar_label(pbars, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, [_two_lines(i) for i, _, _ in table], fontsize=7)
    ax.set_ylabel("TFLOPs/s")
    r0 = _rows_and_meta(rows, "plot_ablation")[0][0]
    ax.set_title(f"Ablation, batch {r0['batch']}, seqlen {r0['seqlen_q']}, {r0['nheads']} heads, "
                 f"headdim {r0['headdim']}, {'causal' if r0['causal'] else 'non-causal'}\n{title_line(meta)}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, 1.15 * max(ours + pv))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- backward

#: Paper reference drawn by :func:`plot_backward` (one source: :data:`fa3_lab.lab.results.PAPER_FA3_BWD_HD128`).
PAPER_FA3_BWD_LABEL = "paper FA3 (H100)"
#: The peers of the backward figure: cuDNN's backward and FlashAttention-2's (SDPA's flash backend).
BWD_PEERS = ("cudnn", "sdpa_flash")


def backward_table(runs_or_rows, dtype="bf16", pass_="bwd"):
    """The backward grid as {(headdim, causal, seqlen): {impl: TFLOPs/s}} for one dtype and one ``pass``.

    Args:
        runs_or_rows: one :class:`fa3_lab.lab.results.Run` (``bench_backward.json``), a results document or a list
            of row dicts.
        dtype: "bf16" or "fp16" (must occur in the rows of that pass).
        pass_: "bwd" (the backward alone, FLOPs 2.5 × forward) or "fwd_bwd" (3.5 ×).

    Raises:
        TypeError: wrong input types. ValueError: empty input, several runs, a ``pass_`` other than "bwd" /
        "fwd_bwd", no rows of that pass, a dtype absent from them, or duplicate rows.
    """
    if pass_ not in ("bwd", "fwd_bwd"):
        raise ValueError(f"pass_: expected 'bwd' or 'fwd_bwd', got {pass_!r}")
    rows, _ = _rows_and_meta(runs_or_rows, "backward_table")
    rows = [r for r in rows if r.get("pass", "fwd") == pass_]
    if not rows:
        raise ValueError(f"rows: no {pass_!r} rows; expected a `python -m fa3_lab bench --backward` run")
    return bench_table(rows, dtype)


def plot_backward(runs_or_rows, dtype=None, pass_="bwd", peers=BWD_PEERS, paper=None, ax=None):
    """The paper's Figure 6, redone: backward TFLOPs/s against seqlen, our steps against cuDNN and FA2.

    Panels: rows = the masks of the run (no mask, causal), columns = its headdims (64, 128, 256); x = seqlen (log
    scale), one line per implementation present: our steps (solid; a ``stepNN_det`` deterministic mode dashed, in
    its step's colour), then ``peers`` present. In the headdim 128 no-mask panel of the "bwd" pass, the paper's
    FA3 numbers (:data:`fa3_lab.lab.results.PAPER_FA3_BWD_HD128`, H100) at the run's seqlens are drawn as black
    crosses on a dotted line, labelled "paper FA3 (H100)". The title names the pass, dtype, GPU, date and commit.

    Args:
        runs_or_rows: one :class:`fa3_lab.lab.results.Run` (``bench_backward.json``), a results document or a list
            of row dicts.
        dtype: the rows' dtype to draw; None: "bf16" if the run has it, else its first dtype.
        pass_: "bwd" (the backward alone, 2.5 × forward FLOPs) or "fwd_bwd" (3.5 ×).
        peers: peer impls to draw when present (default cuDNN, FA2).
        paper: {seqlen: TFLOPs/s} to mark, default :data:`~fa3_lab.lab.results.PAPER_FA3_BWD_HD128`; {} for none.
        ax: None (a new figure) or (masks × headdims) Matplotlib Axes (2-D array or flat, row-major).

    Returns:
        matplotlib.figure.Figure.

    Raises:
        TypeError: wrong input types. ValueError: as :func:`backward_table`, or the wrong number of Axes.

    Source: paper §4.1, Figure 6 (backward speed, FP16/BF16, head dim 64/128, with and without causal mask).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    paper = PAPER_FA3_BWD_HD128 if paper is None else paper
    if not isinstance(paper, dict):
        raise TypeError(f"paper: expected a dict {{seqlen: TFLOPs/s}}, got {type(paper).__name__}")
    rows, meta = _rows_and_meta(runs_or_rows, "plot_backward")
    if dtype is None:
        have = {r["dtype"] for r in rows if r.get("pass", "fwd") == pass_}
        dtype = "bf16" if "bf16" in have or not have else sorted(have)[0]
    table = backward_table(rows, dtype, pass_)
    ours = [i for i in IMPL_ORDER if i not in peers and i.startswith("step") and any(i in c for c in table.values())]
    impls = ours + [p for p in peers if any(p in c for c in table.values())]
    headdims = [d for d in _FIG5_HEADDIMS if any(k[0] == d for k in table)]
    headdims += sorted({k[0] for k in table} - set(headdims))
    masks = [c for c in (False, True) if any(k[1] == c for k in table)]
    if ax is None:
        fig, axes = plt.subplots(len(masks), len(headdims), figsize=(4.6 * len(headdims), 3.2 * len(masks) + 0.6),
                                 squeeze=False)
    else:
        axes = np.asarray(ax, dtype=object).reshape(-1)
        if axes.size != len(masks) * len(headdims):
            raise ValueError(f"ax: expected {len(masks) * len(headdims)} Axes ({len(masks)} masks × {len(headdims)} "
                             f"headdims), got {axes.size}")
        axes = axes.reshape(len(masks), len(headdims))
        fig = axes[0, 0].figure
    for r, causal in enumerate(masks):
        for c, d in enumerate(headdims):
            a = axes[r, c]
            seqlens = sorted(k[2] for k in table if k[0] == d and k[1] == causal)
            for impl in impls:
                pts = [(s, table[(d, causal, s)][impl]) for s in seqlens if impl in table[(d, causal, s)]]
                if pts:
                    a.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if impl.endswith(DET_SUFFIX) else "o-",
                           color=COLORS.get(impl), label=LABELS.get(impl, impl), ms=4)
            ref = [(s, paper[s]) for s in seqlens if s in paper]
            if ref and pass_ == "bwd" and d == 128 and not causal:
                a.plot([p[0] for p in ref], [p[1] for p in ref], "kx:", label=PAPER_FA3_BWD_LABEL)
            if seqlens:
                a.set_xscale("log", base=2)
                a.set_xticks(seqlens, [seqlen_label(s) for s in seqlens])
                a.minorticks_off()
            a.set_ylim(0, None)
            a.set_title(f"headdim {d}, {'causal' if causal else 'no mask'}", fontsize=9)
            a.grid(alpha=0.3)
            if c == 0:
                a.set_ylabel("TFLOPs/s")
            if r == len(masks) - 1:
                a.set_xlabel("seqlen (batch = 16k / seqlen, nheads = 2048 / headdim)")
    handles = {}
    for a in axes.reshape(-1):
        for h, label in zip(*a.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    what = {"bwd": "Backward (2.5 × forward FLOPs)", "fwd_bwd": "Forward + backward (3.5 × forward FLOPs)"}[pass_]
    theirs = [LABELS.get(p, p) for p in impls[len(ours):]]
    vs = (f"our step{'s' if len([i for i in ours if i in STEP_IMPLS]) > 1 else ''} vs {', '.join(theirs)}" if theirs
          else "our steps (this run timed no peers)")
    fig.suptitle(f"{what}, {dtype}: {vs}\n{title_line(meta)}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if len(masks) > 1 else 0.14, 1, 0.95))
    return fig


# ------------------------------------------------------------------------------------------ FP8

#: Optional timing keys of a ``bench --fp8`` step 05 row (fa3_lab.fp8.time_quantize_vs_kernel), in ms.
#: Their meaning changed when the fused quantize kernel (cuda/fp8_quantize.cu) came:
#:
#: * rows WITH ``quantize_torch_ms``: ``quantize_ms`` is the fused kernel, which also writes V in the
#:   kernel's layout; ``quantize_torch_ms`` + ``v_layout_ms`` is the torch path it replaces;
#: * rows WITHOUT it (runs before the fused kernel): ``quantize_ms`` is the torch path
#:   (fa3_lab.fp8.quantize) and ``v_layout_ms`` the separate V layout copy.
#:
#: :func:`fp8_table` reads them into ``quantize_fused_ms``, ``quantize_torch_ms``, ``v_layout_ms``.
FP8_EXTRA_MS = ("quantize_ms", "quantize_torch_ms", "v_layout_ms")


def _opt_ms(row, key):
    """row[key] if it is a finite number > 0, else None ("not recorded")."""
    x = row.get(key)
    if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and 0 < x < float("inf"):
        return float(x)
    return None


def _fp8_quantize_times(row):
    """(fused ms incl. V layout, torch quantize ms, torch V layout ms) of a step05 row, None where not
    recorded (see :data:`FP8_EXTRA_MS` for the two generations of keys)."""
    layout = _opt_ms(row, "v_layout_ms")
    if "quantize_torch_ms" in row:
        return _opt_ms(row, "quantize_ms"), _opt_ms(row, "quantize_torch_ms"), layout
    return None, _opt_ms(row, "quantize_ms"), layout


def fp8_table(runs_or_rows, causal=False):
    """The points of a ``bench --fp8`` run: one dict per (headdim, seqlen), sorted.

    Each dict: ``headdim``, ``seqlen``; TFLOPs/s of ``step05`` (the FP8 kernel alone, e4m3), ``fa3``
    (FA3's e4m3 forward) and ``bf16`` (our 16-bit step, ``bf16_impl`` says which, e.g. "step04"),
    None where the run has no such row; from the step 05 row, in ms: ``ms`` (the kernel),
    ``quantize_fused_ms`` (the fused quantize kernel, V layout included), ``quantize_torch_ms`` and
    ``v_layout_ms`` (the torch path: quantize, then the V layout copy) — each None when the run did
    not record it (:data:`FP8_EXTRA_MS` says how the keys are read); and end to end, the kernel's
    FLOPs over kernel + quantization time, in TFLOPs/s: ``end_to_end_fused`` (ms +
    quantize_fused_ms) and ``end_to_end_torch`` (ms + quantize_torch_ms + v_layout_ms), None unless
    their times are recorded.

    Args:
        runs_or_rows: one :class:`fa3_lab.lab.results.Run` (``bench_fp8.json``), a results document or a
            list of row dicts.
        causal: which rows (``bench --fp8`` records non-causal ones).

    Raises:
        TypeError: wrong input types, ``causal`` not a bool. ValueError: empty input, several runs, no
        step05 e4m3 rows for that mask, two rows for the same (impl, dtype, headdim, seqlen), or two
        different bf16 steps at one point.
    """
    from .results import flops

    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    rows, _ = _rows_and_meta(runs_or_rows, "fp8_table")
    rows = [r for r in rows if r["causal"] == causal]
    if not any(r["impl"] == "step05" and r["dtype"] == "e4m3" for r in rows):
        raise ValueError(f"rows: no step05 e4m3 rows with causal={causal} (expected a `python -m fa3_lab bench --fp8` run)")
    seen, points = set(), {}
    for r in rows:
        key = (r["impl"], r["dtype"], r["headdim"], r["seqlen_q"])
        if key in seen:
            raise ValueError(f"rows: two rows for {r['impl']} {r['dtype']} headdim {key[2]} seqlen {key[3]}; "
                             f"pass the rows of one run")
        seen.add(key)
    for r in rows:
        if r["impl"] != "step05" or r["dtype"] != "e4m3":
            continue
        fused, torch_q, layout = _fp8_quantize_times(r)
        f = flops(r["batch"], r["nheads"], r["seqlen_q"], r["seqlen_k"], r["headdim"], r["causal"])
        points[(r["headdim"], r["seqlen_q"])] = {
            "headdim": r["headdim"], "seqlen": r["seqlen_q"], "step05": r["tflops"], "fa3": None, "bf16": None,
            "bf16_impl": None, "ms": r["ms"], "quantize_fused_ms": fused, "quantize_torch_ms": torch_q,
            "v_layout_ms": layout,
            "end_to_end_fused": None if fused is None else f / ((r["ms"] + fused) * 1e-3) / 1e12,
            "end_to_end_torch": (None if torch_q is None or layout is None
                                 else f / ((r["ms"] + torch_q + layout) * 1e-3) / 1e12)}
    for r in rows:
        p = points.get((r["headdim"], r["seqlen_q"]))
        if p is None:
            continue
        if r["impl"] == "fa3" and r["dtype"] == "e4m3":
            p["fa3"] = r["tflops"]
        elif r["impl"] in STEP_IMPLS and r["dtype"] == "bf16":
            if p["bf16_impl"] is not None:
                raise ValueError(f"rows: two bf16 steps ({p['bf16_impl']}, {r['impl']}) at headdim {r['headdim']} "
                                 f"seqlen {r['seqlen_q']}; expected our one default step")
            p["bf16"], p["bf16_impl"] = r["tflops"], r["impl"]
    return [points[k] for k in sorted(points)]


def plot_fp8(runs_or_rows, headdims=None, causal=False, ax=None):
    """FP8 forward speed: TFLOPs/s vs seqlen of step 05 (e4m3), FA3's e4m3 forward and our bf16 step.

    One panel per headdim (default: every headdim of the run's step05 rows, e.g. 128 and 256). Lines:
    step 05 (kernel alone — FA3's e4m3 forward also takes pre-quantized inputs), FA3 e4m3, our bf16
    step (one run, same inputs); and step 05 end to end, where the run recorded the times (see
    :func:`fp8_table`): dashed, kernel + the fused quantize kernel; dotted, kernel + the torch
    quantize + the V layout copy. A panel without either says "quantize time not recorded". The
    title line names the GPU, date and commit of the run.

    Args:
        runs_or_rows: one :class:`fa3_lab.lab.results.Run` (``bench_fp8.json`` from
            ``latest_run("bench_fp8")``), a results document, or a list of row dicts.
        headdims: None or a sequence of ints present in the step05 rows.
        causal: the rows' mask (``bench --fp8`` records non-causal).
        ax: None (a new figure) or one Matplotlib Axes per headdim (a flat sequence or array).

    Returns:
        matplotlib.figure.Figure.

    Raises:
        TypeError: wrong input types. ValueError: as :func:`fp8_table`, a headdim without step05
        rows, or the wrong number of Axes.

    Source: paper §4.1, Figure 7 (FP8 forward speed, head dim 64/128/256; we record 128 and 256).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    table = fp8_table(runs_or_rows, causal)
    _, meta = _rows_and_meta(runs_or_rows, "plot_fp8")
    present = sorted({p["headdim"] for p in table})
    if headdims is None:
        headdims = present
    else:
        if isinstance(headdims, (str, bytes)) or not hasattr(headdims, "__iter__"):
            raise TypeError(f"headdims: expected a sequence of ints, got {type(headdims).__name__}")
        headdims = list(headdims)
        bad = [d for d in headdims if d not in present]
        if not headdims or bad:
            raise ValueError(f"headdims: expected a non-empty subset of the run's step05 headdims {present}, "
                             f"got {headdims}")
    if ax is None:
        fig, axes = plt.subplots(1, len(headdims), figsize=(5.2 * len(headdims), 3.8), squeeze=False)
        axes = axes[0]
    else:
        axes = np.asarray(ax, dtype=object).reshape(-1)
        if axes.size != len(headdims):
            raise ValueError(f"ax: expected {len(headdims)} Axes (one per headdim {headdims}), got {axes.size}")
        fig = axes[0].figure
    bf16_impls = sorted({p["bf16_impl"] for p in table if p["bf16_impl"]})
    bf16_label = f"ours bf16 ({', '.join(bf16_impls)})" if bf16_impls else "ours bf16"
    for a, d in zip(axes, headdims):
        pts = [p for p in table if p["headdim"] == d]
        xs = [p["seqlen"] for p in pts]
        nan = float("nan")
        a.plot(xs, [p["step05"] for p in pts], "o-", color=COLORS["step05"], label="step 05 e4m3 (kernel)")
        if any(p["fa3"] is not None for p in pts):
            a.plot(xs, [nan if p["fa3"] is None else p["fa3"] for p in pts], "s-", color=COLORS["fa3"],
                   label="FA3 e4m3 (fa3-fwd)")
        if any(p["bf16"] is not None for p in pts):
            a.plot(xs, [nan if p["bf16"] is None else p["bf16"] for p in pts], "^-", color=COLORS["step04"],
                   label=bf16_label)
        drawn = False
        for key, style, label in (("end_to_end_fused", "o--", "step 05 + fused quantize (V layout incl.)"),
                                  ("end_to_end_torch", "o:", "step 05 + torch quantize + V layout")):
            if any(p[key] is not None for p in pts):
                a.plot(xs, [nan if p[key] is None else p[key] for p in pts], style, color=COLORS["step05"],
                       alpha=0.6, label=label)
                drawn = True
        if not drawn:
            a.text(0.02, 0.03, "quantize time not recorded", transform=a.transAxes, fontsize=8, color="gray")
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [seqlen_label(s) for s in xs])
        a.minorticks_off()
        a.set_ylim(0, None)
        a.set_title(f"headdim {d}, {'causal' if causal else 'no mask'}", fontsize=9)
        a.set_xlabel("seqlen (batch = 16k / seqlen, nheads = 2048 / headdim)")
        a.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOPs/s")
    handles = {}
    for a in axes:
        for h, label in zip(*a.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4) if
               len(headdims) > 1 else 2, fontsize=8, frameon=False)
    fig.suptitle(f"Forward, FP8 e4m3\n{title_line(meta)}", fontsize=9)
    fig.tight_layout(rect=(0, 0.1 if len(headdims) > 1 else 0.16, 1, 1))
    return fig
