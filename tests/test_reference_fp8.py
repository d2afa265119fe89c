"""Step 05 reference: e4m3 rounding, block quantization, incoherent processing, the FP8 kernel
contract (reference/fp8.py) and paper Table 3's orderings."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

from reference import fp8
from reference.attention import standard_attention
from reference.fp8 import (
    E4M3_MAX,
    E5M2_MAX,
    PAPER_TABLE3,
    baseline_fp8_attention,
    dequantize,
    flash_fp16_attention,
    fp8_attention,
    fp8_attention_inputs,
    fwht,
    incoherent_transform,
    numerical_error_table,
    quantize_per_block,
    quantize_per_tensor,
    random_signs,
    rmse,
    to_e4m3,
    to_e5m2,
)

E4M3 = ml_dtypes.float8_e4m3fn


def _e4m3_grid() -> np.ndarray:
    """All finite e4m3fn values, from the 256 bit patterns (independent of any rounding code)."""
    vals = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    return np.unique(vals[np.isfinite(vals)])


def _mismatch(a, b) -> str:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    idx = np.unravel_index(np.argmax(diff), diff.shape)
    return f"max |diff| {diff.max():.3g} at {idx}, mean {diff.mean():.3g}, shape {diff.shape}"


def _bshd(rng, batch, seqlen, nheads, headdim, scale=1.0):
    return scale * rng.standard_normal((batch, seqlen, nheads, headdim))


# ----------------------------------------------------------------------------------------------
# e4m3 / e5m2 rounding
# ----------------------------------------------------------------------------------------------

def test_e4m3_grid_is_the_format():
    grid = _e4m3_grid()
    assert grid.max() == E4M3_MAX == 448.0
    assert len(grid) == 253           # 2 · 126 nonzero magnitudes + zero (±0 merge; NaN excluded)
    # 3 mantissa bits: the relative spacing of normals lies in [2^-3, 2^-4]
    pos = grid[grid >= 2.0**-6]
    rel = np.diff(pos) / pos[:-1]
    assert rel.max() == pytest.approx(2.0**-3) and rel.min() == pytest.approx(2.0**-3 / 1.875)
    # every grid value is a fixed point of to_e4m3
    np.testing.assert_array_equal(to_e4m3(grid).astype(np.float64), grid)


def test_to_e4m3_rounds_to_nearest_grid_value(rng):
    grid = _e4m3_grid()
    x = rng.uniform(-448.0, 448.0, 20000) * 2.0 ** rng.integers(-12, 1, 20000)
    got = to_e4m3(x.astype(np.float32)).astype(np.float64)
    # nearest grid value by brute force; a tie may go either way only at exact midpoints
    dist = np.abs(x.astype(np.float32).astype(np.float64)[:, None] - grid[None, :])
    best = dist.min(axis=1)
    got_dist = np.abs(x.astype(np.float32).astype(np.float64) - got)
    np.testing.assert_array_equal(got_dist, best)
    assert to_e4m3(x).dtype == E4M3


def test_to_e4m3_saturates_beyond_448_instead_of_nan():
    x = np.array([448.0, 449.0, 464.0, 500.0, 1e6, -1e6, -470.0, 3e38], np.float64)
    got = to_e4m3(x).astype(np.float64)
    np.testing.assert_array_equal(got, [448, 448, 448, 448, 448, -448, -448, 448])
    # the reason for the clip: ml_dtypes' own cast gives NaN for e4m3fn overflow
    assert np.isnan(np.array([500.0], np.float32).astype(E4M3).astype(np.float32)[0])


def test_to_e5m2_saturates_and_keeps_two_mantissa_bits():
    got = to_e5m2(np.array([57344.0, 61440.0, 1e9, -1e9, 1.25, 1.3])).astype(np.float64)
    np.testing.assert_array_equal(got, [E5M2_MAX, E5M2_MAX, E5M2_MAX, -E5M2_MAX, 1.25, 1.25])
    assert to_e5m2(np.ones(3)).dtype == ml_dtypes.float8_e5m2


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------

def _relative_error_on_normals(x, x_hat, scale_per_elem):
    """Relative error where x/scale is an e4m3 normal (>= 2^-6), the regime the 2^-4 bound holds."""
    normal = np.abs(x) / scale_per_elem >= 2.0**-6
    assert normal.mean() > 0.95
    return np.max(np.abs(x_hat - x)[normal] / np.abs(x)[normal])


def test_quantize_per_tensor_round_trip_within_half_ulp(rng):
    x = _bshd(rng, 2, 77, 3, 64) * np.exp(rng.uniform(-2, 2, (2, 77, 3, 64)))
    x8, scale = quantize_per_tensor(x)
    assert x8.dtype == E4M3 and x8.shape == x.shape
    assert isinstance(scale, np.float32)
    assert scale == np.float32(np.abs(x).max() / 448.0)
    x_hat = dequantize(x8, scale)
    assert _relative_error_on_normals(x, x_hat, float(scale)) <= 2.0**-4
    # the amax element lands on 448 (up to the fp32 rounding of the scale)
    i = np.unravel_index(np.argmax(np.abs(x)), x.shape)
    assert abs(float(x8[i].astype(np.float32))) == 448.0


def test_quantize_per_block_scales_are_block_amax(rng):
    batch, seqlen, nheads, headdim, bs = 2, 203, 3, 32, 64
    x = _bshd(rng, batch, seqlen, nheads, headdim)
    x[1, 70, 2, 5] = 300.0                           # an outlier in block 1 of (b=1, h=2) only
    x[0, 128:192, 1, :] = 0.0                         # an all-zero block
    x8, scale = quantize_per_block(x, bs)
    nblk = math.ceil(seqlen / bs)
    assert scale.shape == (batch, nheads, nblk) and scale.dtype == np.float32
    for b in range(batch):
        for h in range(nheads):
            for n in range(nblk):
                amax = np.abs(x[b, n * bs:(n + 1) * bs, h, :]).max()
                want = 1.0 if amax == 0 else np.float32(amax / 448.0)
                assert scale[b, h, n] == np.float32(want), (b, h, n)
    assert scale[1, 2, 1] == np.float32(300.0 / 448.0)
    assert scale[0, 1, 2] == 1.0
    x_hat = dequantize(x8, scale, bs)
    per_elem = np.repeat(scale, bs, axis=2)[:, :, :seqlen].transpose(0, 2, 1)[..., None]
    nz = x != 0
    assert _relative_error_on_normals(x[nz], x_hat[nz], np.broadcast_to(per_elem, x.shape)[nz]) <= 2.0**-4
    np.testing.assert_array_equal(x_hat[0, 128:192, 1], 0.0)


def test_block_quantization_protects_blocks_without_outliers(rng):
    """Relative precision does not depend on the scale — until the rest falls into subnormals.

    e4m3 normals span [2^-6, 448], a ratio of 2^14.8 ≈ 29000. An outlier 1e5 times the typical
    value gives a per-tensor scale of 1e5/448 ≈ 223, so ordinary values ~1 become ~0.0045 < 2^-6:
    subnormal or zero. The block without the outlier gets its own scale and keeps 3 mantissa bits.
    An outlier only 2000 times larger leaves the rest normal, and blocks change (almost) nothing.
    """
    x = _bshd(rng, 1, 256, 1, 64)
    x[0, 3, 0, 7] = 1e5                               # outlier in block 0 only
    _, sc_t = quantize_per_tensor(x)
    x8, sc_b = quantize_per_block(x, 128)
    x_t = dequantize(*quantize_per_tensor(x))
    x_b = dequantize(x8, sc_b, 128)
    rest = slice(128, 256)
    err_t = rmse(x_t[0, rest], x[0, rest])
    err_b = rmse(x_b[0, rest], x[0, rest])
    assert sc_b[0, 0, 1] < sc_t / 100
    assert err_b < err_t / 3
    assert err_b < 2.0**-4                                   # 3 mantissa bits kept
    x[0, 3, 0, 7] = 2000.0                                   # rest stays normal: no gain
    x8, sc_b = quantize_per_block(x, 128)
    err_t = rmse(dequantize(*quantize_per_tensor(x))[0, rest], x[0, rest])
    err_b = rmse(dequantize(x8, sc_b, 128)[0, rest], x[0, rest])
    assert 0.8 < err_t / err_b < 1.25


def test_quantize_accepts_16bit_inputs(rng):
    x = _bshd(rng, 1, 40, 2, 16).astype(np.float16)
    x8, sc = quantize_per_block(x, 16)
    assert x8.dtype == E4M3 and sc.shape == (1, 2, 3)
    xb = x.astype(np.float32).astype(ml_dtypes.bfloat16)
    x8b, scb = quantize_per_tensor(xb)
    assert x8b.dtype == E4M3 and scb > 0


# ----------------------------------------------------------------------------------------------
# Hadamard and incoherent processing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 4, 8, 32, 64, 128, 256])
def test_fwht_equals_dense_hadamard(rng, d):
    x = rng.standard_normal((3, 5, d))
    want = x @ scipy.linalg.hadamard(d) / math.sqrt(d)
    np.testing.assert_allclose(fwht(x), want, rtol=0, atol=1e-12 * max(1.0, np.abs(want).max()))
    # its own inverse (H/√d is orthogonal and symmetric)
    np.testing.assert_allclose(fwht(fwht(x)), x, rtol=0, atol=1e-12)
    assert fwht(x).dtype == np.float64


def test_fwht_spreads_a_spike_evenly():
    x = np.zeros(128)
    x[17] = 10.0
    y = fwht(x)
    np.testing.assert_allclose(np.abs(y), 10.0 / math.sqrt(128), rtol=1e-14)


def test_incoherent_transform_preserves_qk_and_is_the_documented_matrix(rng):
    q = _bshd(rng, 2, 33, 4, 64)
    k = _bshd(rng, 2, 47, 2, 64)
    q[0, 3, 1, 9] = 80.0                              # an outlier
    qr, kr = incoherent_transform(q, k, seed=7)
    for h in range(4):
        hk = h // 2
        s_ref = q[:, :, h] @ k[:, :, hk].swapaxes(-1, -2)
        s_rot = qr[:, :, h] @ kr[:, :, hk].swapaxes(-1, -2)
        assert np.max(np.abs(s_rot - s_ref)) <= 1e-10 * np.max(np.abs(s_ref))
    # M = diag(s)·H/√d with s from default_rng(seed), shared by every head
    s = random_signs(64, 7)
    assert set(np.unique(s)) == {-1.0, 1.0}
    m = np.diag(s) @ scipy.linalg.hadamard(64) / 8.0
    np.testing.assert_allclose(qr, q @ m, atol=1e-12)
    np.testing.assert_allclose(kr, k @ m, atol=1e-12)
    # the outlier is spread: the rotated row has no coordinate near 80
    assert np.abs(qr[0, 3, 1]).max() < 80.0 / 8.0 + 5.0
    # a different seed gives a different rotation; the same seed the same one
    qr2, _ = incoherent_transform(q, k, seed=8)
    assert not np.allclose(qr, qr2)
    np.testing.assert_array_equal(incoherent_transform(q, k, seed=7)[0], qr)


# ----------------------------------------------------------------------------------------------
# fp8_attention: the kernel contract
# ----------------------------------------------------------------------------------------------

CASES = [
    # batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, causal, block_m, block_n
    (2, 113, 203, 4, 2, 64, True, 64, 32),
    (1, 203, 113, 2, 1, 128, True, 128, 128),     # seqlen_q > seqlen_k: fully masked rows
    (2, 1, 203, 2, 2, 64, False, 128, 128),
    (1, 1, 1, 1, 1, 32, True, 128, 128),
    (1, 256, 256, 2, 2, 64, False, 1024, 1024),   # one tile
    (1, 256, 256, 2, 2, 64, True, 16, 16),        # many tiles
    (1, 203, 203, 6, 2, 64, True, 48, 80),        # GQA, block_m != block_n
]


def _dequantized_reference(q, k, v, causal, **kw):
    """float64 attention of exactly the values the kernel reads (Q8·sq, K8·sk, V8·sv)."""
    inp = fp8_attention_inputs(q, k, v, **kw)
    qd = dequantize(inp.q8, inp.q_scale, inp.block_m)
    kd = dequantize(inp.k8, inp.k_scale, inp.block_n)
    vd = dequantize(inp.v8, inp.v_scale, inp.block_n)
    return standard_attention(qd, kd, vd, causal=causal)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_sk{}_h{}_hk{}_d{}_causal{}_bm{}_bn{}".format(*c))
@pytest.mark.parametrize("block_quant,incoherent", [(True, True), (False, True), (True, False), (False, False)])
def test_fp8_attention_close_to_float64(rng, case, block_quant, incoherent):
    batch, sq, sk, h, hk, d, causal, bm, bn = case
    q, k, v = _bshd(rng, batch, sq, h, d), _bshd(rng, batch, sk, hk, d), _bshd(rng, batch, sk, hk, d)
    out, lse = fp8_attention(q, k, v, causal=causal, block_quant=block_quant, incoherent=incoherent,
                             block_m=bm, block_n=bn, seed=3)
    assert out.shape == q.shape and out.dtype == np.float32
    assert lse.shape == (batch, h, sq) and lse.dtype == np.float32
    # out holds bf16 values
    np.testing.assert_array_equal(out.astype(ml_dtypes.bfloat16).astype(np.float32), out)

    ref, lse_ref = standard_attention(q, k, v, causal=causal)
    seen = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), seen)
    # rows without keys: out 0, lse +inf
    assert np.all(out.transpose(0, 2, 1, 3)[~seen] == 0)
    # loose: e4m3 rounds with a relative error <= 2^-4 (about 2^-5.6 rms) per entry; with random V
    # the output and its error shrink alike when averaged over keys, so the bound is relative
    ref_rms = math.sqrt(np.mean(ref**2))
    assert rmse(out, ref) < 0.1 * ref_rms, _mismatch(out, ref)
    assert np.max(np.abs(out - ref)) < 0.1 * np.abs(ref).max(), _mismatch(out, ref)
    assert np.max(np.abs(lse[seen] - lse_ref[seen])) < 0.15

    # tight: against the exact attention of the quantized values, only P's e4m3 rounding and
    # the bf16 output remain; lse (from the unrounded fp32 P) agrees to float32 precision,
    # which checks that every descale was folded in exactly once.
    ref_q, lse_q = _dequantized_reference(q, k, v, causal, block_quant=block_quant, incoherent=incoherent,
                                          block_m=bm, block_n=bn, seed=3)
    assert rmse(out, ref_q) < 0.05 * ref_rms, _mismatch(out, ref_q)
    np.testing.assert_allclose(lse[seen], lse_q[seen], rtol=2e-6, atol=2e-6)


def test_fp8_attention_v_blocks_of_very_different_scale(rng):
    """O is kept in units of the current V block's scale; a wrong sv ratio would show at once."""
    q, k = _bshd(rng, 1, 96, 2, 64), _bshd(rng, 1, 256, 2, 64)
    v = _bshd(rng, 1, 256, 2, 64)
    v[:, 64:128] *= 1000.0
    v[:, 192:] *= 1e-3
    out, _ = fp8_attention(q, k, v, block_m=32, block_n=64)
    ref_q, _ = _dequantized_reference(q, k, v, False, block_m=32, block_n=64)
    # P8's rounding leaves ~3% relative error; a wrong sv ratio would leave ~100%
    assert rmse(out, ref_q) < 0.05 * math.sqrt(np.mean(ref_q**2)), _mismatch(out, ref_q)


def test_fp8_attention_single_tile_matches_vectorized_emulation(rng):
    """With one K/V tile the online softmax is a plain one: P8 = e4m3(2^(S·scale_log2 − m + 8))."""
    q, k, v = _bshd(rng, 1, 50, 1, 64), _bshd(rng, 1, 70, 1, 64), _bshd(rng, 1, 70, 1, 64)
    out, lse = fp8_attention(q, k, v, incoherent=False, block_m=64, block_n=128)
    q8, sq = quantize_per_tensor(q)       # a single block equals the per-tensor scale
    k8, sk = quantize_per_tensor(k)
    v8, sv = quantize_per_tensor(v)
    s = q8[0, :, 0].astype(np.float64) @ k8[0, :, 0].astype(np.float64).T
    x = s * (1 / 8) * math.log2(math.e) * float(sq) * float(sk)
    m = x.max(axis=1, keepdims=True)
    p = np.exp2(x - m + 8)
    p8 = np.clip(p, 0, 448).astype(np.float32).astype(E4M3).astype(np.float64)
    want = (p8 @ v8[0, :, 0].astype(np.float64)) * float(sv) / p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out[0, :, 0], want, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(lse[0, 0], (m[:, 0] - 8) * math.log(2) + np.log(p.sum(axis=1)), rtol=1e-6)


def test_fp8_attention_inputs_are_what_the_kernel_reads(rng):
    q, k, v = _bshd(rng, 2, 100, 4, 64), _bshd(rng, 2, 70, 2, 64), _bshd(rng, 2, 70, 2, 64)
    inp = fp8_attention_inputs(q, k, v, block_m=64, block_n=32, seed=5)
    assert inp.q8.dtype == inp.k8.dtype == inp.v8.dtype == E4M3
    assert inp.q_scale.shape == (2, 4, 2) and inp.k_scale.shape == inp.v_scale.shape == (2, 2, 3)
    qr, kr = incoherent_transform(q, k, seed=5)
    for x, x8, sc, bs in ((qr, inp.q8, inp.q_scale, 64), (kr, inp.k8, inp.k_scale, 32), (v, inp.v8, inp.v_scale, 32)):
        want8, want_sc = quantize_per_block(x, bs)
        np.testing.assert_array_equal(x8.view(np.uint8), want8.view(np.uint8))
        np.testing.assert_array_equal(sc, want_sc)
    per_tensor = fp8_attention_inputs(q, k, v, block_quant=False, incoherent=False)
    for sc, x in ((per_tensor.q_scale, q), (per_tensor.k_scale, k), (per_tensor.v_scale, v)):
        assert np.all(sc == quantize_per_tensor(x)[1])


# ----------------------------------------------------------------------------------------------
# Table 3's other rows
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_baseline_fp8_and_flash_fp16_are_close_to_float64(rng, causal):
    q, k, v = _bshd(rng, 2, 203, 4, 64), _bshd(rng, 2, 113, 2, 64), _bshd(rng, 2, 113, 2, 64)
    ref, lse_ref = standard_attention(q, k, v, causal=causal)
    seen = np.isfinite(lse_ref)
    out8, lse8 = baseline_fp8_attention(q, k, v, causal=causal)
    assert out8.dtype == np.float32 and lse8.dtype == np.float32
    assert rmse(out8, ref) < 0.03, _mismatch(out8, ref)
    np.testing.assert_array_equal(np.isfinite(lse8), seen)
    assert np.max(np.abs(lse8[seen] - lse_ref[seen])) < 0.2
    out16, lse16 = flash_fp16_attention(q, k, v, causal=causal, block_m=64, block_n=32)
    assert out16.dtype == np.float16
    # fp16 output: half an ulp (2^-11 relative) plus the fp16 input and P roundings
    np.testing.assert_allclose(out16, ref, rtol=0, atol=4e-3)
    np.testing.assert_allclose(lse16[seen], lse_ref[seen], rtol=0, atol=2e-3)
    assert np.all(out16.transpose(0, 2, 1, 3)[~seen] == 0) and np.all(np.isinf(lse16[~seen]))


def test_table3_inputs_have_sparse_outliers():
    q, k, v = fp8.table3_inputs(1, 1024, 4, 128, seed=1)
    assert q.shape == k.shape == v.shape == (1, 1024, 4, 128)
    np.testing.assert_array_equal(q.astype(np.float16).astype(np.float64), q)   # fp16 values
    big = np.abs(np.concatenate([q.ravel(), k.ravel(), v.ravel()])) > 6.0      # N(0,1) almost never
    # expected: 0.001 · P(|N(0,1)+N(0,100)| > 6) ≈ 0.001 · 0.56 of 1.57M entries ≈ 880
    assert 600 < big.sum() < 1200


@pytest.mark.slow
def test_table3_orderings():
    """Paper Table 3's claims at (batch 1, seqlen 4096, nheads 4, headdim 128), ~20 s on 2 idle cores.

    Checked at seeds 0, 1, 2: baseline_fp8 / fa3_fp8 = 2.4, 2.3, 2.3. The gap grows with seqlen
    (1.6 at 512, 2.0 at 2048, 2.8 at 8192), so smaller sizes would not show the paper's factor.

    Why they hold: (1) baseline FP16 rounds S to fp16 before the softmax (absolute error ~|S|·2^-11
    in the exponent), flash keeps S in fp32. (2) Without rotation, in a row of Q with an outlier
    coordinate c, S_ij ≈ α·q_c·k_jc, and e4m3 rounding makes the error of S a *relative* error of
    that one product — largest exactly for the keys the softmax picks. Rotation turns the error of S
    into a sum of d independent roundings, ~|q||k|/√d, no longer aligned with the winner.
    Block quantization alone changes little: relative precision does not depend on the scale.
    """
    table = numerical_error_table(1, 4096, 4, 128, seed=0)
    assert set(table) == set(PAPER_TABLE3)
    assert table["flash_fp16"] < table["baseline_fp16"]
    assert table["fa3_fp8"] <= table["baseline_fp8"] / 2
    assert table["fa3_fp8_no_block_quant"] <= table["baseline_fp8"] / 2
    assert table["baseline_fp8"] / 1.3 <= table["fa3_fp8_no_incoherent"] <= table["baseline_fp8"] * 1.3
    # every FP8 row is an order of magnitude above every FP16 row
    assert max(table["baseline_fp16"], table["flash_fp16"]) * 10 < table["fa3_fp8"]


# ----------------------------------------------------------------------------------------------
# Bad input: raises at once, names the argument, computes nothing
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the quantization/tiling stages are ever reached."""
    def boom(*args, **kwargs):
        raise AssertionError("computed on bad input")
    for name in ("_fp8_inputs", "_fwht", "_quantize_per_block", "_quantize_per_tensor", "_saturating_cast"):
        monkeypatch.setattr(fp8, name, boom)


def _qkv(rng, d=64, sq=16, sk=16):
    return _bshd(rng, 1, sq, 2, d), _bshd(rng, 1, sk, 2, d), _bshd(rng, 1, sk, 2, d)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_raise(rng, no_compute, which, bad):
    q, k, v = _qkv(rng)
    {"q": q, "k": k, "v": v}[which][0, 3, 1, 5] = bad
    for f in (fp8_attention, baseline_fp8_attention, flash_fp16_attention):
        with pytest.raises(ValueError, match=f"^{which}: expected finite"):
            f(q, k, v)
    with pytest.raises(ValueError, match=f"^{which}: expected finite"):
        fp8_attention_inputs(q, k, v)


def test_nonfinite_x_raises(no_compute):
    x = np.ones((1, 4, 1, 8))
    x[0, 1, 0, 2] = np.nan
    for f in (to_e4m3, to_e5m2, quantize_per_tensor, fwht):
        with pytest.raises(ValueError, match="^x: expected finite"):
            f(x)
    with pytest.raises(ValueError, match="^x: expected finite"):
        quantize_per_block(x, 2)
    with pytest.raises(ValueError, match="^q: expected finite"):
        incoherent_transform(x, np.ones((1, 4, 1, 8)), 0)


@pytest.mark.parametrize("block", [0, -1, -128])
def test_nonpositive_block_sizes_raise(rng, no_compute, block):
    x = np.ones((1, 4, 1, 8))
    with pytest.raises(ValueError, match=f"^block_size: expected a positive int, got {block}"):
        quantize_per_block(x, block)
    with pytest.raises(ValueError, match="^block_size"):
        dequantize(np.ones((1, 4, 1, 8), E4M3), np.ones((1, 1, 1), np.float32), block)
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="^block_m"):
        fp8_attention(q, k, v, block_m=block)
    with pytest.raises(ValueError, match="^block_n"):
        fp8_attention(q, k, v, block_n=block)


def test_block_size_type_errors(rng, no_compute):
    with pytest.raises(TypeError, match="^block_size: expected a positive int, got float"):
        quantize_per_block(np.ones((1, 4, 1, 8)), 2.0)
    q, k, v = _qkv(rng)
    with pytest.raises(TypeError, match="^block_m"):
        fp8_attention(q, k, v, block_m=True)


@pytest.mark.parametrize("d", [3, 6, 96, 127])
def test_non_power_of_two_headdim_raises_for_hadamard(rng, no_compute, d):
    with pytest.raises(ValueError, match=f"^x: expected headdim .* power of two .*got {d}"):
        fwht(np.ones((2, d)))
    q, k, v = _qkv(rng, d=d)
    with pytest.raises(ValueError, match=f"^q: expected headdim .* power of two .*got {d}"):
        incoherent_transform(q, k, 0)
    with pytest.raises(ValueError, match="power of two"):
        fp8_attention(q, k, v)


def test_non_power_of_two_headdim_is_fine_without_rotation(rng):
    q, k, v = _qkv(rng, d=96)
    out, _ = fp8_attention(q, k, v, incoherent=False)
    ref, _ = standard_attention(q, k, v)
    assert rmse(out, ref) < 0.02


def test_type_and_shape_errors(rng, no_compute):
    q, k, v = _qkv(rng)
    with pytest.raises(TypeError, match="^x: expected a numpy.ndarray, got list"):
        to_e4m3([1.0, 2.0])
    with pytest.raises(TypeError, match="^x: expected a floating dtype"):
        quantize_per_tensor(np.ones(4, np.int32))
    with pytest.raises(ValueError, match=r"^x: expected 4 dimensions .* got shape \(4, 8\)"):
        quantize_per_block(np.ones((4, 8)), 2)
    with pytest.raises(ValueError, match="^k: expected headdim 64"):
        incoherent_transform(q, np.ones((1, 16, 2, 32)), 0)
    with pytest.raises(TypeError, match="^seed: expected a non-negative int, got float"):
        incoherent_transform(q, k, 1.5)
    with pytest.raises(ValueError, match="^seed: expected a non-negative int, got -1"):
        fp8_attention(q, k, v, seed=-1)
    with pytest.raises(TypeError, match="^causal: expected a bool, got int"):
        fp8_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="^block_quant: expected a bool"):
        fp8_attention(q, k, v, block_quant="yes")
    with pytest.raises(TypeError, match="^incoherent: expected a bool"):
        fp8_attention(q, k, v, incoherent=None)
    with pytest.raises(ValueError, match="^softmax_scale"):
        fp8_attention(q, k, v, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="^k: nheads"):
        fp8_attention(q, _bshd(rng, 1, 16, 3, 64), _bshd(rng, 1, 16, 3, 64))


def test_dequantize_errors():
    x8 = np.ones((1, 10, 2, 4), E4M3)
    with pytest.raises(TypeError, match="^x_fp8: expected an ml_dtypes float8"):
        dequantize(np.ones((1, 10, 2, 4), np.float32), np.float32(1))
    with pytest.raises(ValueError, match=r"^scale: expected shape \(1, 2, 3\)"):
        dequantize(x8, np.ones((1, 2, 2), np.float32), 4)
    with pytest.raises(ValueError, match="^scale: expected a scalar"):
        dequantize(x8, np.ones((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="^scale: expected positive finite"):
        dequantize(x8, np.float32(0))
    with pytest.raises(ValueError, match="^scale: expected positive finite"):
        dequantize(x8, np.array([[[1, np.nan, 1], [1, 1, 1]]], np.float32), 4)


def test_table_sizes_are_checked():
    with pytest.raises(ValueError, match="^seqlen: expected a positive int, got 0"):
        numerical_error_table(1, 0, 2, 64)
    with pytest.raises(ValueError, match="^headdim: expected headdim .* power of two"):
        numerical_error_table(1, 16, 2, 48)
