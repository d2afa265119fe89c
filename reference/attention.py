"""Chapter 01 (no kernel step): standard attention — the exact answer every other implementation is checked against.

Paper §2.3 (eq. 1): S = α·QKᵀ, P = softmax(S) row-wise, O = PV, with α = softmax_scale.
The "standard implementation" materializes S and P (seqlen_q × seqlen_k per head), which is what
FlashAttention avoids; here that is the point: it is the readable definition.
"""
from __future__ import annotations

import numpy as np

from ._validate import causal_visible, check_qkv, resolve_scale

_DTYPES = (np.float64, np.float32, np.float16)


def standard_attention(q, k, v, causal=False, softmax_scale=None, dtype=np.float64):
    """Attention with S and P materialized: the reference and the paper's baseline.

    Args:
        q: (batch, seqlen_q, nheads, headdim) floating array.
        k, v: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0 (MQA/GQA: query head
            h reads KV head h // (nheads // nheads_kv)).
        causal: mask keys j > i + seqlen_k - seqlen_q (bottom-right aligned, as FA2/FA3).
        softmax_scale: α, default 1/sqrt(headdim).
        dtype: float64, float32 or float16 — the precision S, P and O are held in. With float16
            this is the paper's "baseline FP16" of Table 3: each matmul accumulates in float32 and
            rounds its result to float16, and the softmax runs in float16.

    Returns:
        out: (batch, seqlen_q, nheads, headdim) in ``dtype``.
        lse: (batch, nheads, seqlen_q) float64, natural log of Σ_j exp(S_ij) (S scaled).
            A row that sees no key (causal with seqlen_q > seqlen_k) gets out = 0 and lse = +inf,
            as FlashAttention does.

    Raises:
        TypeError: non-floating inputs or an unsupported ``dtype``.
        ValueError: shapes that do not fit (see ``reference._validate.check_qkv``).
    """
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = check_qkv(q, k, v)
    dt = np.dtype(dtype)
    if dt not in [np.dtype(d) for d in _DTYPES]:
        raise TypeError(f"dtype: expected float64, float32 or float16, got {dt}")
    scale = resolve_scale(softmax_scale, headdim)
    group = nheads // nheads_kv
    acc = np.float64 if dt == np.float64 else np.float32  # matmul accumulation precision

    qh = q.astype(dt).transpose(0, 2, 1, 3)                         # (b, h, sq, d)
    kh = np.repeat(k.astype(dt).transpose(0, 2, 1, 3), group, axis=1)  # (b, h, sk, d)
    vh = np.repeat(v.astype(dt).transpose(0, 2, 1, 3), group, axis=1)

    # S = α·QKᵀ, accumulated in `acc`, held in dt.
    s = (np.matmul(qh.astype(acc), kh.astype(acc).swapaxes(-1, -2)) * acc(scale)).astype(dt)
    visible = causal_visible(seqlen_q, seqlen_k) if causal else np.ones((seqlen_q, seqlen_k), bool)
    s = np.where(visible, s, dt.type(-np.inf))
    row_has_key = visible.any(axis=1)                                 # (sq,)

    m = np.max(s, axis=-1, keepdims=True)                             # row max, dt
    m = np.where(row_has_key[:, None], m, dt.type(0))
    p = np.exp(s - m)                                                 # dt (0 where masked)
    l = np.sum(p, axis=-1, keepdims=True, dtype=dt)
    safe_l = np.where(row_has_key[:, None], l, dt.type(1))
    p = (p / safe_l).astype(dt)
    o = np.matmul(p.astype(acc), vh.astype(acc)).astype(dt)          # (b, h, sq, d)

    with np.errstate(divide="ignore"):
        lse = m[..., 0].astype(np.float64) + np.log(l[..., 0].astype(np.float64))
    lse = np.where(row_has_key, lse, np.inf)
    return o.transpose(0, 2, 1, 3), lse
