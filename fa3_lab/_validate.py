"""Input validation shared by every public entry point (the 16-bit forward, the FP8 path, the ops).

Order, everywhere: Python types, dtypes, shapes, strides, scalar arguments, and only then the device
(a CUDA tensor on an sm_90 GPU). So a student on a laptop gets the shape error a GPU would give, and
meta tensors pass every shape check before ``needs an sm_90 GPU``. Each error names the argument, the
expected and the actual; nothing is computed before all checks pass.
"""
from __future__ import annotations

import math

#: Head dimensions the kernels are built for (one tuple for the whole package).
HEADDIMS = (64, 128, 256)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool; numpy bools accepted.

    Raises:
        TypeError: anything else (a string such as "False" is refused, not read as truthy).
    """
    if isinstance(value, bool):
        return value
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            return bool(value)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def resolve_softmax_scale(softmax_scale, headdim: int) -> float:
    """``softmax_scale`` as a float, default 1/sqrt(headdim).

    Raises:
        TypeError: not a number (bools refused).  ValueError: not positive and finite.
    """
    if softmax_scale is None:
        return 1.0 / math.sqrt(headdim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale: expected a positive finite number, got {softmax_scale}")
    return float(softmax_scale)


def check_tensors(names, tensors, dtypes, dtype_names: str) -> None:
    """Each is a torch.Tensor of one of ``dtypes``, all of one dtype.

    Raises:
        TypeError: not a tensor, wrong dtype, mixed dtypes.
    """
    import torch

    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in zip(names, tensors):
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {dtype_names}, got {t.dtype}")
    first = tensors[0].dtype
    if any(t.dtype != first for t in tensors[1:]):
        got = ", ".join(f"{n} {t.dtype}" for n, t in zip(names[1:], tensors[1:]))
        raise TypeError(f"{', '.join(names[1:])}: expected the dtype of {names[0]} ({first}), got {got}")


def check_bshd(q, k, v, names=("q", "k", "v"), headdims=HEADDIMS):
    """FlashAttention's BSHD shape rules; returns (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim).

    q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_kv, headdim), every dim
    >= 1, nheads % nheads_kv == 0, headdim in ``headdims`` (None: any).

    Raises:
        ValueError: rank, a zero dimension, batch/headdim mismatch, heads, headdim.
    """
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
        if min(t.shape) < 1:
            raise ValueError(f"{name}: every dimension must be >= 1, got shape {tuple(t.shape)}")
    batch, seqlen_q, nheads, headdim = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"{nv}: expected the shape of {nk} {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"{nk}: expected batch {batch} (from {nq}), got {k.shape[0]}")
    if k.shape[3] != headdim:
        raise ValueError(f"{nk}: expected headdim {headdim} (from {nq}), got {k.shape[3]}")
    if headdims is not None and headdim not in headdims:
        raise ValueError(f"{nq}: expected headdim in {headdims}, got {headdim}")
    nheads_kv = k.shape[2]
    if nheads % nheads_kv != 0:
        raise ValueError(f"{nk}: nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})")
    return batch, seqlen_q, k.shape[1], nheads, nheads_kv, headdim


def has_storage(t) -> bool:
    """False while torch.compile traces (FakeTensors) and for meta tensors: they have no data pointer,
    so base-alignment checks are left to the op's real implementation (fa3_lab/ops.py)."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling():
        return False
    return t.device.type != "meta" and not is_fake(t)


def check_strides(names, tensors, tma: bool) -> None:
    """Last dim contiguous; with ``tma`` also 16-byte aligned strides and base (TMA's rule).

    Raises:
        ValueError: naming the tensor and its strides.
    """
    for name, t in zip(names, tensors):
        if t.stride(3) != 1:
            raise ValueError(f"{name}: expected the last dim contiguous (stride 1), got strides {t.stride()}")
        if tma:
            elem = t.element_size()
            if any((s * elem) % 16 for s in t.stride()[:3]) or (has_storage(t) and t.data_ptr() % 16):
                raise ValueError(f"{name}: TMA needs 16-byte aligned base and strides, got strides {t.stride()}")


def require_sm90(caller: str, names, tensors) -> None:
    """The device checks, last: CUDA tensors on one device, and an sm_90 GPU here.

    Raises:
        TypeError: a tensor not on CUDA (meta, CPU) or on another device than the first.
        RuntimeError: no sm_90 GPU (H100/H200) here; there is no fallback.
    """
    for name, t in zip(names, tensors):
        if t.device.type != "cuda":
            raise TypeError(f"{name}: expected a CUDA tensor (on an sm_90 GPU), got device {t.device}")
    dev = tensors[0].device
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != dev:
            raise TypeError(f"{name}: expected the device of {names[0]} ({dev}), got {t.device}")
    from . import _env

    reason = _env.why_no_sm90()
    if reason:
        raise RuntimeError(f"{caller} needs an sm_90 GPU (H100/H200): {reason}")
