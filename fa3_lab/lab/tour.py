"""`python -m fa3_lab tour` — the lab's main job in one command.

Live, then recorded, then where to go. On an sm_90 GPU it runs the kernel tour
(``fa3_lab.lab.tour_gpu.run(console)``); anywhere else (or with ``--cpu``) it runs the NumPy references
against each other on a slice of one Llama-3-8B attention layer. Then it shows the current recorded
GPU run (``fa3_lab/results/``, one commit per GPU), saves the paper's Figure 5 redone from that run as
a PNG and prints its path, explains the terms it used, and says which notebook to open next.

The slice: Llama-3-8B has 32 query heads, 8 KV heads (GQA, 4 query heads per KV head), headdim 128,
causal. We keep one KV head and its 4 query heads, batch 1, so the GQA indexing is exercised
while the float64 reference (which materializes S and P, 4 · seqlen² doubles each) stays small.
Inputs follow the paper's Table 3 distribution, N(0,1) + N(0,100)·Bernoulli(0.001), rounded to
bf16 as a model would hand them over.
"""
from __future__ import annotations

import importlib

from fa3_lab.lab.cli import UsageError

HELP = "run the lab: NumPy references on a Llama-3-8B attention slice, recorded GPU results (kernels on an H100)"

#: Llama-3-8B attention (config.json: num_attention_heads 32, num_key_value_heads 8, head_dim 128).
from .tour_gpu import LLAMA3_8B  # the layer both halves of the tour use
#: The slice the CPU tour runs: one KV head with its query heads.
SLICE = {"batch": 1, "nheads": 4, "nheads_kv": 1, "headdim": 128}
DEFAULT_SEQLEN = 1024
MAX_SEQLEN = 4096  # the float64 reference holds S and P: 4 heads · 4096² · 8 B = 0.5 GB each
SEED = 0

#: Paper Table 3 RMSE vs an FP64 reference (Shah et al. 2024, §4.3), where a row has one.
PAPER_RMSE = {"baseline FP16 (Tab. 3)": 3.2e-4}


def add_arguments(parser) -> None:
    parser.add_argument("--cpu", action="store_true",
                        help="run the NumPy part even when an sm_90 GPU is present")
    parser.add_argument("--seqlen", default=str(DEFAULT_SEQLEN), metavar="N",
                        help=f"sequence length of the slice, 1..{MAX_SEQLEN} (default {DEFAULT_SEQLEN})")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where the tour saves its picture (default: <tmp>/fa3_lab_tour)")


def parse_seqlen(text: str) -> int:
    """``--seqlen`` as an int in 1..MAX_SEQLEN; UsageError (one line) otherwise."""
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"--seqlen: expected an integer 1..{MAX_SEQLEN}, got {text!r}") from None
    if not 1 <= n <= MAX_SEQLEN:
        raise UsageError(f"--seqlen: expected an integer 1..{MAX_SEQLEN}, got {n} "
                         f"(the float64 reference materializes S: {SLICE['nheads']}·seqlen² doubles)")
    return n


def make_inputs(seqlen: int, seed: int = SEED):
    """q (1, seqlen, 4, 128), k, v (1, seqlen, 1, 128) float32 holding bf16 values (Table 3 law)."""
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(shape):
        x = rng.standard_normal(shape) + rng.normal(0.0, 10.0, shape) * (rng.random(shape) < 0.001)
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)

    b, h, hkv, d = SLICE["batch"], SLICE["nheads"], SLICE["nheads_kv"], SLICE["headdim"]
    return draw((b, seqlen, h, d)), draw((b, seqlen, hkv, d)), draw((b, seqlen, hkv, d))


def _flash_forward():
    """reference.flash_forward.flash_attention_forward (the tiled forward, twin of kernel step 01)."""
    return importlib.import_module("reference.flash_forward").flash_attention_forward


def implementations():
    """(name, callable(q, k, v) -> (out, lse)) for every implementation compared to float64."""
    import numpy as np

    from reference.attention import standard_attention

    return [
        ("standard f32 (§2.3)",
         lambda q, k, v: standard_attention(q, k, v, causal=True, dtype=np.float32)),
        ("tiled f64 (twin 01)", lambda q, k, v: _flash_forward()(q, k, v, causal=True)),
        ("tiled f32 (twin 01)",
         lambda q, k, v: _flash_forward()(q, k, v, causal=True, dtype=np.float32)),
        ("baseline FP16 (Tab. 3)",
         lambda q, k, v: standard_attention(q, k, v, causal=True, dtype=np.float16)),
    ]


def compare(seqlen: int, progress=None) -> list[dict]:
    """Run every implementation on the slice and measure it against the float64 reference.

    Returns:
        One dict per implementation: ``name``, ``max_err``, ``mean_err``, ``rmse`` (of
        out, vs float64 ``standard_attention``), ``lse_max_err``.
    """
    import numpy as np

    from reference.attention import standard_attention

    q, k, v = make_inputs(seqlen)
    impls = implementations()
    task = progress.add_task("float64 reference", total=len(impls) + 1) if progress else None
    out_ref, lse_ref = standard_attention(q, k, v, causal=True)
    rows = []
    for name, fn in impls:
        if progress:
            progress.update(task, advance=1, description=name)
        out, lse = fn(q, k, v)
        err = np.abs(np.asarray(out, dtype=np.float64) - out_ref)
        rows.append({"name": name, "max_err": float(err.max()),
                     "mean_err": float(err.mean()), "rmse": float(np.sqrt(np.mean(err ** 2))),
                     "lse_max_err": float(np.max(np.abs(np.asarray(lse, dtype=np.float64) - lse_ref)))})
    if progress:
        progress.update(task, advance=1, description="done")
    return rows


def show_recorded(console, dtypes=("bf16",)) -> list:
    """Print the current run of each GPU (newest first): one line saying what it is, the longest
    sequence of each configuration, and the sentences the README states; [] when none is recorded.

    Returns:
        the grid runs shown (:class:`fa3_lab.lab.results.Run`), newest first.
    """
    from rich import box
    from rich.table import Table

    from fa3_lab.lab import readme, results

    current = results.current_runs()
    if not current:
        console.print("No GPU results are recorded yet: fa3_lab/results/ holds no run "
                      "(they are written on an H100/H200).")
        return []
    shown = []
    for runs in current.values():
        console.print(readme.run_line(runs).replace("**", "").replace("`", ""), soft_wrap=True, markup=False)
        for grid in readme.grid_runs(runs):
            header, rows = readme.compact(grid, dtypes)
            table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False,
                          caption="TFLOPs/s at the longest seqlen; × = our fastest step ÷ that peer, same run; "
                                  "— = not measured in this run", caption_justify="left")
            for col in header:
                table.add_column(col, justify="left" if col in ("dtype", "mask") else "right", no_wrap=True)
            for row in rows:
                table.add_row(*row)
            console.print(table)
            for line in readme.grid_sentences(grid, dtypes[0]):
                console.print(f"- {line}", soft_wrap=True, markup=False)
            shown.append(grid)
        for abl in readme.ablation_runs(runs):
            for d in ("fp16", "bf16"):
                line = readme.ablation_sentence(abl, d)
                if line:
                    console.print(f"- {line}", soft_wrap=True, markup=False)
    console.print("Every row: docs/results.md (and README.md); older runs are archived in tools/experiments/results/.")
    return shown


def save_picture(run, out_dir) -> "Path":
    """The paper's Figure 5 from ``run`` (our fastest step vs FA3, cuDNN, FA2), saved as PNG; the path."""
    from pathlib import Path

    from fa3_lab.lab import readme

    path = Path(out_dir) / readme.figure_path(run).name
    return readme.write_figure(run, path)


#: The words the tour uses, explained once at its end.
TERMS = (
    ("step", "one kernel file cuda/steps/NN_*.cu, one idea on top of its parent (ids: fa3_lab/registry.py)"),
    ("twin", "the NumPy model of a step in reference/, same names in the same order"),
    ("lse", "log-sum-exp of a row of scores: what the forward keeps so the backward can rebuild P"),
    ("RMSE / max err", "error of the output against float64 standard attention (the exact answer)"),
    ("TFLOPs/s", "4·batch·heads·(visible query-key pairs)·headdim ÷ time (fa3_lab.lab.results.flops)"),
    ("FA3 / FA2 / cuDNN", "FlashAttention-3's own kernel, FlashAttention-2 (PyTorch SDPA's flash backend), "
                          "NVIDIA's fused attention (SDPA's cuDNN backend)"),
    ("GQA", "grouped-query attention: several query heads share one K/V head (Llama-3-8B: 32 share 8)"),
)

#: Where to go after the tour.
NEXT = "notebooks/00_setup_and_roofline.ipynb"


def explain_and_point_on(console) -> None:
    from rich.table import Table

    table = Table(title="Terms", title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for term, meaning in TERMS:
        table.add_row(term, meaning)
    console.print(table)
    from rich.markup import escape

    console.print(f"[bold]next:[/] open {NEXT} " + escape(f'(jupyter lab {NEXT}; JupyterLab comes with '
                  f'pip install -e ".[lab]"), then the chapters in order; README.md lists them with the steps each covers.'),
                  soft_wrap=True)


def run_cpu(console, seqlen: int) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    m = LLAMA3_8B
    console.print(f"[bold]NumPy references[/] on a slice of a Llama-3-8B attention layer "
                  f"({m['nheads']} query heads, {m['nheads_kv']} KV heads, headdim {m['headdim']}, causal): "
                  f"batch {SLICE['batch']}, seqlen {seqlen}, {SLICE['nheads']} query heads / "
                  f"{SLICE['nheads_kv']} KV head; bf16 inputs, paper Table 3 law.")
    with Progress(TextColumn("{task.description:<34}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        rows = compare(seqlen, progress)

    table = Table(title="Error of out (and lse) vs float64 standard attention", title_justify="left",
                  caption="max/mean/RMSE of |out − out_ref|; paper: Table 3 RMSE; lse max: max |lse − lse_ref|; "
                          "tiled = reference.flash_forward, the NumPy twin of kernel step 01",
                  caption_justify="left")
    for col in ("implementation", "max", "mean", "RMSE", "paper", "lse max"):
        table.add_column(col, justify="left" if col == "implementation" else "right", no_wrap=True)
    for r in rows:
        paper = PAPER_RMSE.get(r["name"])
        table.add_row(r["name"], f"{r['max_err']:.2e}", f"{r['mean_err']:.2e}",
                      f"{r['rmse']:.2e}", "—" if paper is None else f"{paper:.1e}", f"{r['lse_max_err']:.2e}")
    console.print(table)
    console.print("The paper's RMSE is over its own shapes on an H100; ours is this slice on the CPU.")
    console.print(traffic_line(seqlen))
    return 0


def traffic_line(seqlen: int) -> str:
    """What tiling buys on one full Llama-3-8B layer at this seqlen (bf16, batch 1, causal)."""
    from reference.flash_forward import flash_forward_io, standard_attention_io

    from fa3_lab.lab import results

    h, d = LLAMA3_8B["nheads"], LLAMA3_8B["headdim"]
    flash = flash_forward_io(1, seqlen, seqlen, h, d, causal=True)
    std = standard_attention_io(1, seqlen, seqlen, h, d)
    gflop = results.flops(1, h, seqlen, seqlen, d, True) / 1e9
    return (f"One full layer ({h} heads, bf16, causal, seqlen {seqlen}): {gflop:.1f} GFLOP; HBM traffic "
            f"{std.hbm_bytes / 1e6:.1f} MB for standard attention (S and P written and read) vs "
            f"{flash.hbm_bytes / 1e6:.1f} MB for the tiled forward ({std.hbm_bytes / flash.hbm_bytes:.1f}× less), "
            f"which skips {flash.tiles_skipped} of {flash.tiles_computed + flash.tiles_skipped} "
            f"128×128 tiles under the causal mask.")


def run(args) -> int:
    import tempfile
    from pathlib import Path

    from rich.console import Console

    from fa3_lab import _env

    seqlen = parse_seqlen(args.seqlen)
    out_dir = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "fa3_lab_tour"
    console = Console()
    status = None
    if not args.cpu:
        if _env.sm90_gpu():
            try:
                tour_gpu = importlib.import_module("fa3_lab.lab.tour_gpu")
            except ModuleNotFoundError as e:
                if e.name != "fa3_lab.lab.tour_gpu":
                    raise
                console.print(f"{_env.sm90_gpu()} found, but the kernel part of the tour is not built "
                              "yet (no fa3_lab/lab/tour_gpu.py); running the NumPy part.")
            else:
                console.rule("Live: the kernels on this GPU")
                status = int(tour_gpu.run(console) or 0)
        else:
            console.print(f"Kernels cannot run here ({_env.why_no_sm90()}); running the NumPy part live, "
                          "then showing the GPU results recorded in fa3_lab/results/.")
    if status is None:
        console.rule("Live: the NumPy references on this machine")
        status = run_cpu(console, seqlen)
    console.rule("Recorded: the current GPU run (measured before, not now)")
    grids = show_recorded(console)
    if grids:
        path = save_picture(grids[0], out_dir)
        console.print(f"Picture (the paper's Figure 5, redone from that run): [bold]{path}[/]", soft_wrap=True)
    explain_and_point_on(console)
    return status
