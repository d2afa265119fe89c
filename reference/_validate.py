"""Input checks shared by every reference function.

Bad input raises before anything is computed, with a message that names the argument, what was
expected and what was given (TypeError for dtypes, ValueError for shapes and values).
"""
from __future__ import annotations

import math

import numpy as np

_FLOAT_KINDS = ("f",)


def check_array(name: str, x, ndim: int | None = None) -> np.ndarray:
    """Return ``x`` as an ndarray after checking it is a real floating array of rank ``ndim``."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind not in _FLOAT_KINDS and x.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        raise TypeError(f"{name}: expected a floating dtype (float16/32/64), got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions (batch, seqlen, nheads, headdim), "
                         f"got shape {x.shape}")
    return x


def check_qkv(q, k, v):
    """Check BSHD q, k, v and return ``(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim)``.

    Raises:
        TypeError: an input is not a floating ndarray.
        ValueError: wrong rank, batch/seqlen/headdim mismatch, or nheads % nheads_kv != 0.
    """
    check_array("q", q, 4)
    check_array("k", k, 4)
    check_array("v", v, 4)
    batch, seqlen_q, nheads, headdim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"k, v: expected batch {batch} (from q), got k {k.shape[0]}, v {v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {k.shape}, got {v.shape}")
    _, seqlen_k, nheads_kv, headdim_k = k.shape
    if headdim_k != headdim:
        raise ValueError(f"k: expected headdim {headdim} (from q), got {headdim_k}")
    if min(seqlen_q, seqlen_k, nheads, nheads_kv, headdim, batch) < 1:
        raise ValueError(f"q, k: every dimension must be >= 1, got q {q.shape}, k {k.shape}")
    if nheads % nheads_kv != 0:
        raise ValueError(f"k: nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})")
    return batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim


def check_finite(name: str, x: np.ndarray) -> None:
    """Raise ValueError if ``x`` holds NaN or inf."""
    if not np.all(np.isfinite(np.asarray(x, dtype=np.float64))):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


def resolve_scale(softmax_scale, headdim: int) -> float:
    """``softmax_scale`` or the default 1/sqrt(headdim); must be a positive finite number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(headdim)
    try:
        s = float(softmax_scale)
    except (TypeError, ValueError):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}") from None
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"softmax_scale: expected a positive finite number, got {softmax_scale}")
    return s


def check_block(name: str, value) -> int:
    """A tile size: a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def causal_visible(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """Boolean (seqlen_q, seqlen_k) mask of visible keys, causal and bottom-right aligned.

    Row i sees key j iff ``j <= i + seqlen_k - seqlen_q`` (FlashAttention 2/3 convention).
    """
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def check_bool(name: str, value) -> bool:
    """A flag such as ``causal``: a Python or NumPy bool (not 0/1, not a string)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def check_compute_dtype(name: str, dtype, allowed=(np.float64, np.float32)) -> np.dtype:
    """The precision a reference computes in: one of ``allowed`` (float64/float32 by default)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected one of {[np.dtype(a).name for a in allowed]}, got {dtype!r}") from None
    if dt not in [np.dtype(a) for a in allowed]:
        raise TypeError(f"{name}: expected one of {[np.dtype(a).name for a in allowed]}, got {dt}")
    return dt
