"""Pure NumPy references of FlashAttention-3's algorithms (Shah et al., 2024).

The NumPy twins of the lab's kernel steps (ids from ``fa3_lab/registry.py``, ``docs/design.md``):

* :mod:`reference.attention`      — chapter 01: standard attention, the exact answer (§2.3)
* :mod:`reference.online_softmax` — chapter 01: one-pass softmax with a running max and sum
* :mod:`reference.flash_forward`  — twin of step 01: the tiled forward, the loop every step runs
* :mod:`reference.fa3_pipeline`   — twin of steps 02–04: producer/consumer ring (Alg. 1), pingpong,
  and step 04's consumer line for line (Alg. 2)
* :mod:`reference.pipeline_model` — steps 01–04 timed: a discrete-event model of one SM
* :mod:`reference.fp8`            — twin of step 05: e4m3, block quantization, incoherent processing (§3.3)
* :mod:`reference.scheduler`      — twin of steps 06–07: the persistent and the causal tile schedulers
* :mod:`reference.backward`       — twin of step 11: the backward with recomputation (App. B.1)

All functions take BSHD arrays: ``q (batch, seqlen_q, nheads, headdim)``,
``k, v (batch, seqlen_k, nheads_kv, headdim)`` and return ``(out, lse)``.
"""
