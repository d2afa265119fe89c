"""`python -m fa3_lab bench` — our kernel steps against the peers, docs/design.md's timing protocol.

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, median of many runs); inputs fresh from
N(0, 1) per shape; every implementation in the same process on the same inputs. Peers: PyTorch SDPA
with the FLASH_ATTENTION backend (FlashAttention-2), CUDNN_ATTENTION (cuDNN), EFFICIENT_ATTENTION,
MATH (standard attention, only where its S/P fit in memory), and the official FlashAttention-3
forward (PyPI ``fa3-fwd``) when importable. TFLOPs/s = FLOPs / time with FLOPs from
:func:`fa3_lab.lab.results.flops` (4·b·h·sq·sk·d, causal counts only the visible keys).
"""
from __future__ import annotations

import statistics
import warnings

from .cli import UsageError
from .results import flops

HELP = "benchmark the kernel steps against SDPA (FA2), cuDNN and the official FA3 on this GPU"

PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096, 16384)
TOTAL_TOKENS = 16384
HIDDEN = 2048
# Timing rounds per configuration. One do_bench per implementation, run one after the other, moved by
# 3–15 % between grid runs on the same GPU (clocks and temperature drift within a run; NOTES.md, session 4);
# rounds in rotating order put every implementation through the same drift, as tools/experiments/ab.py does.
# 5, not 3: at the 700 W limit a kernel slows by 9–13 % within the first 130 ms of back-to-back calls
# (tools/experiments/regime.py, experiments/…/regime_e31e1b7.txt), so one do_bench median depends on what ran
# before it; with 3 rounds one such round moved a grid ratio by up to 4 % (NOTES.md, session 7). The
# ablation (one shape per dtype) used 5 before the grid did: 3 rounds left 15 % between them there.
ROUNDS = 5
ABLATION = dict(batch=4, seqlen=8448, nheads=16, headdim=128)  # paper Table 2
PAPER_ABLATION_TFLOPS = {"step01": 570, "step02": 582, "step03": 620, "step04": 661}  # see NOTES.md


def add_arguments(p):
    p.add_argument("--quick", action="store_true", help=f"seqlens {QUICK_SEQLENS}, bf16 only")
    p.add_argument("--ablation", action="store_true", help="the paper's Table 2 configuration, every forward step")
    p.add_argument("--backward", action="store_true",
                   help="the backward (bwd alone and fwd+bwd) of our default backward step vs cuDNN's and FA2's "
                        "(SDPA backends), the paper grid; writes bench_backward.json")
    p.add_argument("--deterministic", action="store_true",
                   help="--backward: also time the last backward step with deterministic=True (impl stepNN_det)")
    p.add_argument("--passes", default=None,
                   help="--backward: comma list from bwd,fwd_bwd (default both; an ablation of many steps: bwd)")
    p.add_argument("--fp8", action="store_true",
                   help="FP8: step 05 (kernel alone, plus quantize time) vs FA3's e4m3 forward and our default bf16 "
                        "step")
    p.add_argument("--dtypes", default=None, help="comma list of bf16,fp16 (default both; --quick: bf16)")
    p.add_argument("--headdims", default="64,128,256", help="comma list from 64,128,256")
    p.add_argument("--seqlens", default=None, help="comma list of seqlens (default the paper grid)")
    p.add_argument("--causal", choices=["both", "true", "false"], default="both")
    p.add_argument("--steps", default=None, help="comma list of step ids (default all 16-bit steps)")
    p.add_argument("--no-peers", action="store_true", help="time only our steps")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help=f"interleaved rounds per config, implementations in rotating order; ms is the median of the "
                        f"rounds' do_bench medians (default {ROUNDS})")
    p.add_argument("--name", default=None, help="results file name (default bench / bench_quick / ablation)")
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")


def _int_list(text, name, allowed=None):
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name}: expected a comma list of integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"--{name}: expected positive integers, got {text!r}")
    if allowed is not None and any(v not in allowed for v in vals):
        raise UsageError(f"--{name}: expected values from {allowed}, got {text!r}")
    return vals


def peers():
    """{impl: callable(q, k, v, causal) -> out} for the peers importable here (BSHD inputs)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def fn(q, k, v, causal):
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "kernel X not used because …" per backend probe
                group = q.shape[2] // k.shape[2]
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=causal, enable_gqa=group > 1).transpose(1, 2)
        return fn

    out = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
           "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION), "sdpa_math": sdpa(SDPBackend.MATH)}
    try:
        from fa3_fwd_interface import flash_attn_func as fa3_func

        def fa3(q, k, v, causal):
            r = fa3_func(q, k, v, causal=causal)
            return r[0] if isinstance(r, tuple) else r
        out["fa3"] = fa3
    except Exception:  # not installed: the row is simply absent (reported in the table header)
        pass
    return out


def time_ms(fn):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rotating_rounds(jobs, rounds, on_error=None):
    """Run every job once per round, the order rotated by one from round to round, so that drift in
    clocks and temperature within a run hits every job alike (the ``--rounds`` protocol; also used by
    ``tools/experiments/ab.py``).

    jobs: ``{name: measure}``, ``measure(first)`` returns one round's value; ``first`` is True in round 0.
    on_error: ``on_error(name, exc)`` for a job that raises; the job is then not run again and its name
    is in the returned ``dropped`` set. Without it the exception propagates (as it may from on_error).
    Returns ``(values, dropped)``: ``values[name]`` is the list of the rounds' values.
    """
    names = list(jobs)
    values, dropped = {name: [] for name in names}, set()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in dropped:
                continue
            try:
                values[name].append(jobs[name](r == 0))
            except Exception as e:
                if on_error is None:
                    raise
                dropped.add(name)
                on_error(name, e)
    return values, dropped


def round_timer(fn, warm_every_round=False):
    """A :func:`rotating_rounds` job timing ``fn``: a warm-up call and a device sync before the first round
    (every round with ``warm_every_round``, as tools/experiments/ab.py), then one :func:`time_ms`."""
    def run(first):
        if first or warm_every_round:
            import torch

            fn()
            torch.cuda.synchronize()
        return time_ms(fn)
    return run


def _check_rounds(rounds):
    if rounds < 1:
        raise UsageError(f"--rounds: expected a positive integer, got {rounds}")


def run_grid(configs, step_ids, with_peers=True, progress=None, rounds=ROUNDS):
    """Time every (impl, config); returns rows in the docs/design.md schema.

    configs: iterable of dicts with dtype, headdim, causal, batch, seqlen, nheads, nheads_kv.
    rounds: per config, every implementation is timed once per round (``time_ms``: a do_bench median),
    the order rotating from round to round; a row's ``ms`` is the median over rounds and ``ms_rounds``
    keeps them all. An implementation that raises in the first round (a peer without this config) gets
    no row, and ``progress`` is told why.

    Raises:
        UsageError: rounds < 1.
    """
    _check_rounds(rounds)
    import torch

    import fa3_lab

    peer_fns = peers() if with_peers else {}
    rows = []
    for cfg in configs:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
        b, s, h, hkv, d = cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["nheads_kv"], cfg["headdim"]
        q = torch.randn(b, s, h, d, device="cuda", dtype=dt)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=dt)
        v = torch.randn(b, s, hkv, d, device="cuda", dtype=dt)
        fl = flops(b, h, s, s, d, cfg["causal"])
        impls = {f"step{n:02d}": (lambda n=n: fa3_lab.flash_attn_func(q, k, v, causal=cfg["causal"], step=n))
                 for n in step_ids}
        for name, fn in peer_fns.items():
            if name == "sdpa_math" and b * h * s * s * 4 * 3 > 20e9:
                continue  # S and P in fp32 would not fit comfortably
            impls[name] = lambda fn=fn: fn(q, k, v, cfg["causal"])
        def skipped(impl, e):  # a peer that does not support this config: say so, no row
            if progress:
                progress(f"{impl} skipped for {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            torch.cuda.synchronize()

        times, dropped = rotating_rounds({impl: round_timer(fn) for impl, fn in impls.items()}, rounds, skipped)
        for impl in impls:
            if impl in dropped or not times[impl]:
                continue
            ms = statistics.median(times[impl])
            rows.append({"impl": impl, "dtype": cfg["dtype"], "headdim": d, "causal": cfg["causal"], "batch": b,
                         "seqlen_q": s, "seqlen_k": s, "nheads": h, "nheads_kv": hkv, "ms": round(ms, 5),
                         "tflops": round(fl / ms / 1e9, 2), "ms_rounds": [round(t, 5) for t in times[impl]]})
        del q, k, v
        torch.cuda.empty_cache()
        if progress:
            progress(None)
    return rows


BWD_PASSES = ("bwd", "fwd_bwd")


def backward_passes(text):
    """``--passes``: a comma list from :data:`BWD_PASSES` -> a tuple in that order.

    Raises:
        UsageError: empty, or a name not in :data:`BWD_PASSES` (the message names it and the choices).
    """
    got = [t.strip() for t in (text or "").split(",") if t.strip()]
    bad = [t for t in got if t not in BWD_PASSES]
    if not got or bad:
        raise UsageError(f"--passes: expected a comma list from {','.join(BWD_PASSES)}, got {text!r}")
    return tuple(p for p in BWD_PASSES if p in got)


def run_backward_grid(configs, bwd_step_ids, with_peers=True, progress=None, rounds=ROUNDS, deterministic=False,
                      passes=BWD_PASSES):
    """Time the backward: rows with ``"pass": "bwd"`` (``torch.autograd.grad`` of a saved forward with a
    fixed dout, docs/design.md) and ``"fwd_bwd"`` (forward and backward together), for our backward steps
    (``flash_attn_func(..., bwd_step=N)``'s autograd) and the peers' backward through SDPA's CUDNN_ATTENTION
    (``cudnn``) and FLASH_ATTENTION (``sdpa_flash``, FlashAttention-2) backends; rounds rotate as in
    :func:`run_grid`. TFLOPs/s use 2.5 × (bwd) and 3.5 × (fwd_bwd) the forward FLOPs. ``deterministic``: the last
    of ``bwd_step_ids`` also runs with ``deterministic=True`` (dQ added in n_block order), as impl ``stepNN_det``.
    ``passes``: which of :data:`BWD_PASSES` to time (an ablation of many steps may time ``("bwd",)`` alone).

    Raises:
        UsageError: rounds < 1; ``passes`` empty or not from :data:`BWD_PASSES`.
    """
    if not passes or any(p not in BWD_PASSES for p in passes):
        raise UsageError(f"passes: expected a non-empty subset of {BWD_PASSES}, got {passes!r}")
    _check_rounds(rounds)
    import torch

    import fa3_lab

    peer_fns = {k: v for k, v in (peers() if with_peers else {}).items() if k in ("cudnn", "sdpa_flash")}
    rows = []
    for cfg in configs:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
        b, s, h, hkv, d = cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["nheads_kv"], cfg["headdim"]
        q = torch.randn(b, s, h, d, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(b, s, hkv, d, device="cuda", dtype=dt, requires_grad=True)
        dout = torch.randn(b, s, h, d, device="cuda", dtype=dt)
        fl = flops(b, h, s, s, d, cfg["causal"])
        fwd = {f"step{n:02d}": (lambda q, k, v, n=n: fa3_lab.flash_attn_func(q, k, v, causal=cfg["causal"],
                                                                             bwd_step=n))
               for n in bwd_step_ids}
        if deterministic:
            n = bwd_step_ids[-1]
            fwd[f"step{n:02d}_det"] = lambda q, k, v, n=n: fa3_lab.flash_attn_func(q, k, v, causal=cfg["causal"],
                                                                                 bwd_step=n, deterministic=True)
        fwd.update({name: (lambda q, k, v, fn=fn: fn(q, k, v, cfg["causal"])) for name, fn in peer_fns.items()})
        jobs, saved = {}, {}
        for name, f in fwd.items():
            def bwd(f=f, name=name):
                if name not in saved:
                    saved[name] = f(q, k, v)
                return torch.autograd.grad(saved[name], (q, k, v), dout, retain_graph=True)
            if "bwd" in passes:
                jobs[(name, "bwd")] = round_timer(bwd)
            if "fwd_bwd" in passes:
                jobs[(name, "fwd_bwd")] = round_timer(lambda f=f: torch.autograd.grad(f(q, k, v), (q, k, v), dout))

        def skipped(key, e):
            if key[0].startswith("step"):
                raise e  # our kernel failing is an error, not a missing row
            if progress:
                progress(f"{key[0]} {key[1]} skipped for {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            torch.cuda.synchronize()

        times, dropped = rotating_rounds(jobs, rounds, skipped)
        for (impl, pass_) in jobs:
            if (impl, pass_) in dropped or not times[(impl, pass_)]:
                continue
            ms = statistics.median(times[(impl, pass_)])
            rows.append({"impl": impl, "dtype": cfg["dtype"], "pass": pass_, "headdim": d, "causal": cfg["causal"],
                         "batch": b, "seqlen_q": s, "seqlen_k": s, "nheads": h, "nheads_kv": hkv,
                         "ms": round(ms, 5), "tflops": round(fl * {"bwd": 2.5, "fwd_bwd": 3.5}[pass_] / ms / 1e9, 2),
                         "ms_rounds": [round(x, 5) for x in times[(impl, pass_)]]})
        del q, k, v, dout, saved
        torch.cuda.empty_cache()
        if progress:
            progress(None)
    return rows


def grid_configs(dtypes, headdims, seqlens, causals):
    for dtype in dtypes:
        for d in headdims:
            for causal in causals:
                for s in seqlens:
                    nheads = HIDDEN // d
                    yield dict(dtype=dtype, headdim=d, causal=causal, batch=max(1, TOTAL_TOKENS // s), seqlen=s,
                               nheads=nheads, nheads_kv=nheads)


def format_table(rows, title=""):
    """Rich table: one line per config, TFLOPs per impl, and ratios of our best step to each peer."""
    from rich.table import Table

    keys = sorted({(r["dtype"], r["headdim"], r["causal"], r["seqlen_q"]) for r in rows})
    impls = sorted({r["impl"] for r in rows}, key=lambda i: (not i.startswith("step"), i))
    ours = [i for i in impls if i.startswith("step") and not i.endswith("_det")]  # best: of the default modes
    theirs = [i for i in impls if not i.startswith("step")]
    t = Table(title=title)
    for col in ["dtype", "hdim", "causal", "seqlen"] + impls + [f"best/{p}" for p in theirs]:
        t.add_column(col, justify="right")
    for key in keys:
        got = {r["impl"]: r["tflops"] for r in rows if (r["dtype"], r["headdim"], r["causal"], r["seqlen_q"]) == key}
        best = max((got[i] for i in ours if i in got), default=None)
        cells = [key[0], str(key[1]), "yes" if key[2] else "no", str(key[3])]
        cells += [f"{got[i]:.0f}" if i in got else "—" for i in impls]
        cells += [f"{best / got[p]:.2f}×" if best and p in got else "—" for p in theirs]
        t.add_row(*cells)
    return t


def run(args):
    from rich.console import Console

    from .. import _env

    console = Console()
    reason = _env.why_no_sm90()
    if reason:
        console.print(f"bench needs an sm_90 GPU: {reason}. Recorded results: fa3_lab/results/ "
                      f"(README table, notebook 06).")
        return 1
    from .. import api

    step_ids = [s.id for s in api.steps() if s.series == "fwd" and "bf16" in s.dtypes]
    if args.steps and not args.backward:
        step_ids = _int_list(args.steps, "steps", allowed=tuple(step_ids))
    headdims = _int_list(args.headdims, "headdims", allowed=(64, 128, 256))
    if args.fp8:
        return run_fp8(console, args)
    if args.deterministic and not args.backward:
        raise UsageError("--deterministic: only with --backward (the forward has no accumulation order)")
    if args.passes is not None and not args.backward:
        raise UsageError("--passes: only with --backward (the forward grid has one pass)")
    passes = backward_passes(args.passes) if args.passes is not None else BWD_PASSES
    if args.backward and args.ablation:
        raise UsageError("--backward: not with --ablation (the backward ablation times the backward steps: "
                         "--backward --steps 11,12,…)")
    if args.ablation:
        a = ABLATION
        configs = [dict(dtype=dt, headdim=a["headdim"], causal=False, batch=a["batch"], seqlen=a["seqlen"],
                        nheads=a["nheads"], nheads_kv=a["nheads"]) for dt in ("bf16", "fp16")]
        name = args.name or "ablation"
    else:
        dtypes = (args.dtypes or ("bf16" if args.quick else "bf16,fp16")).split(",")
        if any(d not in ("bf16", "fp16") for d in dtypes):
            raise UsageError(f"--dtypes: expected a comma list of bf16,fp16, got {args.dtypes!r}")
        seqlens = _int_list(args.seqlens, "seqlens") if args.seqlens else (QUICK_SEQLENS if args.quick else PAPER_SEQLENS)
        causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
        configs = list(grid_configs(dtypes, headdims, seqlens, causals))
        name = args.name or ("bench_backward" if args.backward else "bench_quick" if args.quick else "bench")

    from rich.progress import Progress

    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("timing", total=len(configs))

        def progress(msg):
            if msg is None:
                prog.advance(task)
            else:
                console.print(f"[dim]{msg}[/dim]")

        if args.backward:
            bwd_ids = [s.id for s in api.steps() if s.series == "bwd"]
            if not bwd_ids:
                raise UsageError("--backward: no backward step (cuda/steps/bwd/) in this build")
            if args.steps:
                bwd_ids = _int_list(args.steps, "steps", allowed=tuple(bwd_ids))
            rows = run_backward_grid(configs, bwd_ids, with_peers=not args.no_peers, progress=progress,
                                     rounds=args.rounds, deterministic=args.deterministic, passes=passes)
        else:
            rows = run_grid(configs, step_ids, with_peers=not args.no_peers, progress=progress, rounds=args.rounds)
    from . import results

    meta = results.collect_meta(command="python -m fa3_lab bench " + " ".join(_argv_tail(args)))
    for pass_ in ("fwd", "bwd", "fwd_bwd"):
        got = [r for r in rows if r.get("pass", "fwd") == pass_]
        if got:
            what = {"fwd": "forward", "bwd": "backward (2.5 × forward FLOPs)", "fwd_bwd": "forward + backward (3.5 ×)"}
            console.print(format_table(got, title=f"{meta['gpu']} — {what[pass_]}, TFLOPs/s (median of {args.rounds} "
                                                  f"rounds of do_bench), {meta['date']}"))
    if not args.no_save:
        path = results.save(name, rows, meta)
        console.print(f"saved {path}")
    return 0


def _argv_tail(args):
    import sys

    return sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []


FP8_SEQLENS = (4096, 8192, 16384)


def _median_fp8_row(rounds, fl):
    """One step-05 row from the rounds' :func:`fa3_lab.time_quantize_vs_kernel` rows: every time
    (``ms``, ``quantize_ms``, ``quantize_torch_ms``, ``v_layout_ms``) the median over rounds, and the
    rates recomputed from those medians (``quantize_gbps`` scaled by the quantize time's ratio)."""
    row = dict(rounds[0])
    for key in ("ms", "quantize_ms", "quantize_torch_ms", "v_layout_ms"):
        row[key] = statistics.median(r[key] for r in rounds)
    row["quantize_gbps"] = rounds[0]["quantize_gbps"] * rounds[0]["quantize_ms"] / row["quantize_ms"]
    row["tflops"] = fl / row["ms"] / 1e9
    row["tflops_with_quantize"] = fl / (row["ms"] + row["quantize_ms"]) / 1e9
    row["ms_rounds"] = [round(r["ms"], 5) for r in rounds]
    return row


def run_fp8(console, args):
    """FP8 rows (paper §4.1 Fig. 7 shapes, non-causal): step 05 kernel alone, with its fused quantize
    kernel (``quantize_ms``, ``tflops_with_quantize``; the torch path's ``quantize_torch_ms`` and
    ``v_layout_ms`` ride along as extra keys), the official FA3 e4m3 forward (inputs already e4m3: it
    is timed without any quantization), and our bf16 default step."""
    import torch

    import fa3_lab

    from .. import api, fp8
    from . import results

    headdims = [d for d in _int_list(args.headdims, "headdims", allowed=(64, 128, 256)) if d in (128, 256)] or [128, 256]
    peer = peers().get("fa3")
    rows = []
    rounds = args.rounds
    _check_rounds(rounds)
    from rich.progress import Progress

    prog = Progress(console=console, transient=True)
    task = prog.add_task("FP8 grid (the first call builds the kernels: minutes)", total=len(headdims) * len(FP8_SEQLENS))
    prog.start()
    for d in headdims:
        for s in FP8_SEQLENS:
            prog.update(task, advance=1, description=f"FP8 headdim {d} seqlen {s}")
            b, h = max(1, TOTAL_TOKENS // s), HIDDEN // d
            q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            fl = flops(b, h, s, s, d, False)
            impls = {"step04_bf16": ("step%02d" % api.default_step(d), "bf16",
                                     lambda: fa3_lab.flash_attn_func(q, k, v))}
            if peer is not None:
                q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
                impls["fa3_e4m3"] = ("fa3", "e4m3", lambda: peer(q8, k8, v8, False))
            # rounds in rotating order (as run_grid): step 05 with its quantize timings, the peers
            def skipped(key, e):
                if key == "step05":  # our kernel failing is an error, not a skipped row
                    raise e
                impl, dtype, _ = impls[key]
                console.print(f"[dim]{impl} {dtype} skipped for d={d} s={s}: {type(e).__name__}: "
                              f"{str(e)[:100]}[/dim]")

            jobs = {"step05": lambda first: time_quantize_vs_kernel(b, s, h, d, False)}
            jobs.update({key: round_timer(fn) for key, (_, _, fn) in impls.items()})
            times, dropped = rotating_rounds(jobs, rounds, skipped)
            rows.append(_median_fp8_row(times["step05"], fl))
            for key, (impl, dtype, _) in impls.items():
                if key in dropped or not times[key]:
                    continue
                ms = statistics.median(times[key])
                rows.append({"impl": impl, "dtype": dtype, "headdim": d, "causal": False, "batch": b, "seqlen_q": s,
                             "seqlen_k": s, "nheads": h, "nheads_kv": h, "ms": round(ms, 5),
                             "tflops": round(fl / ms / 1e9, 2), "ms_rounds": [round(t, 5) for t in times[key]]})
    prog.stop()
    meta = results.collect_meta(command="python -m fa3_lab bench " + (" ".join(_argv_tail(args)) or "--fp8"))
    from rich.table import Table

    t = Table(title=f"{meta['gpu']} — FP8 forward, TFLOPs/s (median of {args.rounds} rounds of do_bench), {meta['date']}")
    for col in ("hdim", "seqlen", "step05 e4m3", "+quantize", "quantize ms", "GB/s", "torch quantize ms",
                "FA3 e4m3", "ours bf16", "step05/FA3", "step05/bf16"):
        t.add_column(col, justify="right")
    for d in headdims:
        for s in FP8_SEQLENS:
            got = {(r["impl"], r["dtype"]): r for r in rows if r["headdim"] == d and r["seqlen_q"] == s}
            ours = got.get(("step05", "e4m3"))
            fa3 = got.get(("fa3", "e4m3"))
            bf = next((r for (i, dt), r in got.items() if dt == "bf16"), None)
            torch_q = (ours["quantize_torch_ms"] + ours["v_layout_ms"]) if ours else None   # what it replaces
            t.add_row(str(d), str(s), f"{ours['tflops']:.0f}" if ours else "—",
                      f"{ours['tflops_with_quantize']:.0f}" if ours else "—",
                      f"{ours['quantize_ms']:.3f}" if ours else "—", f"{ours['quantize_gbps']:.0f}" if ours else "—",
                      f"{torch_q:.3f}" if ours else "—",
                      f"{fa3['tflops']:.0f}" if fa3 else "—", f"{bf['tflops']:.0f}" if bf else "—",
                      f"{ours['tflops'] / fa3['tflops']:.2f}×" if ours and fa3 else "—",
                      f"{ours['tflops'] / bf['tflops']:.2f}×" if ours and bf else "—")
    console.print(t)
    if not args.no_save:
        console.print(f"saved {results.save(args.name or 'bench_fp8', rows, meta)}")
    return 0


def time_quantize_vs_kernel(batch, seqlen, nheads, headdim, causal=False, *, nheads_kv=None,
                            block_quant=True, incoherent=True, seed=0) -> dict:
    """Time the parts of :func:`fa3_lab.flash_attn_fp8_func` on fresh N(0,1) bf16 inputs (GPU only).

    Median of ``triton.testing.do_bench`` (CUDA events) for: the fused quantize kernel
    (``ext.quantize_fp8``, what :func:`fa3_lab.fp8.quantize_for_kernel` launches, without its inf/NaN
    read-back), the torch path it replaces (:func:`fa3_lab.fp8.quantize`, then :func:`fa3_lab.fp8.kernel_v_layout` timed
    separately) and the attention kernel ``ext.fwd_fp8`` alone. ``seed`` seeds the inputs; the
    rotation uses seed 0 as :func:`fa3_lab.flash_attn_fp8_func` does.

    Returns:
        A row in the results schema (docs/design.md): impl "step05", dtype "e4m3", the shape, ``ms``
        and ``tflops`` of the attention kernel alone, plus ``quantize_ms`` (fused kernel),
        ``quantize_gbps`` (:func:`fa3_lab.fp8.quantize_bytes` / quantize_ms), ``tflops_with_quantize`` (FLOPs
        / (ms + quantize_ms)), ``quantize_torch_ms`` and ``v_layout_ms`` (the torch path),
        ``block_quant``, ``incoherent``.

    Raises:
        RuntimeError: no sm_90 GPU.  ValueError / TypeError: as :func:`fa3_lab.fp8.quantize_for_kernel`.
    """
    import torch

    from ..fp8 import (BLOCK_M, BLOCK_N, _check_quantized, _load_ext, _signs_cpu, kernel_v_layout, quantize,
                       quantize_bytes, quantize_for_kernel)
    from .results import flops as attention_flops

    nheads_kv = nheads if nheads_kv is None else nheads_kv
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, seqlen, nheads_kv, headdim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, seqlen, nheads_kv, headdim, device="cuda", dtype=torch.bfloat16, generator=g)
    t = quantize_for_kernel(q, k, v, block_quant=block_quant, incoherent=incoherent)
    scale = _check_quantized(*t[:6], None, None, vt=True, caller="time_quantize_vs_kernel")
    ext = _load_ext("time_quantize_vs_kernel", need_fwd=True)
    signs = _signs_cpu(headdim, 0) if incoherent else None
    fused_ms = time_ms(lambda: ext.quantize_fp8(q, k, v, signs, block_quant))
    torch_ms = time_ms(lambda: quantize(q, k, v, block_quant=block_quant, incoherent=incoherent))
    v8 = quantize(q, k, v, block_quant=block_quant, incoherent=incoherent).v8
    layout_ms = time_ms(lambda: kernel_v_layout(v8))
    kernel_ms = time_ms(lambda: ext.fwd_fp8(t.q8, t.k8, t.vt8, t.q_descale, t.k_descale, t.v_descale,
                                            BLOCK_M, BLOCK_N, bool(causal), scale, None))
    flops = attention_flops(batch, nheads, seqlen, seqlen, headdim, bool(causal))
    nbytes = quantize_bytes(batch, seqlen, seqlen, nheads, nheads_kv, headdim)
    return {"impl": "step05", "dtype": "e4m3", "headdim": headdim, "causal": bool(causal), "batch": batch,
            "seqlen_q": seqlen, "seqlen_k": seqlen, "nheads": nheads, "nheads_kv": nheads_kv,
            "ms": kernel_ms, "tflops": flops / (kernel_ms * 1e-3) / 1e12,
            "quantize_ms": fused_ms, "quantize_gbps": nbytes / (fused_ms * 1e-3) / 1e9,
            "tflops_with_quantize": flops / ((kernel_ms + fused_ms) * 1e-3) / 1e12,
            "quantize_torch_ms": torch_ms, "v_layout_ms": layout_ms,
            "block_quant": bool(block_quant), "incoherent": bool(incoherent)}
