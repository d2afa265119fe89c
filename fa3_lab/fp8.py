"""Step 05 on the GPU: quantize Q, K, V to e4m3 (paper §3.3), lay V out for the kernel, run it.

Two paths to the kernel, highest level first:

* :func:`flash_attn_fp8_func` — 16-bit CUDA Q, K, V in, bf16 out: :func:`quantize_for_kernel`
  then :func:`fwd_kernel_layout`. What users call.
* :func:`quantize_for_kernel` — the fused CUDA kernel (``cuda/fp8_quantize.cu``): incoherent
  processing, block (or per-tensor) quantization and V's kernel layout in one pass over memory;
  bit for bit the torch path below. :func:`fwd_kernel_layout` runs the kernel on its output.
* :func:`quantize` — the same stages in torch on any device, readable op by op. It reproduces
  ``reference.fp8.fp8_attention_inputs`` (the kernel contract): the same sign vector (drawn from
  ``np.random.default_rng(seed)`` by ``reference.fp8.random_signs``), the same butterflies, the
  same amax/448 scales and the same saturation at ±448 before the cast.
  :func:`fwd_quantized` takes its BSHD e4m3 tensors and transposes and key-permutes V with
  :func:`kernel_v_layout` before calling the kernel.

The kernel implements ``reference.fp8.fp8_attention`` with block_m = block_n = 128: K/V tiles
visited last first, P scaled by 2^8 before its e4m3 rounding, O kept in units of the current V
block's scale, out bf16, lse in natural log.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from ._validate import HEADDIMS, check_bshd, check_flag, check_strides, check_tensors, require_sm90
from ._validate import resolve_softmax_scale as _resolve_softmax_scale

BLOCK_M = 128               # Br: Q rows per tile and per q_descale entry (the kernel's tile)
BLOCK_N = 128               # Bc: K/V rows per tile and per k/v_descale entry
E4M3_MAX = 448.0            # largest finite float8_e4m3fn; the cast saturates here
KEY_GROUP = 32              # keys per k-step of the FP8 WGMMA (m64nNk32): the span PERM permutes

#: Column p of every group of 32 keys in the kernel's V layout holds key ``PERM[p]`` of the group.
#: With p = 16·hh + 4·t + j (hh ∈ {0, 1}, t = lane % 4, j ∈ 0..3):
#: PERM[p] = 16·hh + 8·(j // 2) + 2·t + (j % 2). See :func:`kernel_v_layout` for why.
PERM = tuple(16 * hh + 8 * (j // 2) + 2 * t + (j % 2) for hh in (0, 1) for t in range(4) for j in range(4))

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Fp8Tensors(NamedTuple):
    """What :func:`fwd_quantized` reads (torch twin of ``reference.fp8.Fp8Inputs``).

    ``q8`` (batch, seqlen_q, nheads, headdim), ``k8``/``v8`` (batch, seqlen_k, nheads_kv, headdim),
    ``torch.float8_e4m3fn``; ``q_descale`` (batch, nheads, ceil(seqlen_q/128)), ``k_descale`` and
    ``v_descale`` (batch, nheads_kv, ceil(seqlen_k/128)), float32, contiguous: ``q ≈ q8 · q_descale``
    block of rows by block of rows. Per-tensor quantization broadcasts its one scale into these shapes.
    """

    q8: torch.Tensor
    k8: torch.Tensor
    v8: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor


class Fp8KernelInputs(NamedTuple):
    """What :func:`quantize_for_kernel` returns and :func:`fwd_kernel_layout` reads (``*t[:6]``).

    ``q8`` (batch, seqlen_q, nheads, headdim) and ``k8`` (batch, seqlen_k, nheads_kv, headdim)
    ``torch.float8_e4m3fn`` BSHD; ``vt8`` (batch, nheads_kv, headdim, seqlen_k_pad) the kernel's V
    layout (:func:`kernel_v_layout`: keys contiguous, permuted by :data:`PERM` within groups of 32,
    ``seqlen_k_pad = ceil(seqlen_k/128)·128``, padding +0); the descales as in :class:`Fp8Tensors`;
    ``seqlen_k`` the true key count (``kernel_v_layout_inverse(vt8, seqlen_k)`` gives V8 back).
    """

    q8: torch.Tensor
    k8: torch.Tensor
    vt8: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    seqlen_k: int


# --------------------------------------------------------------------------------------------
# V layout for the kernel
# --------------------------------------------------------------------------------------------

def _perm_index(seqlen_pad: int, inverse: bool, device) -> torch.Tensor:
    """Gather index over a padded key axis: stored column c ← key idx[c] (or its inverse)."""
    perm = torch.tensor(PERM, dtype=torch.long, device=device)
    if inverse:
        perm = torch.argsort(perm)                   # key PERM[p] ← column p
    base = torch.arange(0, seqlen_pad, KEY_GROUP, device=device).repeat_interleave(KEY_GROUP)
    return base + perm.repeat(seqlen_pad // KEY_GROUP)


def kernel_v_layout(v8: torch.Tensor) -> torch.Tensor:
    """V8 (batch, seqlen_k, nheads_kv, headdim) → vt8 (batch, nheads_kv, headdim, seqlen_k_pad).

    Two things in one copy, both for the P·V GEMM (WGMMA, A = P from registers, B = V from smem):

    1. **Transpose**: FP8 WGMMA reads its B operand only k-major, and the contraction index k of
       P·V is the key index, so V is stored with keys contiguous: (headdim, seqlen_k) per head.
       ``seqlen_k_pad = ceil(seqlen_k / 128) · 128``; the padded columns are zero (+0 in e4m3) so
       a partial last tile multiplies masked P (= 0) by finite values.
    2. **Key permutation**: within every group of 32 keys, stored column p holds key
       ``g·32 + PERM[p]``. The FP32 accumulator of S = Q·Kᵀ (m64nNk32) gives a thread (t = lane
       % 4) the columns 8c + 2t + {0, 1}, c = 0..3, of each 32-key group; the e4m3 A fragment of
       the next WGMMA wants from it the k indices 16·hh + 4t + j, j = 0..3. Writing the thread's
       8 P values in register order *is* a valid A fragment if A's column p means key PERM[p]
       (p = 16·hh + 4t + j ↦ 16·hh + 8·(j//2) + 2t + (j%2)). A contraction index may be
       renamed freely as long as both factors are renamed alike — Σ_k P[:, k]·V[k, :] is the
       same sum in any order of k — so permuting V's keys the same way makes P·V exact and P
       needs no register shuffle (FA3 does a byte permute in registers instead, §3.3).

    Args:
        v8: (batch, seqlen_k, nheads_kv, headdim) ``torch.float8_e4m3fn`` on any device.

    Returns:
        vt8: contiguous (batch, nheads_kv, headdim, seqlen_k_pad) float8_e4m3fn, same device.

    Raises:
        TypeError: not a tensor or not float8_e4m3fn.
        ValueError: not 4-D, or an empty dimension.
    """
    _check_fp8_tensor("v8", v8)
    _check_rank("v8", v8)
    batch, seqlen_k, nheads_kv, headdim = v8.shape
    seqlen_pad = -(-seqlen_k // BLOCK_N) * BLOCK_N
    raw = v8.view(torch.uint8)                                     # byte moves; float8 index ops are sparse
    vt = torch.zeros(batch, nheads_kv, headdim, seqlen_pad, dtype=torch.uint8, device=v8.device)
    vt[..., :seqlen_k] = raw.permute(0, 2, 3, 1)                   # (b, hkv, d, sk) keys contiguous
    vt = vt.index_select(3, _perm_index(seqlen_pad, False, v8.device))  # column c ← key idx[c]
    return vt.contiguous().view(torch.float8_e4m3fn)


def kernel_v_layout_inverse(vt8: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    """Undo :func:`kernel_v_layout`: vt8 (batch, nheads_kv, headdim, seqlen_k_pad) → v8 BSHD.

    Args:
        vt8: float8_e4m3fn, last dim a multiple of 128 (the padded key axis).
        seqlen_k: the true number of keys, 1 ≤ seqlen_k ≤ seqlen_k_pad.

    Returns:
        (batch, seqlen_k, nheads_kv, headdim) float8_e4m3fn, contiguous.

    Raises:
        TypeError: vt8 not float8_e4m3fn, seqlen_k not an int.
        ValueError: vt8 not 4-D, padded length not a multiple of 128, seqlen_k out of range.
    """
    _check_fp8_tensor("vt8", vt8)
    _check_rank("vt8", vt8)
    seqlen_pad = vt8.shape[3]
    if seqlen_pad % BLOCK_N:
        raise ValueError(f"vt8: expected the last dim a multiple of {BLOCK_N}, got {seqlen_pad}")
    if isinstance(seqlen_k, bool) or not isinstance(seqlen_k, int):
        raise TypeError(f"seqlen_k: expected an int, got {type(seqlen_k).__name__}")
    if not (seqlen_pad - BLOCK_N < seqlen_k <= seqlen_pad):
        raise ValueError(f"seqlen_k: expected {seqlen_pad - BLOCK_N} < seqlen_k <= {seqlen_pad} "
                         f"(vt8's padded length), got {seqlen_k}")
    raw = vt8.view(torch.uint8).index_select(3, _perm_index(seqlen_pad, True, vt8.device))
    return raw[..., :seqlen_k].permute(0, 3, 1, 2).contiguous().view(torch.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _check_fp8_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{name}: expected dtype torch.float8_e4m3fn, got {t.dtype}")


def _check_rank(name, t):
    if t.dim() != 4:
        raise ValueError(f"{name}: expected 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
    if min(t.shape) < 1:
        raise ValueError(f"{name}: every dimension must be >= 1, got shape {tuple(t.shape)}")


def _check_positive_int(name, value, minimum=1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _check_shapes(q, k, v, names=("q", "k", "v")):
    """BSHD shape rules shared by quantize and fwd_quantized (fa3_lab/_validate.py, any headdim: the headdim
    check is the caller's); returns (b, sq, sk, h, hkv, d)."""
    return check_bshd(q, k, v, names, headdims=None)


def _check_same_device(names, tensors):
    dev = tensors[0].device
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != dev:
            raise TypeError(f"{name}: expected the device of {names[0]} ({dev}), got {t.device}")


# --------------------------------------------------------------------------------------------
# Quantization (stages 1–2 of reference.fp8.fp8_attention)
# --------------------------------------------------------------------------------------------

def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform over the last axis, in x's dtype.

    The same butterflies in the same order as ``reference.fp8._fwht`` (so float64 input gives the
    reference's bits exactly), then one division by √d.
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < d:                                     # log2(d) stages of d/2 butterflies
        y = x.reshape(*lead, d // (2 * h), 2, h)     # pairs (a, b) that are h apart
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)      # (a, b) → (a + b, a − b)
        h *= 2
    return x.reshape(*lead, d) / math.sqrt(d)


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32 scale = amax / 448 (computed in float64 as the reference does); 1 where amax = 0."""
    scale = (amax.double() / E4M3_MAX).float()
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Hold in float32, clamp to ±448 (the kernel's satfinite), round to nearest even e4m3."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _quantize_per_block(x: torch.Tensor, block: int):
    batch, seqlen, nheads, headdim = x.shape
    nblocks = -(-seqlen // block)
    pad = torch.zeros(batch, nblocks * block - seqlen, nheads, headdim, dtype=x.dtype, device=x.device)
    amax = torch.cat((x.abs(), pad), dim=1).reshape(batch, nblocks, block, nheads, headdim).amax(dim=(2, 4))
    scale = _scale_from_amax(amax.transpose(1, 2)).contiguous()                  # (b, h, nblk) fp32
    per_row = scale.to(x.dtype).repeat_interleave(block, dim=2)[:, :, :seqlen]   # (b, h, seqlen)
    return _to_e4m3(x / per_row.transpose(1, 2)[..., None]), scale


def _quantize_per_tensor(x: torch.Tensor, nheads: int, block: int):
    batch, seqlen = x.shape[:2]
    scale = _scale_from_amax(x.abs().amax())
    x8 = _to_e4m3(x / scale.to(x.dtype))
    return x8, scale.expand(batch, nheads, -(-seqlen // block)).contiguous()


def quantize(q, k, v, *, block_quant=True, incoherent=True, seed=0, block_m=BLOCK_M, block_n=BLOCK_N):
    """Stages 1–2 of FA3's FP8 forward in torch: rotate Q, K (optional), quantize Q, K, V to e4m3.

    1. ``incoherent``: Q, K ← (Q·diag(s)) H/√d, (K·diag(s)) H/√d with the reference's sign vector
       s (``reference.fp8.random_signs(headdim, seed)``, i.e. ``np.random.default_rng(seed)``) and
       a fast Walsh–Hadamard transform (butterflies, H never formed). ``(QM)(KM)ᵀ = QKᵀ``.
    2. ``block_quant``: one scale per ``block_m`` rows of Q and per ``block_n`` rows of K and V of
       each (batch, head): scale = amax/448 in float32 (1 for an all-zero block), x8 =
       e4m3(clamp(x/scale, ±448)). Otherwise one scale per tensor, broadcast into the same shapes.

    Works on any device. Arithmetic is in float32 for 16-bit or float32 inputs (the GPU path) and
    in float64 for float64 inputs — then it is bit-for-bit ``reference.fp8.fp8_attention_inputs``.
    In float32 the rotation rounds differently from the reference's float64 one, so a scale may
    differ by a float32 ulp and an e4m3 value by one e4m3 ulp (tests/test_fp8_kernel.py measures
    it); without ``incoherent`` the two agree exactly.

    Args:
        q: (batch, seqlen_q, nheads, headdim) float16/bfloat16/float32/float64 tensor, finite.
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype and device; nheads % nheads_kv == 0.
        block_quant: per-tile (True) or per-tensor (False) scales.
        incoherent: apply the random Hadamard rotation to Q and K (headdim a power of two).
        seed: non-negative int, seed of the random signs.
        block_m, block_n: rows per scale of Q and of K/V (the kernel uses 128, 128).

    Returns:
        :class:`Fp8Tensors` (q8, k8, v8 float8_e4m3fn BSHD; q_descale (b, h, ceil(sq/block_m)),
        k_descale, v_descale (b, hkv, ceil(sk/block_n)) float32), on the input's device.

    Raises:
        TypeError: not tensors, unsupported or mixed dtypes, mixed devices, non-bool flags,
            non-int seed or block sizes.
        ValueError: shapes, NaN/inf, headdim not a power of two with ``incoherent``, seed < 0,
            block sizes < 1.

    Source: paper §3.3 "Block quantization" and "Incoherent processing"; reference.fp8 stages 1–2.
    """
    from reference.fp8 import random_signs

    names = ("q", "k", "v")
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    _check_same_device(names, (q, k, v))
    block_quant = check_flag("block_quant", block_quant)
    incoherent = check_flag("incoherent", incoherent)
    seed = _check_positive_int("seed", seed, minimum=0)
    block_m = _check_positive_int("block_m", block_m)
    block_n = _check_positive_int("block_n", block_n)
    _, _, _, nheads, nheads_kv, headdim = _check_shapes(q, k, v)
    if incoherent and headdim & (headdim - 1):
        raise ValueError(f"q: expected headdim a power of two for the Hadamard transform, got {headdim}")
    for name, t in zip(names, (q, k, v)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected finite values, got NaN or inf")

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(work) for t in (q, k, v))
    if incoherent:                                                       # 1. rotate Q and K
        s = torch.from_numpy(random_signs(headdim, seed)).to(device=q.device, dtype=work)
        q, k = _fwht(q * s), _fwht(k * s)
    if block_quant:                                                      # 2. one scale per tile
        (q8, sq), (k8, sk), (v8, sv) = (_quantize_per_block(x, bs) for x, bs in
                                        ((q, block_m), (k, block_n), (v, block_n)))
    else:                                                                # 2'. one scale per tensor
        q8, sq = _quantize_per_tensor(q, nheads, block_m)
        k8, sk = _quantize_per_tensor(k, nheads_kv, block_n)
        v8, sv = _quantize_per_tensor(v, nheads_kv, block_n)
    return Fp8Tensors(q8, k8, v8, sq, sk, sv)


# --------------------------------------------------------------------------------------------
# Fused quantization on the GPU (cuda/fp8_quantize.cu)
# --------------------------------------------------------------------------------------------

_INT32_LIMIT = 1 << 30          # sizes the kernel indexes with 32-bit ints (tiles, rows, heads)


@functools.lru_cache(None)
def _signs_cpu(headdim: int, seed: int) -> torch.Tensor:
    """The sign vector s of :func:`quantize` (``reference.fp8.random_signs``) as a CPU float32 tensor."""
    from reference.fp8 import random_signs

    return torch.from_numpy(random_signs(headdim, seed)).float()


def _check_qkv_16bit(q, k, v, softmax_scale=None, caller="quantize_for_kernel"):
    """Validation shared by :func:`quantize_for_kernel` and :func:`flash_attn_fp8_func` (the same checks,
    in the same order, as :func:`fa3_lab.flash_attn_func`: fa3_lab/_validate.py): 16-bit BSHD tensors,
    last dim contiguous, any other strides (the kernel reads the e4m3 copies). Returns softmax_scale
    resolved."""
    names = ("q", "k", "v")
    check_tensors(names, (q, k, v), (torch.float16, torch.bfloat16), "float16 or bfloat16")
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = check_bshd(q, k, v)
    check_strides(names, (q, k, v), tma=False)
    for name, t in zip(names, (q, k, v)):
        if max(t.shape) >= _INT32_LIMIT:
            raise ValueError(f"{name}: expected every dimension < 2**30, got shape {tuple(t.shape)}")
    tiles = batch * (-(-seqlen_q // BLOCK_M) * nheads + 2 * -(-seqlen_k // BLOCK_N) * nheads_kv)
    if tiles >= 2 * _INT32_LIMIT:
        raise ValueError(f"q, k: {tiles} tiles of 128 rows exceed the kernel's grid (< 2**31)")
    scale = _resolve_softmax_scale(softmax_scale, headdim)
    require_sm90(caller, names, (q, k, v))
    return float(scale)


def _load_ext(caller: str, need_fwd: bool):
    from . import _build

    ext = _build.load()
    if need_fwd and not hasattr(ext, "fwd_fp8"):
        raise RuntimeError(f"{caller}: the FP8 kernel (cuda/steps/05_fp8.cu) is not in this build")
    return ext


def _quantize_fused(ext, q, k, v, block_quant: bool, incoherent: bool, seed: int, check_finite: bool):
    """One call of ``ext.quantize_fp8`` (one launch, two for per-tensor scales) on validated input."""
    signs = _signs_cpu(q.shape[3], seed) if incoherent else None
    q8, k8, vt8, sq, sk, sv, status = ext.quantize_fp8(q, k, v, signs, block_quant)
    if check_finite:
        flags = int(status[3].item())        # bit i: input i held inf/NaN (the kernel's own check)
        for bit, name in enumerate(("q", "k", "v")):
            if flags >> bit & 1:
                raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return Fp8KernelInputs(q8, k8, vt8, sq, sk, sv, int(k.shape[1]))


def quantize_for_kernel(q, k, v, *, block_quant=True, incoherent=True, seed=0, check_finite=True):
    """Stages 1–2 of FA3's FP8 forward fused into one CUDA kernel, V written in the kernel's layout.

    Per (tensor, batch, head, block of 128 rows), in one read of the 16-bit inputs and one write of
    the e4m3 outputs (``cuda/fp8_quantize.cu``): rotate Q and K by diag(s)·H/√d (``incoherent``;
    s = ``reference.fp8.random_signs(headdim, seed)``, the butterflies in :func:`quantize`'s order),
    take the block amax, scale = amax/448 (1 for an all-zero block), x8 = e4m3(clamp(x/scale, ±448))
    rounded to nearest even; V goes straight to :func:`kernel_v_layout`'s layout (transposed, keys
    permuted by :data:`PERM` within groups of 32, zero padding). ``block_quant=False``: one scale
    per tensor (a first launch reduces the amax, the second quantizes), broadcast into the descales.

    It is built to reproduce :func:`quantize` on CUDA (its float32 path) followed by
    :func:`kernel_v_layout` bit for bit: the same float32 operations in the same order, including
    torch's ``x / python_float`` = ``x · fl32(1/b)`` and ``amax.double() / 448`` =
    ``amax · fl64(1/448)`` on CUDA. tests/test_fp8_quantize.py asserts at most one ulp (e4m3 and
    float32) with ≥ 99.9 % identical bytes on every shape, and identity on a separate case.

    Non-finite input is detected by the kernel itself (a flag per input, read back with one 4-byte
    copy, which synchronizes) and raises before anything is returned; the quantization has run by
    then, the attention has not. With ``check_finite=False`` nothing is read back and a block that
    holds inf/NaN gets a NaN descale.

    Args:
        q: (batch, seqlen_q, nheads, headdim) float16/bfloat16 CUDA tensor, last dim contiguous (any
            other strides, e.g. a slice of a packed qkv tensor); headdim in (64, 128, 256).
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype and device; nheads % nheads_kv == 0.
        block_quant: one scale per 128-row block (True) or per tensor (False).
        incoherent: rotate Q and K first (paper's incoherent processing).
        seed: non-negative int, seed of the random signs (:func:`flash_attn_fp8_func` uses 0).
        check_finite: raise on inf/NaN input (one device-to-host sync).

    Returns:
        :class:`Fp8KernelInputs`: q8 (batch, seqlen_q, nheads, headdim) and k8 (batch, seqlen_k,
        nheads_kv, headdim) float8_e4m3fn contiguous; vt8 (batch, nheads_kv, headdim,
        ceil(seqlen_k/128)·128) float8_e4m3fn contiguous; q_descale (batch, nheads,
        ceil(seqlen_q/128)), k_descale, v_descale (batch, nheads_kv, ceil(seqlen_k/128)) float32
        contiguous; seqlen_k. Feed it to :func:`fwd_kernel_layout`.

    Raises:
        TypeError: not tensors, dtype not float16/bfloat16 or mixed, not CUDA, mixed devices,
            non-bool flags, non-int seed.
        ValueError: shapes, headdim, nheads % nheads_kv, last dim not contiguous, seed < 0, sizes
            beyond 32-bit indexing; inf/NaN in an input (``check_finite``).
        RuntimeError: no sm_90 GPU (nothing computed, no fallback).

    Source: paper §3.3 "Block quantization" and "Incoherent processing"; contract
    ``reference.fp8.fp8_attention_inputs`` (as computed by :func:`quantize` in float32).
    """
    block_quant = check_flag("block_quant", block_quant)
    incoherent = check_flag("incoherent", incoherent)
    check_finite = check_flag("check_finite", check_finite)
    seed = _check_positive_int("seed", seed, minimum=0)
    _check_qkv_16bit(q, k, v, caller="quantize_for_kernel")
    ext = _load_ext("quantize_for_kernel", need_fwd=False)
    return _quantize_fused(ext, q, k, v, block_quant, incoherent, seed, check_finite)


# --------------------------------------------------------------------------------------------
# The kernel call
# --------------------------------------------------------------------------------------------

def _check_vt8(vt8, batch, nheads_kv, headdim, seqlen_k):
    if vt8.dim() != 4:
        raise ValueError(f"vt8: expected 4 dims (batch, nheads_kv, headdim, seqlen_k_pad), got shape {tuple(vt8.shape)}")
    want = (batch, nheads_kv, headdim, -(-seqlen_k // BLOCK_N) * BLOCK_N)
    if tuple(vt8.shape) != want:
        raise ValueError(f"vt8: expected shape {want} (batch, nheads_kv, headdim, seqlen_k of k8 padded to "
                         f"{BLOCK_N}), got {tuple(vt8.shape)}")
    if not vt8.is_contiguous():
        raise ValueError(f"vt8: expected a contiguous tensor (as kernel_v_layout / quantize_for_kernel make it), "
                         f"got strides {vt8.stride()}")


def _check_quantized(q8, k8, v8, q_descale, k_descale, v_descale, softmax_scale, out, *, vt=False,
                     caller="fwd_quantized"):
    """Validation of the kernel's e4m3 inputs; ``vt``: the third tensor is vt8 (kernel layout)."""
    names = ("q8", "k8", "vt8" if vt else "v8")
    for name, t in zip(names, (q8, k8, v8)):
        _check_fp8_tensor(name, t)
    dnames = ("q_descale", "k_descale", "v_descale")
    for name, t in zip(dnames, (q_descale, k_descale, v_descale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
    if vt:
        batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = _check_shapes(q8, k8, k8, ("q8", "k8", "k8"))
        _check_vt8(v8, batch, nheads_kv, headdim, seqlen_k)
    else:
        batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = _check_shapes(q8, k8, v8, names)
    if headdim not in HEADDIMS:
        raise ValueError(f"q8: expected headdim in {HEADDIMS}, got {headdim}")
    for name, t in zip(names[:2] if vt else names, (q8, k8, v8)):
        if t.stride(3) != 1:
            raise ValueError(f"{name}: expected the last dim contiguous (stride 1), got strides {t.stride()}")
        if any(s % 16 for s in t.stride()[:3]):          # 1 byte per element: strides in bytes
            raise ValueError(f"{name}: TMA needs 16-byte aligned strides, got strides {t.stride()}")
    want = {"q_descale": (batch, nheads, -(-seqlen_q // BLOCK_M)),
            "k_descale": (batch, nheads_kv, -(-seqlen_k // BLOCK_N)),
            "v_descale": (batch, nheads_kv, -(-seqlen_k // BLOCK_N))}
    for name, t in zip(dnames, (q_descale, k_descale, v_descale)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name}: expected shape {want[name]} (batch, heads, blocks of 128 rows), "
                             f"got {tuple(t.shape)}")
    scale = _resolve_softmax_scale(softmax_scale, headdim)
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q8.shape) or out.dtype != torch.bfloat16:
            got = (f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise ValueError(f"out: expected a bfloat16 tensor of shape {tuple(q8.shape)}, got {got}")
    all_names = names + dnames + (("out",) if out is not None else ())
    all_t = (q8, k8, v8, q_descale, k_descale, v_descale) + ((out,) if out is not None else ())
    for name, t in zip(all_names, all_t):
        if t.device.type != "cuda":
            raise TypeError(f"{name}: expected a CUDA tensor (on an sm_90 GPU), got device {t.device}")
    _check_same_device(all_names, all_t)
    for name, t in zip(names, (q8, k8, v8)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: TMA needs a 16-byte aligned base address")
    from . import _env

    reason = _env.why_no_sm90()
    if reason:
        raise RuntimeError(f"{caller} needs an sm_90 GPU (H100/H200): {reason}")
    return scale


def _run_fwd_fp8(ext, q8, k8, vt8, q_descale, k_descale, v_descale, causal, scale, out):
    # the descales are tiny (one float per 128 rows): any strides are accepted and copied contiguous
    q_descale, k_descale, v_descale = (t.contiguous() for t in (q_descale, k_descale, v_descale))
    return ext.fwd_fp8(q8, k8, vt8, q_descale, k_descale, v_descale, BLOCK_M, BLOCK_N, causal, scale, out)


def fwd_quantized(q8, k8, v8, q_descale, k_descale, v_descale, causal=False, softmax_scale=None, *,
                  return_lse=False, out=None):
    """The FP8 kernel (step 05) on e4m3 inputs with per-block descales: ``reference.fp8.fp8_attention``.

    Stages 3–6 of the contract, with block_m = block_n = 128: S = Q8_i K8_jᵀ in fp32 with
    ``α·log2(e)·q_descale·k_descale`` folded into one FFMA, online softmax in base 2, P·2^8 rounded
    to e4m3, O accumulated in units of the current V block's descale, out = O·v_descale/ℓ in bf16.
    V is first transposed and key-permuted by :func:`kernel_v_layout` (one extra copy of V);
    :func:`fwd_kernel_layout` takes V already in that layout (from :func:`quantize_for_kernel`).

    Args:
        q8: (batch, seqlen_q, nheads, headdim) torch.float8_e4m3fn CUDA tensor, last dim contiguous,
            16-byte aligned strides; headdim in (64, 128, 256).
        k8, v8: (batch, seqlen_k, nheads_kv, headdim), same rules; nheads % nheads_kv == 0.
        q_descale: (batch, nheads, ceil(seqlen_q/128)) float32, contiguous: q ≈ q8·q_descale.
        k_descale, v_descale: (batch, nheads_kv, ceil(seqlen_k/128)) float32, contiguous.
        causal: bottom-right aligned causal mask.
        softmax_scale: α applied to the *dequantized* Q·Kᵀ, default 1/√headdim.
        return_lse: also return lse (batch, nheads, seqlen_q) float32, natural log (+inf for a row
            that sees no key).
        out: optional preallocated bf16 output of q8's shape (tests poison it first).

    Returns:
        out (batch, seqlen_q, nheads, headdim) bfloat16; and lse if ``return_lse``.

    Raises:
        TypeError: not tensors, wrong dtypes (e4m3 / float32), not CUDA, mixed devices.
        ValueError: shapes, headdim, nheads % nheads_kv, descale shapes, strides, softmax_scale.
        RuntimeError: no sm_90 GPU (nothing computed, no fallback).

    Source: paper §3.3, Alg. 1 with FP8 operands; contract ``reference/fp8.py`` ``fp8_attention``.
    """
    causal = check_flag("causal", causal)
    scale = _check_quantized(q8, k8, v8, q_descale, k_descale, v_descale, softmax_scale, out)
    ext = _load_ext("fwd_quantized", need_fwd=True)
    vt8 = kernel_v_layout(v8)
    o, lse = _run_fwd_fp8(ext, q8, k8, vt8, q_descale, k_descale, v_descale, causal, scale, out)
    return (o, lse) if return_lse else o


def fwd_kernel_layout(q8, k8, vt8, q_descale, k_descale, v_descale, causal=False, softmax_scale=None, *,
                      return_lse=False, out=None):
    """The FP8 kernel (step 05) on inputs already in its layout: :func:`fwd_quantized` without the V copy.

    Takes what :func:`quantize_for_kernel` returns (``fwd_kernel_layout(*t[:6])``), or
    :func:`kernel_v_layout` of an e4m3 V. Same computation and output as :func:`fwd_quantized`.

    Args:
        q8: (batch, seqlen_q, nheads, headdim) torch.float8_e4m3fn CUDA tensor, last dim contiguous,
            16-byte aligned strides; headdim in (64, 128, 256).
        k8: (batch, seqlen_k, nheads_kv, headdim), same rules; nheads % nheads_kv == 0.
        vt8: (batch, nheads_kv, headdim, ceil(seqlen_k/128)·128) float8_e4m3fn, contiguous, keys
            permuted within groups of 32 (:data:`PERM`), padded keys +0.
        q_descale: (batch, nheads, ceil(seqlen_q/128)) float32: q ≈ q8·q_descale.
        k_descale, v_descale: (batch, nheads_kv, ceil(seqlen_k/128)) float32.
        causal: bottom-right aligned causal mask.
        softmax_scale: α applied to the dequantized Q·Kᵀ, default 1/√headdim.
        return_lse: also return lse (batch, nheads, seqlen_q) float32, natural log.
        out: optional preallocated bf16 output of q8's shape.

    Returns:
        out (batch, seqlen_q, nheads, headdim) bfloat16; and lse if ``return_lse``.

    Raises:
        TypeError: not tensors, wrong dtypes (e4m3 / float32), not CUDA, mixed devices.
        ValueError: shapes (vt8's included), headdim, nheads % nheads_kv, descale shapes, strides,
            vt8 not contiguous, softmax_scale.
        RuntimeError: no sm_90 GPU, or no step 05 in the build (nothing computed, no fallback).

    Source: paper §3.3; contract ``reference/fp8.py`` ``fp8_attention``.
    """
    causal = check_flag("causal", causal)
    scale = _check_quantized(q8, k8, vt8, q_descale, k_descale, v_descale, softmax_scale, out, vt=True,
                             caller="fwd_kernel_layout")
    ext = _load_ext("fwd_kernel_layout", need_fwd=True)
    o, lse = _run_fwd_fp8(ext, q8, k8, vt8, q_descale, k_descale, v_descale, causal, scale, out)
    return (o, lse) if return_lse else o


def flash_attn_fp8_func(q, k, v, causal=False, softmax_scale=None, *, block_quant=True, incoherent=True,
                        return_lse=False):
    """FP8 e4m3 attention from 16-bit inputs: :func:`quantize_for_kernel` then the kernel (paper §3.3).

    Two launches (three with per-tensor scales): the fused quantize kernel, which writes V in the
    kernel's layout, and step 05. Inputs need only a contiguous last dim (a slice of a packed qkv
    tensor is fine): the kernel reads the e4m3 copies, never the inputs.

    Args:
        q: (batch, seqlen_q, nheads, headdim) float16/bfloat16 CUDA tensor, last dim contiguous.
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype/device; nheads % nheads_kv == 0.
        causal: bottom-right aligned causal mask.
        softmax_scale: α, default 1/√headdim (the rotation keeps headdim and Q·Kᵀ unchanged).
        block_quant: per-tile scales (True) or per tensor (False).
        incoherent: rotate Q and K by diag(s)·H/√d (seed 0) before quantizing.
        return_lse: also return lse (batch, nheads, seqlen_q) float32, natural log.

    Returns:
        out (batch, seqlen_q, nheads, headdim) bfloat16; and lse if ``return_lse``.

    Raises:
        TypeError: not tensors, dtype not fp16/bf16 or mixed, not CUDA, non-bool flags.
        ValueError: shapes, headdim not in (64, 128, 256), nheads % nheads_kv, last dim not
            contiguous, softmax_scale, NaN/inf (found by the quantize kernel, before the attention).
        RuntimeError: no sm_90 GPU, or no step 05 in the build.
    """
    block_quant = check_flag("block_quant", block_quant)
    incoherent = check_flag("incoherent", incoherent)
    causal = check_flag("causal", causal)
    return_lse = check_flag("return_lse", return_lse)
    scale = _check_qkv_16bit(q, k, v, softmax_scale, caller="flash_attn_fp8_func")
    ext = _load_ext("flash_attn_fp8_func", need_fwd=True)
    t = _quantize_fused(ext, q, k, v, block_quant, incoherent, 0, check_finite=True)
    o, lse = _run_fwd_fp8(ext, t.q8, t.k8, t.vt8, t.q_descale, t.k_descale, t.v_descale, causal, scale, None)
    return (o, lse) if return_lse else o


def quantize_bytes(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, elem_bytes=2) -> int:
    """Bytes :func:`quantize_for_kernel` must move at least: read Q, K, V once (16-bit), write q8,
    k8, vt8 (one byte per element, V padded to 128 keys) and the float32 descales."""
    nq, nk = -(-seqlen_q // BLOCK_M), -(-seqlen_k // BLOCK_N)
    read = elem_bytes * batch * headdim * (seqlen_q * nheads + 2 * seqlen_k * nheads_kv)
    write = batch * headdim * (seqlen_q * nheads + seqlen_k * nheads_kv + nk * BLOCK_N * nheads_kv)
    return read + write + 4 * batch * (nq * nheads + 2 * nk * nheads_kv)
