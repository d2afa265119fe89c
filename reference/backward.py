"""Step 06: the tiled backward pass with recomputation (paper Appendix B.1, Algorithm 3).

The forward keeps only O and softmax_lse L; the backward recomputes P tile by tile from Q, K and L
instead of storing the seqlen_q × seqlen_k matrix. Per (batch, head):

    preprocess: D_i = rowsum(dO_i ∘ O_i)                            (seqlen_q,)       line 1
    for n_block (one K/V tile K_j, V_j of Bc = block_n rows; one CTA in the kernel):
        dK_j = 0, dV_j = 0                                          (Bc, d) registers line 16
        for m_block in [m_block_min, m_block_max):                  Q tiles that see any key of j
            load Q_i, dO_i (Br, d); L_i, D_i (Br,)                  Br = block_m
            S = Q_i K_jᵀ                                            (Br, Bc) masked   line 21
            dP = dO_i V_jᵀ                                          (Br, Bc)          line 23
            P = exp2(S·scale_log2 − L_i·kLog2e) = exp(α·S − L_i)   (Br, Bc)          line 24
            dS = P ∘ (dP − D_i)                                     (Br, Bc)          line 24
            dV_j += Pᵀ dO_i                                         (Bc, d)           line 25
            dK_j += α · dSᵀ Q_i                                     (Bc, d)           line 26
            dQ_i += α · dS K_j                   (Br, d), atomicAdd by the dQ writer, lines 27, 33
        write dK_j, dV_j

Line numbers are those of the paper's Algorithm 3, which writes S already scaled; here S is raw
and α appears where the chain rule puts it. GQA: the query heads of a group all add into their
shared KV head's dK, dV (the kernel sums them in a float32 buffer); dk, dv come back with k's shape.
"""
from __future__ import annotations

import numpy as np

from ._validate import (check_array, check_block, check_bool, check_finite, check_qkv,
                        resolve_scale)
from .flash_forward import ceil_div, kLog2e, tile_visible

__all__ = ["m_block_range", "flash_attention_backward"]


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

    Source: FlashAttention-2/3 backward kernels' ``get_m_block_min_max``.
    """
    m_block_max = ceil_div(seqlen_q, block_m)
    m_block_min = 0
    if causal:
        m_block_min = min(max(0, n_block * block_n - seqlen_k + seqlen_q) // block_m, m_block_max)
    return m_block_min, m_block_max


def _check_like(name: str, x, shape) -> np.ndarray:
    check_array(name, x)
    if x.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {x.shape}")
    return x


def flash_attention_backward(q, k, v, out, lse, dout, causal=False, softmax_scale=None,
                             block_m=64, block_n=128):
    """Gradients of attention, tiled, with P recomputed from softmax_lse (no S/P stored).

    Args:
        q: (batch, seqlen_q, nheads, headdim) floating ndarray.
        k, v: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0 (GQA).
        out: (batch, seqlen_q, nheads, headdim), the forward's output O.
        lse: (batch, nheads, seqlen_q), the forward's softmax_lse (natural log); +inf marks a row
            that saw no key (its gradients are 0). NaN or -inf is rejected.
        dout: (batch, seqlen_q, nheads, headdim), dL/dO.
        causal: bool, bottom-right aligned as in the forward.
        softmax_scale: α, default 1/sqrt(headdim); must be the forward's.
        block_m, block_n: Br (Q tile rows) and Bc (K/V tile rows), positive ints.

    Returns:
        (dq, dk, dv) float64: dq of q's shape; dk, dv of k's shape (summed over the query heads
        that share each KV head).

    Raises:
        TypeError: non-floating / non-ndarray inputs, causal not a bool, block sizes not ints.
        ValueError: shapes that do not fit; NaN/inf in q, k, v, out, dout; NaN or -inf in lse;
            block sizes <= 0; softmax_scale not positive.

    Source: paper Appendix B.1, Algorithm 3 (lines 1, 16–33); FlashAttention-2 Algorithm 2.
    """
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = check_qkv(q, k, v)
    _check_like("out", out, q.shape)
    _check_like("dout", dout, q.shape)
    _check_like("lse", lse, (batch, nheads, seqlen_q))
    causal = check_bool("causal", causal)
    block_m = check_block("block_m", block_m)
    block_n = check_block("block_n", block_n)
    softmax_scale = resolve_scale(softmax_scale, headdim)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        check_finite(name, x)
    lse64 = np.asarray(lse, dtype=np.float64)
    if np.isnan(lse64).any() or (lse64 == -np.inf).any():
        raise ValueError("lse: expected finite values or +inf (rows that see no key), got NaN or -inf")

    q, k, v, out, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, out, dout))
    scale_log2 = softmax_scale * kLog2e
    group = nheads // nheads_kv

    # Preprocess (a separate kernel in FA2/FA3), line 1: D_i = rowsum(dO_i ∘ O_i), (batch, nheads, seqlen_q).
    d_rows = np.einsum("bshd,bshd->bhs", dout, out)
    lse_log2 = lse64 * kLog2e                                  # L_i in base 2, (batch, nheads, seqlen_q)

    dq = np.zeros_like(q)                                      # dQaccum (float32 in the kernel)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    num_n_blocks = ceil_div(seqlen_k, block_n)

    for b in range(batch):
        for h in range(nheads):
            h_kv = h // group
            for n_block in range(num_n_blocks):                # one CTA per K/V tile
                col0 = n_block * block_n
                k_j = k[b, col0:col0 + block_n, h_kv, :]       # (Bc, d)
                v_j = v[b, col0:col0 + block_n, h_kv, :]       # (Bc, d)
                dk_j = np.zeros_like(k_j)                      # (Bc, d) accumulator
                dv_j = np.zeros_like(v_j)                      # (Bc, d) accumulator
                m_block_min, m_block_max = m_block_range(n_block, seqlen_q, seqlen_k, block_m,
                                                         block_n, causal)
                for m_block in range(m_block_min, m_block_max):
                    rows = slice(m_block * block_m, (m_block + 1) * block_m)
                    q_i = q[b, rows, h, :]                     # (Br, d)
                    do_i = dout[b, rows, h, :]                 # (Br, d)
                    lse_i = lse_log2[b, h, rows]               # (Br,) base 2
                    d_i = d_rows[b, h, rows]                   # (Br,)
                    s = q_i @ k_j.T                            # (Br, Bc) recompute S, line 21
                    visible = tile_visible(m_block, n_block, seqlen_q, seqlen_k, block_m, block_n,
                                           causal)
                    if visible is not None:
                        s = np.where(visible, s, -np.inf)
                    dp = do_i @ v_j.T                          # (Br, Bc)          line 23
                    p = np.exp2(s * scale_log2 - lse_i[:, None])   # (Br, Bc); lse = +inf → 0, line 24
                    ds = p * (dp - d_i[:, None])               # (Br, Bc)          line 24
                    dv_j += p.T @ do_i                         # (Bc, d)           line 25
                    dk_j += softmax_scale * (ds.T @ q_i)       # (Bc, d)           line 26
                    dq[b, rows, h, :] += softmax_scale * (ds @ k_j)   # atomicAdd, lines 27, 33
                dk[b, col0:col0 + block_n, h_kv, :] += dk_j    # GQA: the group's heads add up
                dv[b, col0:col0 + block_n, h_kv, :] += dv_j
    return dq, dk, dv
