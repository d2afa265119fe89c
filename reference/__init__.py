"""Pure NumPy references of FlashAttention-3's algorithms (Shah et al., 2024).

One module per step of the lab (``docs/design.md``):

* :mod:`reference.attention`      — 01: standard attention, the exact answer (§2.3)
* :mod:`reference.online_softmax` — 01: one-pass softmax with a running max and sum
* :mod:`reference.flash_forward`  — 02: tiled forward in FlashAttention-2's loop order
* :mod:`reference.fa3_pipeline`   — 03/04: producer/consumer ring (Alg. 1), pingpong and the
  two-stage GEMM-softmax pipeline (Alg. 2)
* :mod:`reference.pipeline_model` — 03/04: a discrete-event model of one SM
* :mod:`reference.fp8`            — 05: e4m3, block quantization, incoherent processing (§3.3)
* :mod:`reference.backward`       — 06: tiled backward with recomputation (App. B.1)

All functions take BSHD arrays: ``q (batch, seqlen_q, nheads, headdim)``,
``k, v (batch, seqlen_k, nheads_kv, headdim)`` and return ``(out, lse)``.
"""
