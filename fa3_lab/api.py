"""Public API: FlashAttention's conventions on top of the lab's Hopper kernels (DESIGN.md).

Layout BSHD: ``q (batch, seqlen_q, nheads, headdim)``, ``k, v (batch, seqlen_k, nheads_kv, headdim)``,
``nheads % nheads_kv == 0``; ``lse (batch, nheads, seqlen_q)`` float32, natural log. Causal masks are
bottom-right aligned when seqlen_q != seqlen_k (row i sees keys j <= i + seqlen_k - seqlen_q).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import _build

HEADDIMS = (64, 128, 256)


@dataclass(frozen=True)
class Step:
    id: int
    name: str
    adds: str
    paper: str
    dtypes: tuple = ("fp16", "bf16")
    features: tuple = field(default=("causal", "gqa", "any seqlen", "headdim 64/128/256"))


_ALL_STEPS = (
    Step(1, "01_tma_wgmma", "TMA loads + WGMMA (SS for QKᵀ, RS for PV), no warp specialization", "§4.2 Table 2 row 1"),
    Step(2, "02_warp_specialized", "producer warpgroup, s-stage K/V ring with full/empty mbarriers, setmaxnreg",
         "§3.1 Alg. 1"),
    Step(3, "03_pingpong", "named-barrier pingpong of the two consumer warpgroups", "§3.1, Fig. 1"),
    Step(4, "04_intra_warpgroup_overlap", "softmax of tile j+1 under the PV GEMM of tile j", "§3.2 Alg. 2"),
    Step(5, "05_fp8", "e4m3 operands, per-block descales, V k-major (keys permuted, no P shuffle), incoherent processing",
         "§3.3", dtypes=("e4m3",)),
)


# torch.compile traces flash_attn_func's checks; the step files are fixed while a process runs, so
# dynamo may call steps() once at trace time instead of tracing its directory glob (fa3_lab/ops.py).
@torch.compiler.assume_constant_result
def steps() -> list[Step]:
    """The kernel steps whose source is present in ``cuda/steps/``, in order (id, name, what it adds)."""
    present = _build.step_sources()
    return [s for s in _ALL_STEPS if s.id in present]


#: The step :func:`flash_attn_func` runs when ``step`` is None, per headdim: the step that won most
#: of the paper grid (seqlen >= 2k, bf16 and fp16, causal and not) in the recorded run
#: fa3_lab/results/nvidia-h200/bench.json (commit e3e20a7): step 04 at every headdim (at 256 it ties
#: with step 03, 8 points each), as DESIGN.md intends. Kept per headdim so a later tile change can
#: pick differently from a measurement.
DEFAULT_STEP_BY_HEADDIM = {64: 4, 128: 4, 256: 4}


def default_step(headdim: int = 128) -> int:
    """The step :func:`flash_attn_func` runs for this headdim when ``step`` is None.

    Raises:
        ValueError: headdim not in (64, 128, 256).
    """
    if headdim not in DEFAULT_STEP_BY_HEADDIM:
        raise ValueError(f"headdim: expected one of {tuple(DEFAULT_STEP_BY_HEADDIM)}, got {headdim}")
    ids = [s.id for s in steps() if "bf16" in s.dtypes]
    if not ids:
        raise RuntimeError("no 16-bit kernel step found in cuda/steps/")
    best = DEFAULT_STEP_BY_HEADDIM[headdim]
    return best if best in ids else max(ids)


def _has_storage(t) -> bool:
    """False while torch.compile traces (FakeTensors) and for fake/meta tensors: they have no data
    pointer, so the base-alignment check is left to the op's real implementation (fa3_lab/ops.py)."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling():
        return False
    return t.device.type != "meta" and not is_fake(t)


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


def _check_inputs(q, k, v, softmax_scale, allowed_dtypes, dtype_names):
    import torch

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in allowed_dtypes:
            raise TypeError(f"{name}: expected dtype {dtype_names}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cuda":
            raise TypeError(f"{name}: expected a CUDA tensor (on an sm_90 GPU), got device {t.device}")
    if not (q.device == k.device == v.device):
        raise TypeError(f"k, v: expected the device of q ({q.device}), got k {k.device}, v {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
    batch, seqlen_q, nheads, headdim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"k: expected batch {batch} (from q), got {k.shape[0]}")
    if k.shape[3] != headdim:
        raise ValueError(f"k: expected headdim {headdim} (from q), got {k.shape[3]}")
    if headdim not in HEADDIMS:
        raise ValueError(f"q: expected headdim in {HEADDIMS}, got {headdim}")
    nheads_kv = k.shape[2]
    if min(batch, seqlen_q, k.shape[1], nheads, nheads_kv) < 1:
        raise ValueError(f"q, k: every dimension must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if nheads % nheads_kv != 0:
        raise ValueError(f"k: nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})")
    elem = q.element_size()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            raise ValueError(f"{name}: expected the last dim contiguous (stride 1), got strides {t.stride()}")
        if any((s * elem) % 16 for s in t.stride()[:3]) or (_has_storage(t) and t.data_ptr() % 16):
            raise ValueError(f"{name}: TMA needs 16-byte aligned base and strides, got strides {t.stride()}")
    softmax_scale = resolve_softmax_scale(softmax_scale, headdim)
    from . import _env

    reason = _env.why_no_sm90()
    if reason:
        raise RuntimeError(f"flash_attn_func needs an sm_90 GPU (H100/H200): {reason}")
    return float(softmax_scale)


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, *, step=None, return_lse=False, out=None,
                    deterministic=False):
    """FlashAttention-3 forward on Hopper: softmax(α·QKᵀ)·V, one of the lab's kernel steps; differentiable.

    Args:
        q: (batch, seqlen_q, nheads, headdim) fp16/bf16 CUDA tensor, last dim contiguous.
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype/device; nheads % nheads_kv == 0.
        causal: bottom-right aligned causal mask (row i sees keys j <= i + seqlen_k - seqlen_q).
        softmax_scale: α, default 1/sqrt(headdim).
        step: kernel step 1–4 (``fa3_lab.steps()``); default :data:`DEFAULT_STEP_BY_HEADDIM` (the
            fastest measured step for the headdim).
        return_lse: also return lse (batch, nheads, seqlen_q) float32, natural log (+inf for rows
            that see no key).
        out: optional preallocated output, shape and dtype of q (tests poison it first); any strides with
            a contiguous last dim and a 16-byte aligned base and strides (step 04 stores O with TMA).
        deterministic: the backward adds dQ in a fixed order, bitwise reproducible run to run (FA3's flag);
            default False (unordered fp32 atomics, slightly faster).

    Backward (autograd, when q, k or v requires grad): the backward kernel ``cuda/steps/bwd/11_bwd.cu`` (paper
    App. B.1): dq, dk, dv in the inputs' dtype, dk and dv summed over each GQA group; rows that see no key get
    zero gradients; a gradient flowing into lse (``return_lse``) is ignored, as in FlashAttention.

    Returns:
        out (batch, seqlen_q, nheads, headdim), dtype of q; and lse if ``return_lse``.

    Raises:
        TypeError: not a tensor, dtype not fp16/bf16 or mixed, not on a CUDA device.
        ValueError: rank, shapes, headdim not in (64, 128, 256), nheads % nheads_kv, strides.
        RuntimeError: no sm_90 GPU here (nothing is computed; there is no fallback).

    Source: paper §3 (Alg. 1–2), App. B.1 (Alg. 3); kernels in ``cuda/steps/`` and ``cuda/steps/bwd/``.
    """
    import torch

    scale = _check_inputs(q, k, v, softmax_scale, (torch.float16, torch.bfloat16), "float16 or bfloat16")
    available = [s.id for s in steps() if "bf16" in s.dtypes]
    if step is None:
        step = default_step(q.shape[3])
    if isinstance(step, bool) or not isinstance(step, int) or step not in available:
        raise ValueError(f"step: expected one of {available}, got {step!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out: expected a tensor of shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}")
        if out.stride(3) != 1 or any((st * out.element_size()) % 16 for st in out.stride()[:3]) \
                or (_has_storage(out) and out.data_ptr() % 16):
            raise ValueError(f"out: TMA needs a contiguous last dim and a 16-byte aligned base and strides, "
                             f"got strides {out.stride()}")
    from . import ops  # torch.library custom ops (compile-friendly; the extension is loaded lazily)
    o, lse = ops.forward(q, k, v, bool(causal), scale, step, out, deterministic)
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
    "inputs (its backward is cuda/steps/bwd/11_bwd.cu), or run the FP8 forward under torch.no_grad()")


class _Fp8NoBackward(torch.autograd.Function):
    """Identity on the FP8 output that connects it to q, k, v; its backward raises FP8_BACKWARD_MESSAGE."""

    @staticmethod
    def forward(ctx, out, q, k, v):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(FP8_BACKWARD_MESSAGE)
