"""Runnable examples of fa3_lab inside real models (``python -m fa3_lab.examples.<name>``).

* :mod:`fa3_lab.examples.llama_prefill` — a Llama-style GQA model's prefill with ``attn_implementation=
  "fa3_lab"`` against the same model on PyTorch SDPA: logits, attention time, whole-model time.
"""
