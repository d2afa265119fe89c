"""Twin of kernel steps 11, 18 and 23 (cuda/steps/bwd/11_bwd.cu, 18_bwd_causal_scheduler.cu,
23_bwd_dq_postprocess_tiles.cu): the tiled backward with recomputation (paper Appendix B.1, Algorithm 3), in the
kernel's loop order and with its names; step 18's order of the CTAs (tile_order, dq_turn, launch_makespan); and the
dQ postprocess that step 23 runs one m_block tile per CTA (postprocess).

The forward keeps only O and softmax_lse L; the backward recomputes P tile by tile from Q, K and L
instead of storing the seqlen_q × seqlen_k matrix. Three passes, as the three kernels:

    preprocess   D_i = rowsum(dO_i ∘ O_i), L_i·log2(e) in rows padded to whole m_blocks       line 1
                 (+inf / 0 in the padding); dq_accum = 0 (float32 in the kernel)
    main         for each (batch, head, n_block) — one CTA: K_j, V_j (Bc = block_n keys) stay put
                   dK_j = 0, dV_j = 0                                            (Bc, d)   line 16
                   for m_block in [m_block_min, m_block_max): Q_i, dO_i, L_i, D_i stream in
                     1. Sᵀ = K_j Q_iᵀ,  dPᵀ = V_j dO_iᵀ                          (Bc, Br)  lines 21, 23
                     2. mask keys past seqlen_k and (causal) past the diagonal
                     3. Pᵀ = exp2(Sᵀ·scale_log2 − L·log2 e)                                line 22
                     4. dSᵀ = Pᵀ ∘ (dPᵀ − D)                                               line 24
                     5. dV_j += Pᵀ dO_i,  dK_j += dSᵀ Q_i                        (Bc, d)   lines 25, 26
                     6. (dSᵀ to shared memory, for the warpgroups' dQ slices)
                     7. dQ_i(partial) = (dSᵀ)ᵀ K_j = dS K_j                      (Br, d)   line 27
                     8. (barrier; the stage is refilled)
                     9. dq_accum_i += dQ_i(partial)          fp32 atomics in the kernel      line 33
                  10. epilogue: dK_j·α, dV_j out (GQA: one slice per query head)
    postprocess  dQ = α·dq_accum; GQA: dK, dV = Σ over each head group of the per-head slices

The kernel computes the transposed tiles (Sᵀ, dPᵀ: keys × queries) so that Pᵀ and dSᵀ sit in registers in
the layout of the next GEMM's A operand; here the transposes are just the same arithmetic written in that
orientation. S is raw (unscaled): α enters through scale_log2 and at the end (dK_j·α, dQ·α), where the
chain rule puts it; the paper's Algorithm 3 writes S already scaled. The padded rows and keys are zero
(TMA zero-fills reads past the end), which is why masking keys past seqlen_k and L = +inf in the padded
rows make every padded P exactly 0.
"""
from __future__ import annotations

import heapq

import numpy as np

from ._validate import (check_array, check_block, check_bool, check_finite, check_qkv,
                        resolve_scale)
from .flash_forward import ceil_div, kLog2e

__all__ = ["kernel_tiles", "m_block_range", "heads_per_group", "tile_order", "dq_turn", "launch_makespan", "preprocess",
           "postprocess", "flash_attention_backward"]

def kernel_tiles(headdim: int) -> tuple[int, int]:
    """(block_m, block_n) = (Br, Bc) of step 11 at this headdim: (128, 128) at 64, (64, 128) at 128 and (64, 64)
    at 256 (two 64 × 256 fp32 accumulators, dK and dV, do not fit one thread's registers).

    Source: cuda/steps/bwd/11_bwd.cu, Config.
    """
    return (128, 128) if headdim <= 64 else (64, 128) if headdim <= 128 else (64, 64)


def m_block_range(n_block: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
                  causal: bool) -> tuple[int, int]:
    """The Q tiles K/V tile ``n_block`` must visit in the backward: ``range(m_block_min, m_block_max)``.

    Causal (bottom-right aligned): key j is seen by rows i >= j − (seqlen_k − seqlen_q), so the first
    row that sees any key of the tile is max(0, n_block·Bc − seqlen_k + seqlen_q) and

        m_block_min = ⌊max(0, n_block·Bc − seqlen_k + seqlen_q) / Br⌋

    (which may reach ⌈seqlen_q / Br⌉: no Q tile sees this K/V tile, nothing to do). The Q tiles
    below it are fully masked and skipped. Non-causal: all tiles.

    Returns:
        (m_block_min, m_block_max), ints, m_block_min <= m_block_max.

    Source: FlashAttention-2/3 backward kernels' ``get_m_block_min_max``; step 11's m_block_min.
    """
    m_block_max = ceil_div(seqlen_q, block_m)
    m_block_min = 0
    if causal:
        m_block_min = min(max(0, n_block * block_n - seqlen_k + seqlen_q) // block_m, m_block_max)
    return m_block_min, m_block_max


def heads_per_group(seqlen_q: int, headdim: int, l2_bytes: int = 40 << 20) -> int:
    """Step 18's group of (batch, head) pairs: the largest power of two whose Q and dO (16-bit) and dq_accum (fp32),
    ``seqlen_q · headdim · 8`` bytes per head, fit in ``l2_bytes`` (at least 1).

    Source: cuda/steps/bwd/18_bwd_causal_scheduler.cu, run(); FA3's SingleTileBwdLPTScheduler (its 40 MB).
    """
    head_bytes = seqlen_q * headdim * (2 * 2 + 4)
    g = 1
    while 2 * g * head_bytes <= l2_bytes:
        g *= 2
    return g


def tile_order(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, block_n: int, headdim: int, causal: bool,
               deterministic: bool = False) -> list[tuple[int, int, int]]:
    """The CTAs of step 18's main kernel in launch order (blockIdx.x = 0, 1, …), each as ``(n_block, h, b)``.

    Non-causal: n_block fastest, head by head (steps 11–17's grid). Causal: groups of
    :func:`heads_per_group` (b, h) pairs, and inside a group n_block by n_block — n_block 0 (the most m_blocks)
    of every head of the group first: longest first. Deterministic causal: shortest first (n_block descending),
    the order of the dQ adds (:func:`dq_turn`).

    Source: cuda/steps/bwd/18_bwd_causal_scheduler.cu, tile_of.
    """
    num_n = ceil_div(seqlen_k, block_n)
    bh_all = batch * nheads
    order = []
    if not causal:
        for bh in range(bh_all):
            order += [(n, bh % nheads, bh // nheads) for n in range(num_n)]
        return order
    g = heads_per_group(seqlen_q, headdim)
    for first in range(0, bh_all, g):
        group = range(first, min(first + g, bh_all))
        for n in (range(num_n - 1, -1, -1) if deterministic else range(num_n)):
            order += [(n, bh % nheads, bh // nheads) for bh in group]
    return order


def dq_turn(n_block: int, m_block: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
            causal: bool) -> int:
    """In deterministic mode, the value of m_block's semaphore at which CTA ``n_block`` adds its dQ_i: n_block
    itself when non-causal; causal, the highest n_block that sees m_block adds first,
    ``min(num_n_blocks − 1, ⌊((m_block + 1)·Br − 1 + seqlen_k − seqlen_q) / Bc⌋) − n_block``.

    Source: cuda/steps/bwd/18_bwd_causal_scheduler.cu, dq_turn.
    """
    if not causal:
        return n_block
    last = min(ceil_div(seqlen_k, block_n) - 1, ((m_block + 1) * block_m - 1 + seqlen_k - seqlen_q) // block_n)
    return last - n_block


def launch_makespan(costs, num_sms: int = 132) -> float:
    """Greedy list scheduling, the model of the GPU's block scheduler: CTAs start in launch order, each on the
    SM that frees first (one CTA per SM); ``costs`` are their lengths in launch order. Returns the time the last
    one ends, in the units of ``costs``.
    """
    free = [0.0] * num_sms
    heapq.heapify(free)
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def _check_like(name: str, x, shape) -> np.ndarray:
    check_array(name, x)
    if x.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {x.shape}")
    return x


def preprocess(out: np.ndarray, dout: np.ndarray, lse: np.ndarray, seqlen_q_rounded: int):
    """The preprocess kernel: (dpsum, lse_log2, dq_accum), rows padded to ``seqlen_q_rounded``.

    Args:
        out, dout: (batch, seqlen_q, nheads, headdim) float64.  lse: (batch, nheads, seqlen_q), natural log.

    Returns:
        dpsum (batch, nheads, seqlen_q_rounded): D_i = rowsum(dO_i ∘ O_i), 0 in the padding;
        lse_log2 (same): L_i·log2(e), +inf in the padding (and where L = +inf: rows that see no key);
        dq_accum (batch, nheads, seqlen_q_rounded, headdim): zeros.
    """
    batch, seqlen_q, nheads, headdim = out.shape
    dpsum = np.zeros((batch, nheads, seqlen_q_rounded))
    lse_log2 = np.full((batch, nheads, seqlen_q_rounded), np.inf)
    dpsum[:, :, :seqlen_q] = np.einsum("bshd,bshd->bhs", dout, out)
    lse_log2[:, :, :seqlen_q] = lse * kLog2e
    dq_accum = np.zeros((batch, nheads, seqlen_q_rounded, headdim))
    return dpsum, lse_log2, dq_accum


def postprocess(dq_accum: np.ndarray, dk_accum: np.ndarray, dv_accum: np.ndarray, seqlen_q: int,
                nheads_kv: int, softmax_scale: float):
    """The postprocess kernels: dq = α·dq_accum (padding dropped), (batch, seqlen_q, nheads, headdim);
    dk, dv = Σ over each group of query heads of dk_accum, dv_accum (batch, seqlen_k, nheads, headdim).
    (Without GQA the kernel writes dk, dv directly; the sum over a group of one is the same.)"""
    dq = softmax_scale * dq_accum[:, :, :seqlen_q].transpose(0, 2, 1, 3)
    batch, seqlen_k, nheads, headdim = dk_accum.shape
    group = nheads // nheads_kv
    dk = dk_accum.reshape(batch, seqlen_k, nheads_kv, group, headdim).sum(axis=3)
    dv = dv_accum.reshape(batch, seqlen_k, nheads_kv, group, headdim).sum(axis=3)
    return dq, dk, dv


def flash_attention_backward(q, k, v, out, lse, dout, causal=False, softmax_scale=None,
                             block_m=None, block_n=None):
    """Gradients of attention, tiled as step 11, with P recomputed from softmax_lse (no S/P stored).

    Args:
        q: (batch, seqlen_q, nheads, headdim) floating ndarray.
        k, v: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0 (GQA).
        out: (batch, seqlen_q, nheads, headdim), the forward's output O.
        lse: (batch, nheads, seqlen_q), the forward's softmax_lse (natural log); +inf marks a row
            that saw no key (its gradients are 0). NaN or -inf is rejected.
        dout: (batch, seqlen_q, nheads, headdim), dL/dO.
        causal: bool, bottom-right aligned as in the forward.
        softmax_scale: α, default 1/sqrt(headdim); must be the forward's.
        block_m, block_n: Br (Q tile rows) and Bc (K/V tile rows), positive ints; default the kernel's
            (:func:`kernel_tiles`).

    Returns:
        (dq, dk, dv) float64: dq of q's shape; dk, dv of k's shape (summed over the query heads
        that share each KV head).

    Raises:
        TypeError: non-floating / non-ndarray inputs, causal not a bool, block sizes not ints.
        ValueError: shapes that do not fit; NaN/inf in q, k, v, out, dout; NaN or -inf in lse;
            block sizes <= 0; softmax_scale not positive.

    Source: paper Appendix B.1, Algorithm 3 (lines 1, 16–33); cuda/steps/bwd/11_bwd.cu.
    """
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = check_qkv(q, k, v)
    _check_like("out", out, q.shape)
    _check_like("dout", dout, q.shape)
    _check_like("lse", lse, (batch, nheads, seqlen_q))
    causal = check_bool("causal", causal)
    tiles = kernel_tiles(headdim)
    block_m = check_block("block_m", tiles[0] if block_m is None else block_m)
    block_n = check_block("block_n", tiles[1] if block_n is None else block_n)
    softmax_scale = resolve_scale(softmax_scale, headdim)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        check_finite(name, x)
    lse64 = np.asarray(lse, dtype=np.float64)
    if np.isnan(lse64).any() or (lse64 == -np.inf).any():
        raise ValueError("lse: expected finite values or +inf (rows that see no key), got NaN or -inf")

    q, k, v, out, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, out, dout))
    scale_log2 = softmax_scale * kLog2e
    group = nheads // nheads_kv
    causal_offset = seqlen_k - seqlen_q
    num_m_blocks = ceil_div(seqlen_q, block_m)
    num_n_blocks = ceil_div(seqlen_k, block_n)

    # preprocess; seqlen_q_rounded covers whole m_blocks (the binding pads to the step's own Br)
    seqlen_q_rounded = num_m_blocks * block_m
    dpsum, lse_log2, dq_accum = preprocess(out, dout, lse64, seqlen_q_rounded)
    # TMA zero-fills reads past the end: the padded tensors the kernel effectively sees
    q_pad = np.zeros((batch, seqlen_q_rounded, nheads, headdim))
    do_pad = np.zeros_like(q_pad)
    q_pad[:, :seqlen_q], do_pad[:, :seqlen_q] = q, dout
    k_pad = np.zeros((batch, num_n_blocks * block_n, nheads_kv, headdim))
    v_pad = np.zeros_like(k_pad)
    k_pad[:, :seqlen_k], v_pad[:, :seqlen_k] = k, v
    dk_accum = np.zeros((batch, seqlen_k, nheads, headdim))  # the kernel's epilogue target (per query head)
    dv_accum = np.zeros((batch, seqlen_k, nheads, headdim))

    for b in range(batch):
        for h in range(nheads):
            h_kv = h // group                                  # GQA/MQA by index arithmetic
            for n_block in range(num_n_blocks):                # one CTA
                keys = slice(n_block * block_n, (n_block + 1) * block_n)
                k_j = k_pad[b, keys, h_kv]                     # (Bc, d) smem, stationary
                v_j = v_pad[b, keys, h_kv]                     # (Bc, d)
                dv_j = np.zeros((block_n, headdim))            # (Bc, d) fp32 registers
                dk_j = np.zeros((block_n, headdim))
                key = n_block * block_n + np.arange(block_n)[:, None]   # (Bc, 1) key index of each row of Sᵀ
                m_block_min, m_block_max = m_block_range(n_block, seqlen_q, seqlen_k, block_m, block_n, causal)
                for m_block in range(m_block_min, m_block_max):
                    rows = slice(m_block * block_m, (m_block + 1) * block_m)
                    q_i = q_pad[b, rows, h]                    # (Br, d) the stage's Q tile
                    do_i = do_pad[b, rows, h]                  # (Br, d)
                    lse_i = lse_log2[b, h, rows]               # (Br,) base 2
                    d_i = dpsum[b, h, rows]                    # (Br,)
                    # 1. Sᵀ = K_j·Q_iᵀ, dPᵀ = V_j·dO_iᵀ
                    s_t = k_j @ q_i.T                          # (Bc, Br)
                    dp_t = v_j @ do_i.T                        # (Bc, Br)
                    # 2. mask
                    query = m_block * block_m + np.arange(block_m)[None, :]  # (1, Br)
                    masked = key >= seqlen_k
                    if causal:
                        masked = masked | (key > query + causal_offset)
                    s_t = np.where(masked, -np.inf, s_t)
                    # 3. Pᵀ = exp2(Sᵀ·scale_log2 − L·log2 e), L per column; +inf (padding, no key) → 0
                    p_t = np.exp2(s_t * scale_log2 - lse_i[None, :])
                    # 4. dSᵀ = Pᵀ ∘ (dPᵀ − D)
                    ds_t = p_t * (dp_t - d_i[None, :])
                    # 5. dV_j += Pᵀ·dO_i, dK_j += dSᵀ·Q_i
                    dv_j += p_t @ do_i
                    dk_j += ds_t @ q_i
                    # 7. dQ_i(partial) = dS·K_j (from the dSᵀ tile in smem)
                    dq_partial = ds_t.T @ k_j                  # (Br, d)
                    # 9. dq_accum_i += dQ_i(partial)
                    dq_accum[b, h, rows] += dq_partial
                # 10. epilogue: keys < seqlen_k; dK scaled once here
                n_valid = min(block_n, seqlen_k - n_block * block_n)
                dk_accum[b, keys, h] = (softmax_scale * dk_j)[:n_valid]
                dv_accum[b, keys, h] = dv_j[:n_valid]
    return postprocess(dq_accum, dk_accum, dv_accum, seqlen_q, nheads_kv, softmax_scale)
