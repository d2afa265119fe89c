"""Chapter 01 (no kernel step; every step runs it): softmax in one pass over blocks — the online normalizer (Milakov & Gimelshein, 2018).

The safe softmax reads its row twice before it can write anything: pass 1 finds the max m, pass 2
sums ℓ = Σ exp(x − m). The online version reads the row once, block by block, keeping a running max
m and a running sum ℓ; when a block raises the max from m_old to m_new, the sum so far is rescaled
by exp(m_old − m_new). This running (m, ℓ) pair is what FlashAttention keeps per query row
(paper §2.3, "online softmax"); :func:`online_normalizer_update` is the step it applies per tile
(in base 2, on raw scores: ``reference.flash_forward.online_softmax_update``).

Conventions shared with :mod:`reference.attention`:

* ``-inf`` entries are masked keys: they contribute exp(−inf) = 0.
* A row whose every entry is ``-inf`` (a fully masked row) gets softmax = 0 everywhere and
  log-sum-exp = ``-inf`` here (m = −inf, ℓ = 0); the attention functions report such rows as
  lse = +inf, FlashAttention's marker for "this row saw no key".
* Everything is computed and returned in float64.
"""
from __future__ import annotations

import numpy as np

from ._validate import check_array, check_block, check_bool

__all__ = ["safe_softmax", "online_normalizer_update", "online_softmax_stats", "online_softmax"]


def _check_x(x) -> np.ndarray:
    check_array("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected at least 1 dimension with a non-empty last axis, got shape {x.shape}")
    x64 = np.asarray(x, dtype=np.float64)
    if np.isnan(x64).any() or (x64 == np.inf).any():
        raise ValueError("x: expected finite values or -inf (masked), got NaN or +inf")
    return x64


def _guarded(m: np.ndarray) -> np.ndarray:
    """m with −inf replaced by 0, so exp(x − m) never evaluates −inf − (−inf) = NaN.

    If m is −inf every x seen so far is −inf too, and exp(−inf − 0) = 0 is the right answer.
    """
    return np.where(m == -np.inf, 0.0, m)


def safe_softmax(x) -> np.ndarray:
    """The two-pass safe softmax over the last axis: pass 1 the max, pass 2 exp and sum.

    Args:
        x: floating ndarray, shape (..., n), n >= 1; entries finite or -inf (masked).

    Returns:
        float64 array of x's shape; fully masked rows (all -inf) are 0.

    Raises:
        TypeError: x is not a floating ndarray.
        ValueError: x is 0-d or has an empty last axis, or holds NaN or +inf.

    Source: Milakov & Gimelshein 2018, Algorithm 2 ("safe softmax"); paper §2.3, eq. (1).
    """
    x = _check_x(x)
    m = _guarded(np.max(x, axis=-1, keepdims=True))      # pass 1: (..., 1)
    p = np.exp(x - m)                                    # pass 2: (..., n)
    l = np.sum(p, axis=-1, keepdims=True)
    return np.divide(p, l, out=np.zeros_like(p), where=l > 0)


def online_normalizer_update(m_prev, l_prev, x_block):
    """One step of the online normalizer: fold a block of scores into the running (m, ℓ).

    m_new = max(m_prev, max_j x_j);  ℓ_new = ℓ_prev · exp(m_prev − m_new) + Σ_j exp(x_j − m_new).

    Args:
        m_prev: running max, float64 array of shape (...) (the batch shape of the rows); start at -inf.
        l_prev: running sum, float64 array of shape (...); start at 0.
        x_block: scores of this block, shape (..., block) (finite or -inf).

    Returns:
        (m_new, l_new, correction): new running max and sum, shape (...), and the factor
        exp(m_prev − m_new) the old sum was multiplied by (FlashAttention rescales O_i with it).
        Rows that have seen only -inf keep m = -inf, ℓ = 0 and correction = 0 — no NaN.

    Source: Milakov & Gimelshein 2018, Algorithm 3, lines 4–5.
    """
    m_prev = np.asarray(m_prev, dtype=np.float64)
    l_prev = np.asarray(l_prev, dtype=np.float64)
    x_block = np.asarray(x_block, dtype=np.float64)
    m_new = np.maximum(m_prev, np.max(x_block, axis=-1))
    ref = _guarded(m_new)                                 # −inf − (−inf) must not happen
    correction = np.exp(m_prev - ref)                     # 0 when m_prev = −inf
    l_new = l_prev * correction + np.sum(np.exp(x_block - ref[..., None]), axis=-1)
    return m_new, l_new, correction


def online_softmax_stats(x, block_size: int, history: bool = False):
    """Row max m and row sum ℓ = Σ exp(x − m) over the last axis in ONE pass over blocks.

    log-sum-exp of a row is m + log(ℓ).

    Args:
        x: floating ndarray, shape (..., n), n >= 1; entries finite or -inf.
        block_size: positive int, how many entries each step reads (the last block may be short).
        history: also return the running values after every block (for plots).

    Returns:
        (m, l), each float64 of shape x.shape[:-1]; with history=True (m, l, m_hist, l_hist) where
        m_hist, l_hist have shape (n_blocks, *x.shape[:-1]) and the last entries equal (m, l).

    Raises:
        TypeError: x not a floating ndarray; block_size not an int; history not a bool.
        ValueError: x 0-d, empty last axis, NaN or +inf in x; block_size <= 0.

    Source: Milakov & Gimelshein 2018, Algorithm 3 (online normalizer calculation), lines 1–6.
    """
    x = _check_x(x)
    block_size = check_block("block_size", block_size)
    history = check_bool("history", history)
    n = x.shape[-1]
    m = np.full(x.shape[:-1], -np.inf)                   # running max, (...)
    l = np.zeros(x.shape[:-1])                           # running sum, (...)
    m_hist, l_hist = [], []
    for start in range(0, n, block_size):
        m, l, _ = online_normalizer_update(m, l, x[..., start:start + block_size])
        if history:
            m_hist.append(m)
            l_hist.append(l)
    if history:
        return m, l, np.stack(m_hist), np.stack(l_hist)
    return m, l


def online_softmax(x, block_size: int) -> np.ndarray:
    """Softmax over the last axis with the max and sum found in one pass over blocks.

    Reads x once for (m, ℓ) (:func:`online_softmax_stats`), then writes exp(x − m) / ℓ; equal to
    :func:`safe_softmax` up to float64 rounding.

    Args:
        x: floating ndarray, shape (..., n), n >= 1; entries finite or -inf (masked).
        block_size: positive int, entries read per step; need not divide n.

    Returns:
        float64 array of x's shape; fully masked rows are 0.

    Raises:
        TypeError: x not a floating ndarray; block_size not an int.
        ValueError: x 0-d, empty last axis, NaN or +inf in x; block_size <= 0.

    Source: Milakov & Gimelshein 2018, Algorithm 3 (lines 1–9).
    """
    m, l = online_softmax_stats(x, block_size)
    x = np.asarray(x, dtype=np.float64)
    p = np.exp(x - _guarded(m)[..., None])
    return np.divide(p, l[..., None], out=np.zeros_like(p), where=l[..., None] > 0)
