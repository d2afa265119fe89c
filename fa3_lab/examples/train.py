"""`python -m fa3_lab.examples.train` — train a Llama-style model on our forward + backward and on SDPA.

The model: a Llama architecture built from a config (no download), seeded random init, about 110M
parameters — hidden 1024, 8 layers, 8 query heads and 4 KV heads of headdim 128 (GQA), MLP 2816,
vocab 8192, untied embeddings. Two models from the same initial weights are trained on the same batches,
step by step in turn (the order alternating, so both see the shared GPU's drift alike):

* ``fa3_lab``: ``attn_implementation="fa3_lab"`` (:mod:`fa3_lab.hf`; the lab's forward kernel and, through
  autograd, its backward kernel, paper App. B.1);
* ``sdpa``: ``attn_implementation="sdpa"`` with SDPA's cuDNN backend (``CUDNN_ATTENTION``).

Data: generated here, seeded — a corpus that a model can learn without a download: token sequences of
a random sparse Markov chain (each token has a few likely successors) into which earlier spans are
copied (so that attention, not only the MLPs, lowers the loss: induction). AdamW (lr 3e-4, linear warm-up
then cosine), fp32 master weights, bf16 autocast, causal language-model loss.

Recorded per implementation: the loss and the time of every step, tokens/s (the median steady-state step:
after the first ``WARMUP_STEPS``), peak GPU memory (parameters + optimizer state + the largest rise during
one step: what the model alone would peak at), and the median of the per-step time ratios; the two loss
curves go into one plot. ``--out DIR`` writes
``train.json`` (``meta`` as every results file: GPU, versions, commit, date, command) and ``train.png``.
The two runs agree when the final losses (mean of the last 10 steps) are within 1 % of each other.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

#: The model (LlamaConfig keyword arguments): ~110M parameters.
CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, head_dim=128, vocab_size=8192, max_position_embeddings=4096,
              rope_theta=500000.0, tie_word_embeddings=False, attention_dropout=0.0)
BATCH = 8
SEQLEN = 2048
STEPS = 300
LR = 3e-4
WARMUP_STEPS = 20
SEED = 0
#: Final losses (mean of the last 10 steps) must agree within this fraction.
LOSS_RTOL = 0.01
IMPLS = ("fa3_lab", "sdpa")


def synthetic_batches(steps: int, batch: int, seqlen: int, vocab: int, seed: int = SEED, device="cpu"):
    """``steps`` batches of (batch, seqlen + 1) int64 tokens of the module docstring's corpus.

    A sparse Markov chain (each token picks its successor among 4 fixed ones with probabilities
    0.55/0.25/0.15/0.05), with every sequence's second half holding copies of spans of 16–64 tokens of
    its first half. Deterministic in ``seed``.

    Raises:
        ValueError: a size < 1, or vocab < 8.
    """
    import numpy as np
    import torch

    for name, x in (("steps", steps), ("batch", batch), ("seqlen", seqlen)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {x!r}")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 8:
        raise ValueError(f"vocab: expected an int >= 8, got {vocab!r}")
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, size=(vocab, 4))
    probs = np.array([0.55, 0.25, 0.15, 0.05])
    n = seqlen + 1
    for _ in range(steps):
        toks = np.empty((batch, n), dtype=np.int64)
        toks[:, 0] = rng.integers(0, vocab, size=batch)
        choice = rng.choice(4, size=(batch, n), p=probs)
        for t in range(1, n):
            toks[:, t] = succ[toks[:, t - 1], choice[:, t]]
        half = n // 2
        for b in range(batch):
            pos = half
            while pos < n - 16:
                length = int(rng.integers(16, 65))
                src = int(rng.integers(0, max(1, half - length)))
                length = min(length, n - pos, half - src)
                toks[b, pos:pos + length] = toks[b, src:src + length]
                pos += length + int(rng.integers(8, 64))
        yield torch.from_numpy(toks).to(device)


def lr_at(step: int, steps: int, lr: float = LR, warmup: int = WARMUP_STEPS) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def build_model(impl: str, device="cuda", seed: int = SEED, **overrides):
    """A seeded random Llama (fp32 weights) whose attention runs on ``impl`` ("fa3_lab" or "sdpa")."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "fa3_lab":
        from .. import hf

        hf.register()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**CONFIG, **overrides}), attn_implementation=impl)
    return model.to(device)


class Run:
    """One implementation's model, optimizer and records; :meth:`step` trains it on one batch.

    Args:
        impl: "fa3_lab" or "sdpa".  seed: the initial weights' seed (the same for both runs).
        **overrides: LlamaConfig keyword arguments over :data:`CONFIG`.
    """

    def __init__(self, impl: str, seed: int = SEED, **overrides):
        import torch

        self.impl = impl
        self.model = build_model(impl, seed=seed, **overrides)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        self.losses, self.times, self.rises = [], [], []

    def step(self, toks, lr: float) -> float:
        """One optimizer step on ``toks`` (batch, seqlen + 1) int64; records its loss, its seconds (GPU
        synchronized on both sides) and the rise of allocated GPU memory above the step's start (bytes).

        Raises:
            RuntimeError: a non-finite loss (the step and impl named).
        """
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        vocab = self.model.config.vocab_size
        for g in self.opt.param_groups:
            g["lr"] = lr
        ctx = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if self.impl == "sdpa" else contextlib.nullcontext()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with ctx:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self.model(toks[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), toks[:, 1:].reshape(-1))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)
        self.rises.append(torch.cuda.max_memory_allocated() - base)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"{self.impl}: loss is {value} at step {len(self.losses)}")
        self.losses.append(value)
        return value

    def persistent_bytes(self) -> int:
        """Bytes of the parameters and the optimizer state (what stays allocated between steps)."""
        import torch

        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for state in self.opt.state.values():
            n += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        return n

    def summary(self, batch: int, seqlen: int) -> dict:
        """{"losses", "step_times_ms", "tokens_per_s", "step_ms", "peak_memory_gb"}: tokens/s from the median
        steady-state step (after :data:`WARMUP_STEPS`); peak memory = parameters + optimizer state + the largest
        rise during one steady-state step (what this model alone would peak at: the other model's state is
        below every step's start)."""
        steady = _steady(self.times)
        times = self.times[steady]
        step_s = sorted(times)[len(times) // 2]
        return {"losses": self.losses, "step_times_ms": [t * 1e3 for t in self.times],
                "tokens_per_s": batch * seqlen / step_s, "step_ms": step_s * 1e3,
                "peak_memory_gb": (self.persistent_bytes() + max(self.rises[steady])) / 2**30}


def _steady(times: list) -> slice:
    """The steady-state steps: those after the first WARMUP_STEPS (all of them in a shorter run)."""
    return slice(WARMUP_STEPS, None) if len(times) > WARMUP_STEPS else slice(None)


def train_both(steps: int, batch: int, seqlen: int, seed: int = SEED, progress=None, **overrides) -> dict:
    """Train both implementations from the same initial weights on the same batches, step by step in turn.

    Interleaved, not one after the other: step s of both runs on batch s, the order alternating from step to
    step (fa3_lab first on even steps), so a drift of the shared GPU's clocks or of its other tenants falls
    on both alike. Returns {impl: :meth:`Run.summary`} plus "paired_speedup": the median over steady-state
    steps of (sdpa's step time ÷ fa3_lab's), the steps paired by batch.

    Raises:
        RuntimeError: a non-finite loss.
    """
    runs = {impl: Run(impl, seed=seed, **overrides) for impl in IMPLS}
    vocab = runs[IMPLS[0]].model.config.vocab_size
    for step, toks in enumerate(synthetic_batches(steps, batch, seqlen, vocab, seed, device="cuda")):
        for impl in (IMPLS if step % 2 == 0 else IMPLS[::-1]):
            value = runs[impl].step(toks, lr_at(step, steps))
            if progress:
                progress(impl, step, value)
    out = {impl: r.summary(batch, seqlen) for impl, r in runs.items()}
    steady = _steady(runs["fa3_lab"].times)
    ratios = sorted(b / a for a, b in zip(runs["fa3_lab"].times[steady], runs["sdpa"].times[steady]))
    out["paired_speedup"] = ratios[len(ratios) // 2]
    return out


def final_loss(losses: list) -> float:
    """Mean of the last 10 losses (or all, if fewer)."""
    tail = losses[-10:]
    return sum(tail) / len(tail)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for impl, color in zip(IMPLS, ("#08306b", "#e6550d")):
        r = doc["runs"][impl]
        ax.plot(r["losses"], color=color, lw=1.2,
                label=f"{impl}: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_memory_gb']:.1f} GB")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    m = doc["meta"]
    ax.set_title(f"~110M Llama, random init — {m['gpu']}, commit {m['commit']}, {m['date'][:10]}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """``[--steps N] [--batch N] [--seqlen N] [--out DIR]``: exit 0 if the final losses agree within 1 % and
    both runs finished, 1 if not, 2 for bad arguments or a machine that cannot run it."""
    parser = argparse.ArgumentParser(prog="python -m fa3_lab.examples.train", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per run (default {STEPS})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"sequences per step (default {BATCH})")
    parser.add_argument("--seqlen", type=int, default=SEQLEN, help=f"tokens per sequence (default {SEQLEN})")
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--out", default=None, metavar="DIR", help="write train.json and train.png here")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seqlen", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    from rich.console import Console
    from rich.progress import Progress

    from .. import _env

    console = Console()
    reason = _env.why_no_sm90()
    if reason:
        console.print(f"train needs an sm_90 GPU (H100/H200): {reason}")
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        console.print("train needs transformers: pip install -e '.[test]'")
        return 2
    from ..lab import results

    runs = {}
    with Progress(console=console, transient=True) as prog:
        tasks = {impl: prog.add_task(impl, total=args.steps) for impl in IMPLS}

        def progress(impl, step, loss):
            prog.update(tasks[impl], advance=1, description=f"{impl} loss {loss:.3f}")

        both = train_both(args.steps, args.batch, args.seqlen, progress=progress, num_hidden_layers=args.layers)
    paired = both.pop("paired_speedup")
    runs.update(both)
    a, b = final_loss(runs["fa3_lab"]["losses"]), final_loss(runs["sdpa"]["losses"])
    doc = {"meta": results.collect_meta("python -m fa3_lab.examples.train " + " ".join(argv or [])),
           "config": {**CONFIG, "num_hidden_layers": args.layers, "batch": args.batch, "seqlen": args.seqlen,
                      "steps": args.steps, "lr": LR, "seed": SEED},
           "runs": runs, "paired_speedup": paired, "final_loss": {"fa3_lab": a, "sdpa": b}, "final_loss_rel_diff": abs(a - b) / b,
           "ok": abs(a - b) <= LOSS_RTOL * b}
    for impl in IMPLS:
        r = runs[impl]
        console.print(f"{impl:8s} final loss {final_loss(r['losses']):.4f}  {r['tokens_per_s']:>10,.0f} tokens/s  "
                      f"{r['step_ms']:.1f} ms/step  peak {r['peak_memory_gb']:.2f} GB")
    console.print(f"final losses differ by {doc['final_loss_rel_diff']:.2%} (allowed {LOSS_RTOL:.0%}); "
                  f"tokens/s fa3_lab ÷ sdpa = {runs['fa3_lab']['tokens_per_s'] / runs['sdpa']['tokens_per_s']:.3f} "
                  f"(median of per-step ratios {paired:.3f})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.json").write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, out / "train.png")
        console.print(f"wrote {out / 'train.json'} and {out / 'train.png'}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
