"""`python -m fa3_lab.examples.llama_train` — train a tiny Llama for a few steps on our backward vs SDPA.

A Llama architecture from a config (no download): hidden 256, 4 query heads and 2 KV heads of headdim 64
(GQA 2:1), 2 layers, vocab 1000; seeded random init; the whole model in bf16 (under autocast the rotary
embedding hands attention float32 q, k, which the kernel refuses; SDPA would cast them). The same initial weights and the same batches (random tokens, batch 4 × 256)
are trained twice with AdamW (lr 1e-3): once with ``attn_implementation="fa3_lab"`` (our forward and
backward kernels, :mod:`fa3_lab.hf`) and once with ``"sdpa"``. The losses of the two runs agree within
bf16 noise at every step; the script prints them side by side.

From Python: ``train(attn_implementation, steps=20, seed=0) -> list[float]`` (the losses), and
``compare(steps=20) -> dict`` with both lists and the largest relative difference.
"""
from __future__ import annotations

import argparse
import json
import sys


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=512,
                       attention_dropout=0.0)


def train(attn_implementation: str, steps: int = 20, seed: int = 0, batch: int = 4, seqlen: int = 256) -> list:
    """Train the tiny Llama for `steps` AdamW steps; returns the loss of each step (floats).

    Raises:
        RuntimeError: no CUDA device.  ImportError: transformers missing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .. import hf

    if not torch.cuda.is_available():
        raise RuntimeError("llama_train needs a CUDA GPU (sm_90 for fa3_lab)")
    hf.register()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation=attn_implementation)
    model = model.to(device="cuda", dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device="cuda", generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def compare(steps: int = 20) -> dict:
    """Both runs from the same init and batches; ``max_rel_diff`` = max over steps of |a − b| / |b|."""
    ours = train("fa3_lab", steps)
    sdpa = train("sdpa", steps)
    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, sdpa))
    return {"fa3_lab": ours, "sdpa": sdpa, "max_rel_diff": rel}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="write the losses as JSON here")
    args = parser.parse_args(argv)
    result = compare(args.steps)
    print(f"{'step':>4} {'fa3_lab':>10} {'sdpa':>10} {'rel diff':>9}")
    for i, (a, b) in enumerate(zip(result["fa3_lab"], result["sdpa"])):
        print(f"{i:4d} {a:10.5f} {b:10.5f} {abs(a - b) / abs(b):9.2e}")
    print(f"max relative difference: {result['max_rel_diff']:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
