"""Public API: FlashAttention's conventions on top of the lab's Hopper kernels (docs/design.md).

Layout BSHD: ``q (batch, seqlen_q, nheads, headdim)``, ``k, v (batch, seqlen_k, nheads_kv, headdim)``,
``nheads % nheads_kv == 0``; ``lse (batch, nheads, seqlen_q)`` float32, natural log. Causal masks are
bottom-right aligned when seqlen_q != seqlen_k (row i sees keys j <= i + seqlen_k - seqlen_q).
"""
from __future__ import annotations

import functools
import os

import torch

from . import _build, registry
from ._validate import HEADDIMS, check_bshd, check_flag, check_strides, check_tensors, has_storage, require_sm90
from ._validate import resolve_softmax_scale  # noqa: F401  (public: fa3_lab.api.resolve_softmax_scale)

Step = registry.StepInfo


# torch.compile traces flash_attn_func's checks; the step files are fixed while a process runs, so
# dynamo may call steps() once at trace time instead of tracing its directory glob (fa3_lab/ops.py).
@torch.compiler.assume_constant_result
def steps() -> list[Step]:
    """The kernel steps whose source is present in ``cuda/steps/`` and ``cuda/steps/bwd/``, in id order
    (``fa3_lab.registry``)."""
    return list(_present_steps(os.environ.get("FA3_LAB_STEPS", "")))


@functools.lru_cache(None)
def _present_steps(only: str) -> tuple:
    # keyed by $FA3_LAB_STEPS (which _build reads): every flash_attn_func call asks, three times
    present = {**_build.step_sources(), **_build.bwd_step_sources()}
    return tuple(s for s in registry.STEPS if s.id in present)


def backward_steps() -> list[int]:
    """Ids of the backward steps present (what ``flash_attn_func(bwd_step=...)`` accepts)."""
    return [s.id for s in steps() if s.series == "bwd"]


def default_bwd_step() -> int:
    """The backward step autograd runs when ``bwd_step`` is None: ``registry.DEFAULT_BWD_STEP``, or the last
    one present (``registry.DEFAULT_BWD_STEP`` when none is: the backward then raises that it is not built)."""
    ids = backward_steps()
    return registry.DEFAULT_BWD_STEP if registry.DEFAULT_BWD_STEP in ids or not ids else max(ids)


def forward_steps16() -> list[int]:
    """Ids of the 16-bit forward steps present (what ``flash_attn_func(step=...)`` accepts)."""
    return [s.id for s in steps() if s.series == "fwd" and "bf16" in s.dtypes]


def default_step(headdim: int = 128) -> int:
    """The step :func:`flash_attn_func` runs when ``step`` is None: ``registry.DEFAULT_STEP`` (the last
    16-bit forward step, the fastest at every headdim of the recorded grid), or the last one present.

    Raises:
        ValueError: headdim not in (64, 128, 256).  RuntimeError: no 16-bit step in cuda/steps/.
    """
    if headdim not in HEADDIMS:
        raise ValueError(f"headdim: expected one of {HEADDIMS}, got {headdim}")
    ids = forward_steps16()
    if not ids:
        raise RuntimeError("no 16-bit kernel step found in cuda/steps/")
    return registry.DEFAULT_STEP if registry.DEFAULT_STEP in ids else max(ids)


def _check_inputs(q, k, v, softmax_scale, causal, step, out):
    """Every check of :func:`flash_attn_func`, device last (fa3_lab/_validate.py); returns (scale, step)."""
    names = ("q", "k", "v")
    check_tensors(names, (q, k, v), (torch.float16, torch.bfloat16), "float16 or bfloat16")
    check_bshd(q, k, v)
    check_strides(names, (q, k, v), tma=True)
    scale = resolve_softmax_scale(softmax_scale, q.shape[3])
    check_flag("causal", causal)
    available = forward_steps16()
    if step is None:
        step = default_step(q.shape[3])
    if isinstance(step, bool) or not isinstance(step, int) or step not in available:
        raise ValueError(f"step: expected one of {available}, got {step!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out: expected a tensor of shape {tuple(q.shape)}, dtype {q.dtype}, got {got}")
        if out.stride(3) != 1 or any((st * out.element_size()) % 16 for st in out.stride()[:3]) \
                or (has_storage(out) and out.data_ptr() % 16):
            raise ValueError(f"out: TMA needs a contiguous last dim and a 16-byte aligned base and strides, "
                             f"got strides {out.stride()}")
    require_sm90("flash_attn_func", names + (("out",) if out is not None else ()),
                 (q, k, v) + ((out,) if out is not None else ()))
    return scale, step


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, *, step=None, return_lse=False, out=None,
                    deterministic=False, bwd_step=None):
    """FlashAttention-3 forward on Hopper: softmax(α·QKᵀ)·V, one of the lab's kernel steps; differentiable.

    Args:
        q: (batch, seqlen_q, nheads, headdim) fp16/bf16 CUDA tensor, last dim contiguous.
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype/device; nheads % nheads_kv == 0.
        causal: bottom-right aligned causal mask (row i sees keys j <= i + seqlen_k - seqlen_q).
        softmax_scale: α, default 1/sqrt(headdim).
        step: a 16-bit forward kernel step id (``fa3_lab.steps()``, ``fa3_lab.registry``); default
            :func:`default_step` (``registry.DEFAULT_STEP``, the last forward step).
        return_lse: also return lse (batch, nheads, seqlen_q) float32, natural log (+inf for rows
            that see no key).
        out: optional preallocated output, shape and dtype of q (tests poison it first); any strides with
            a contiguous last dim and a 16-byte aligned base and strides (steps 08–10 store O with TMA).
        deterministic: the backward adds dQ in a fixed order, bitwise reproducible run to run (FA3's flag);
            default False (dQ partials added in whatever order the thread blocks arrive, slightly faster).
        bwd_step: the backward kernel step autograd runs (``cuda/steps/bwd/``); default :func:`default_bwd_step`.

    Backward (autograd, when q, k or v requires grad): backward kernel step ``bwd_step`` (``cuda/steps/bwd/``;
    default ``registry.DEFAULT_BWD_STEP``; paper App. B.1): dq, dk, dv in the inputs' dtype, dk and dv summed over each GQA group; rows that see no key get
    zero gradients; a gradient flowing into lse (``return_lse``) is ignored, as in FlashAttention.

    Returns:
        out (batch, seqlen_q, nheads, headdim), dtype of q; and lse if ``return_lse``.

    Raises:
        TypeError: not a tensor, dtype not fp16/bf16 or mixed, ``causal`` not a bool, not on a CUDA
            device (checked after every shape, stride, scale and step check).
        ValueError: rank, shapes, headdim not in (64, 128, 256), nheads % nheads_kv, strides,
            softmax_scale, step, out.
        RuntimeError: no sm_90 GPU here (nothing is computed; there is no fallback).

    Source: paper §3 (Alg. 1–2), App. B.1 (Alg. 3); kernels in ``cuda/steps/`` and ``cuda/steps/bwd/``.
    """
    check_flag("deterministic", deterministic)  # the backward's arguments, like every scalar, before the device
    if bwd_step is None:
        bwd_step = default_bwd_step()
    elif isinstance(bwd_step, bool) or not isinstance(bwd_step, int) or bwd_step not in backward_steps():
        raise ValueError(f"bwd_step: expected one of {backward_steps()}, got {bwd_step!r}")
    scale, step = _check_inputs(q, k, v, softmax_scale, causal, step, out)
    from . import ops  # torch.library custom ops (compile-friendly; the extension is loaded lazily)
    o, lse = ops.forward(q, k, v, bool(causal), scale, step, out, bool(deterministic), bwd_step)
    return (o, lse) if return_lse else o


def flash_attn_fp8_func(q, k, v, causal=False, softmax_scale=None, *, block_quant=True, incoherent=True,
                        return_lse=False):
    """FP8 e4m3 forward with block quantization and incoherent processing (paper §3.3, step 05).

    16-bit inputs are rotated (Q and K by diag(s)·H/√d, s from ``np.random.default_rng(0)``) and
    quantized to e4m3 with one float32 scale per 128-row tile by one fused CUDA pass that also writes V
    in the kernel's k-major layout (``fa3_lab.fp8.quantize_for_kernel``, ``cuda/fp8_quantize.cu``;
    bitwise the torch path ``fa3_lab.fp8.quantize``); the kernel (``fa3_lab.fp8.fwd_kernel_layout``,
    step 05) then computes ``reference.fp8.fp8_attention``: S in fp32 with the
    descales folded into the softmax scale, P·2^8 rounded to e4m3, O in fp32, out in bf16.

    Args:
        q: (batch, seqlen_q, nheads, headdim) fp16/bf16 CUDA tensor, last dim contiguous.
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype/device; nheads % nheads_kv == 0.
        causal: bottom-right aligned causal mask (row i sees keys j <= i + seqlen_k - seqlen_q).
        softmax_scale: α, default 1/sqrt(headdim) (the rotation leaves headdim and Q·Kᵀ unchanged).
        block_quant: one scale per 128-row tile (True) or one per tensor (False).
        incoherent: apply the random Hadamard rotation to Q and K first (paper's incoherent processing).
        return_lse: also return lse (batch, nheads, seqlen_q) float32, natural log (+inf for rows
            that see no key).

    Returns:
        out (batch, seqlen_q, nheads, headdim) bfloat16; and lse if ``return_lse``.

    Raises:
        TypeError: not a tensor, dtype not fp16/bf16 or mixed, not on a CUDA device, non-bool flags.
        ValueError: rank, shapes, headdim not in (64, 128, 256), nheads % nheads_kv, strides, NaN/inf.
        RuntimeError: no sm_90 GPU here, or the FP8 kernel (cuda/steps/05_fp8.cu) is not in this build.

    Source: paper §3.3 ("Block quantization", "Incoherent processing"), Table 3; ``reference/fp8.py``.
    """
    if 5 not in _build.step_sources():
        raise RuntimeError("flash_attn_fp8_func: the FP8 kernel (cuda/steps/05_fp8.cu) is not built yet")
    from . import fp8

    result = fp8.flash_attn_fp8_func(q, k, v, causal, softmax_scale, block_quant=block_quant,
                                     incoherent=incoherent, return_lse=return_lse)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
        # The e4m3 forward has no backward: mark the output so that .backward() says so instead of
        # "does not require grad" (or silently leaving q, k, v without gradients).
        if return_lse:
            return _Fp8NoBackward.apply(result[0], q, k, v), result[1]
        return _Fp8NoBackward.apply(result, q, k, v)
    return result


#: What a backward through :func:`flash_attn_fp8_func` raises.
FP8_BACKWARD_MESSAGE = (
    "flash_attn_fp8_func: the FP8 (e4m3) path has no backward; train with flash_attn_func on the 16-bit "
    "inputs (its backward kernels are cuda/steps/bwd/), or run the FP8 forward under torch.no_grad()")


class _Fp8NoBackward(torch.autograd.Function):
    """Identity on the FP8 output that connects it to q, k, v; its backward raises FP8_BACKWARD_MESSAGE."""

    @staticmethod
    def forward(ctx, out, q, k, v):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(FP8_BACKWARD_MESSAGE)
