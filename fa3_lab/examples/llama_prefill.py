"""`python -m fa3_lab.examples.llama_prefill` — a Llama-style model's prefill on our kernel vs SDPA.

The model: a Llama architecture built from a config (no download), seeded random weights, bf16 on
the GPU — hidden 2048, 16 query heads and 4 KV heads of headdim 128 (GQA, 4 query heads per KV head),
4 layers, vocab 32000. The same weights run three ways on one batch of 2 × 4096 random tokens:

* ``fa3_lab``: ``attn_implementation="fa3_lab"`` (:mod:`fa3_lab.hf`, our kernel, bf16);
* ``sdpa``: ``attn_implementation="sdpa"`` (PyTorch SDPA as transformers calls it, bf16);
* ``fp32``: SDPA in float32 with the same (bf16-valued) weights — the reference.

Accuracy. The tolerance is FA3's rule (hopper/test_flash_attn.py) lifted to the whole model: our
logits may be at most twice as far from the float32 reference as the SDPA bf16 model's logits are,
plus a floor of 1e-3 × max |reference logit|:

    max |logits_fa3_lab − logits_fp32| ≤ 2 · max |logits_sdpa − logits_fp32| + 1e-3 · max |logits_fp32|

Why this one: any bf16 model differs from float32 by its own rounding (the lm_head alone rounds each
logit to 8 bits of mantissa), so a fixed threshold is either loose or flaky; "no worse than 2× the
bf16 model transformers ships by default" tracks the real error scale, and the floor only matters if
SDPA were (nearly) exact. The direct difference ours − SDPA and the top-1 agreement are printed too.

Time. The attention alone on the layer's shapes, as the model calls it (transformers' sdpa function
vs ours on the same (batch, heads, seqlen, headdim) tensors, and each kernel on BSHD inputs beside the
SDPA backends and the official FA3 when installed), and the whole-model prefill ``model(input_ids)``;
``triton.testing.do_bench`` medians (docs/design.md timing protocol). ``--out PATH`` writes the run as
JSON: ``meta`` and ``rows`` in the docs/design.md schema (the kernel timings) plus ``hf_attention``,
``prefill``, ``logits`` and ``config``.

From Python (the GPU tour calls this): ``run(console) -> dict``, the same dict the JSON holds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import warnings
from pathlib import Path

#: The model (LlamaConfig keyword arguments).
CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=4, head_dim=128, vocab_size=32000, max_position_embeddings=8192,
              rope_theta=500000.0, tie_word_embeddings=False)
BATCH = 2
SEQLEN = 4096
SEED = 0
#: Where the models run (a module constant so that a CPU test can walk the whole flow).
DEVICE = "cuda"
#: The tolerance's floor, relative to max |reference logit|.
TOL_FLOOR_REL = 1e-3
#: The tolerance's factor on the SDPA bf16 model's error (FA3's "2 × same-precision error").
TOL_FACTOR = 2.0


def logits_tolerance(sdpa_err: float, ref_scale: float) -> float:
    """Allowed max |ours − fp32 reference| of the logits: 2 · sdpa_err + 1e-3 · ref_scale.

    Args:
        sdpa_err: max |logits_sdpa − logits_fp32|, a finite float >= 0.
        ref_scale: max |logits_fp32|, a finite float >= 0.

    Raises:
        ValueError: either argument negative, NaN or infinite.

    Source: FA3's tolerance rule (hopper/test_flash_attn.py; docs/design.md "Tests") applied to a model.
    """
    for name, x in (("sdpa_err", sdpa_err), ("ref_scale", ref_scale)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {x!r}")
    return TOL_FACTOR * float(sdpa_err) + TOL_FLOOR_REL * float(ref_scale)


def compare_logits(ours, sdpa, ref) -> dict:
    """Errors of the two bf16 models' logits against the float32 reference, and the verdict.

    Args:
        ours, sdpa: (batch, seqlen, vocab) logits of the fa3_lab and SDPA models (any float dtype).
        ref: the float32 reference model's logits, same shape.

    Returns:
        dict of floats: ``max_abs_ours_vs_ref``, ``max_abs_sdpa_vs_ref``, ``max_abs_ours_vs_sdpa``,
        ``mean_abs_ours_vs_ref``, ``mean_abs_sdpa_vs_ref``, ``ref_scale`` (max |ref|), ``tolerance``
        (:func:`logits_tolerance`), ``within_tolerance`` (bool), ``top1_agreement_ours``/``_sdpa``
        (fraction of positions whose argmax token equals the reference's).

    Raises:
        ValueError: shapes differ, or a NaN/inf in any of them.
    """
    import torch

    if not (ours.shape == sdpa.shape == ref.shape):
        raise ValueError(f"ours, sdpa, ref: expected one shape, got {tuple(ours.shape)}, {tuple(sdpa.shape)}, "
                         f"{tuple(ref.shape)}")
    ref = ref.float()
    for name, t in (("ours", ours), ("sdpa", sdpa), ("ref", ref)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: logits contain NaN or inf")
    d_ours = (ours.float() - ref).abs()
    d_sdpa = (sdpa.float() - ref).abs()
    top = ref.argmax(-1)
    r = {
        "max_abs_ours_vs_ref": d_ours.max().item(),
        "max_abs_sdpa_vs_ref": d_sdpa.max().item(),
        "max_abs_ours_vs_sdpa": (ours.float() - sdpa.float()).abs().max().item(),
        "mean_abs_ours_vs_ref": d_ours.mean().item(),
        "mean_abs_sdpa_vs_ref": d_sdpa.mean().item(),
        "ref_scale": ref.abs().max().item(),
        "top1_agreement_ours": (ours.argmax(-1) == top).float().mean().item(),
        "top1_agreement_sdpa": (sdpa.argmax(-1) == top).float().mean().item(),
    }
    r["tolerance"] = logits_tolerance(r["max_abs_sdpa_vs_ref"], r["ref_scale"])
    r["within_tolerance"] = bool(r["max_abs_ours_vs_ref"] <= r["tolerance"])
    return r


def make_config(**overrides):
    """A fresh ``LlamaConfig`` of :data:`CONFIG` (+ overrides). Each model needs its own: from_config
    writes ``attn_implementation`` into the config object it is given, so a shared one would switch
    the other model too."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**CONFIG, **overrides})


def build_models(device=DEVICE, seed: int = SEED, **overrides) -> dict:
    """{"fa3_lab", "sdpa", "fp32"}: three copies of one seeded random Llama, in eval mode on ``device``.

    ``fa3_lab`` and ``sdpa`` are bf16 with identical weights; ``fp32`` holds the same bf16-rounded
    weights in float32 and runs SDPA (the reference). Registers the fa3_lab backend first.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .. import hf

    hf.register()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(make_config(**overrides), attn_implementation="sdpa")
    base = base.to(dtype=torch.bfloat16)
    ours = AutoModelForCausalLM.from_config(make_config(**overrides), attn_implementation=hf.NAME)
    ours = ours.to(dtype=torch.bfloat16)
    ours.load_state_dict(base.state_dict())
    ref = copy.deepcopy(base).to(dtype=torch.float32)
    models = {"fa3_lab": ours, "sdpa": base, "fp32": ref}
    for name, m in models.items():
        m.to(device).eval()
    if ours.config._attn_implementation != hf.NAME or base.config._attn_implementation != "sdpa":
        raise RuntimeError(f"attn_implementation: expected fa3_lab and sdpa, got "
                           f"{ours.config._attn_implementation} and {base.config._attn_implementation}")
    return models


def _sdpa_choice(q, k, v) -> str:
    """The SDPA backend PyTorch picks for these inputs (causal, GQA), or "unknown"."""
    import torch
    from torch.nn.attention import SDPBackend

    try:
        c = int(torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=q.shape[1] != k.shape[1]))
        return next(n for n, b in SDPBackend.__members__.items() if int(b) == c)
    except Exception:  # a private helper: absent or different on some versions
        return "unknown"


def time_attention(model, batch: int, seqlen: int, seed: int = SEED):
    """Attention timings on one layer's shapes (causal, bf16, GQA).

    Returns:
        (hf_rows, rows): hf_rows — transformers' ``sdpa_attention_forward`` and our
        ``fa3_lab.hf.attention_forward`` on the (batch, heads, seqlen, headdim) tensors a layer hands
        them, each {impl, ms, tflops}, plus the SDPA backend picked; rows — our kernel step and the
        peers (``fa3_lab.lab.bench.peers``: SDPA flash/cuDNN/efficient, official FA3 if installed) on
        BSHD inputs, in the docs/design.md results schema. Our step is the default one (the HF backend's).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .. import api, hf
    from ..lab import bench
    from ..lab.results import flops

    cfg = model.config
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = model.model.layers[0].self_attn
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, h, seqlen, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, hkv, seqlen, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, hkv, seqlen, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    fl = flops(batch, h, seqlen, seqlen, d, True)
    step = api.default_step(d)

    def row(impl, ms):
        return {"impl": impl, "ms": ms, "tflops": fl / ms / 1e9}

    with torch.inference_mode():
        hf_rows = [
            row("hf sdpa", bench.time_ms(lambda: sdpa_attention_forward(layer, q, k, v, None, scaling=layer.scaling))),
            row("hf fa3_lab", bench.time_ms(lambda: hf.attention_forward(layer, q, k, v, None, scaling=layer.scaling))),
        ]
        hf_rows[0]["backend"] = _sdpa_choice(q, k, v)
        hf_rows[1]["backend"] = f"step{step:02d}"
        qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        impls = {f"step{step:02d}": lambda: api.flash_attn_func(qb, kb, vb, causal=True, step=step)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for name, fn in bench.peers().items():
                if name != "sdpa_math":  # standard attention: S and P of every head in memory, not a peer here
                    impls[name] = lambda fn=fn: fn(qb, kb, vb, True)
            rows = []
            for name, fn in impls.items():
                try:
                    ms = bench.time_ms(fn)
                except RuntimeError as e:  # a backend that refuses these inputs (e.g. no GQA): left out, said
                    print(f"llama_prefill: {name} skipped: {str(e).splitlines()[0]}", file=sys.stderr)
                    continue
                rows.append({"impl": name, "dtype": "bf16", "headdim": d, "causal": True, "batch": batch,
                             "seqlen_q": seqlen, "seqlen_k": seqlen, "nheads": h, "nheads_kv": hkv,
                             "ms": ms, "tflops": fl / ms / 1e9})
    return hf_rows, rows


def run(console, *, batch: int = BATCH, seqlen: int = SEQLEN, out=None, seed: int = SEED, **overrides) -> dict:
    """Build the models, compare the logits, time attention and prefill, print tables; return the run.

    Args:
        console: a ``rich.console.Console``.
        batch, seqlen: the prefill batch (random token ids, seeded). Our kernel runs its default step.
        out: optional path; the run is written there as JSON.
        seed: weights and tokens.
        **overrides: LlamaConfig fields (e.g. ``num_hidden_layers=1`` for a quick run).

    Returns:
        dict: ``meta``, ``rows`` (kernel timings, docs/design.md schema), ``hf_attention``, ``prefill``
        ({model: ms, tokens_per_s}), ``logits`` (:func:`compare_logits`), ``config``, ``ok``.

    Raises:
        RuntimeError: no sm_90 GPU.  ImportError: transformers or triton missing.
    """
    import torch
    from rich.table import Table

    from .. import _env
    from ..lab import bench, results

    reason = _env.why_no_sm90()
    if reason:
        raise RuntimeError(f"llama_prefill needs an sm_90 GPU (H100/H200): {reason}")
    for name, x in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {x!r}")
    cfg = {**CONFIG, **overrides}
    console.print(f"[bold]{torch.cuda.get_device_name(0)}[/]: Llama-style model, {cfg['num_hidden_layers']} layers, "
                  f"hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV "
                  f"heads of {cfg['head_dim']}, vocab {cfg['vocab_size']}, random weights (seed {seed}), bf16; "
                  f"prefill of {batch} × {seqlen} tokens.")
    with console.status("building the models and the kernels…"):
        models = build_models(DEVICE, seed, **overrides)
        from .. import _build

        _build.load()
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seqlen), device=DEVICE, generator=g)

    with torch.inference_mode(), console.status("prefill: logits of the three models…"):
        logits = {name: m(ids).logits for name, m in models.items()}
    acc = compare_logits(logits["fa3_lab"], logits["sdpa"], logits["fp32"])
    del logits
    torch.cuda.empty_cache()

    with console.status("timing attention and prefill (do_bench medians)…"):
        hf_rows, rows = time_attention(models["sdpa"], batch, seqlen, seed)
        prefill = {}
        with torch.inference_mode():
            for name in ("fa3_lab", "sdpa"):
                ms = bench.time_ms(lambda m=models[name]: m(ids))
                prefill[name] = {"ms": ms, "tokens_per_s": batch * seqlen / ms * 1e3}

    t = Table(title=f"Logits vs the float32 model (tolerance: {TOL_FACTOR:g} × SDPA bf16's max error "
                    f"+ {TOL_FLOOR_REL:g} × max |logit| = {acc['tolerance']:.3g})", title_justify="left")
    for col in ("model", "max |Δ| vs fp32", "mean |Δ| vs fp32", "top-1 = fp32", "within tolerance"):
        t.add_column(col, justify="left" if col == "model" else "right")
    t.add_row("fa3_lab (bf16)", f"{acc['max_abs_ours_vs_ref']:.3g}", f"{acc['mean_abs_ours_vs_ref']:.3g}",
              f"{acc['top1_agreement_ours']:.2%}", "yes" if acc["within_tolerance"] else "[red]NO[/]")
    t.add_row("sdpa (bf16)", f"{acc['max_abs_sdpa_vs_ref']:.3g}", f"{acc['mean_abs_sdpa_vs_ref']:.3g}",
              f"{acc['top1_agreement_sdpa']:.2%}", "—")
    console.print(t)
    console.print(f"max |fa3_lab − sdpa| = {acc['max_abs_ours_vs_sdpa']:.3g} "
                  f"({acc['max_abs_ours_vs_sdpa'] / acc['ref_scale']:.2%} of max |logit| {acc['ref_scale']:.3g})")

    t = Table(title=f"Attention, one layer's shapes (batch {batch}, seqlen {seqlen}, causal), median ms",
              title_justify="left")
    for col in ("implementation", "ms", "TFLOPs/s"):
        t.add_column(col, justify="left" if col == "implementation" else "right")
    for r in hf_rows:
        t.add_row(f"{r['impl']} ({r['backend']})", f"{r['ms']:.3f}", f"{r['tflops']:.0f}")
    for r in rows:
        t.add_row(f"{r['impl']} (BSHD)", f"{r['ms']:.3f}", f"{r['tflops']:.0f}")
    console.print(t)
    t = Table(title=f"Whole-model prefill, model(input_ids), {batch} × {seqlen} tokens, median ms",
              title_justify="left")
    for col in ("model", "ms", "tokens/s", "speed-up"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name in ("sdpa", "fa3_lab"):
        p = prefill[name]
        t.add_row(name, f"{p['ms']:.2f}", f"{p['tokens_per_s']:,.0f}", f"{prefill['sdpa']['ms'] / p['ms']:.2f}×")
    console.print(t)

    doc = {"meta": results.collect_meta("python -m fa3_lab.examples.llama_prefill"), "rows": rows,
           "hf_attention": hf_rows, "prefill": prefill, "logits": acc,
           "config": {**cfg, "batch": batch, "seqlen": seqlen, "seed": seed, "dtype": "bf16"},
           "ok": acc["within_tolerance"]}
    results.validate(doc)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        console.print(f"wrote {path}")
    return doc


def main(argv=None) -> int:
    """Command line: ``[--batch N] [--seqlen N] [--layers N] [--out PATH]``; exit 0 if within tolerance,
    1 if not, 2 for bad arguments or a machine that cannot run it (no sm_90 GPU, no transformers)."""
    parser = argparse.ArgumentParser(prog="python -m fa3_lab.examples.llama_prefill", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH, help=f"prefill batch (default {BATCH})")
    parser.add_argument("--seqlen", type=int, default=SEQLEN, help=f"tokens per sequence (default {SEQLEN})")
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                        help=f"decoder layers (default {CONFIG['num_hidden_layers']})")
    parser.add_argument("--out", default=None, metavar="PATH", help="write the run as JSON here")
    args = parser.parse_args(argv)
    for name in ("batch", "seqlen", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    from rich.console import Console

    from .. import _env

    console = Console()
    reason = _env.why_no_sm90()
    if reason:
        console.print(f"llama_prefill needs an sm_90 GPU (H100/H200): {reason}")
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        console.print("llama_prefill needs transformers: pip install transformers")
        return 2
    doc = run(console, batch=args.batch, seqlen=args.seqlen, out=args.out, num_hidden_layers=args.layers)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
