"""Steps 01–02: online softmax and the tiled forward against the float64 standard attention.

Tolerance: float64 throughout, so the tiled forward must match ``standard_attention`` to 1e-12
relative (max |a − b| / max |b|) in out and in lse; rows that see no key must agree exactly
(out = 0, lse = +inf). No RuntimeWarning may be raised (that would be a −inf − (−inf) somewhere).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reference.attention import standard_attention
from reference.flash_forward import (ForwardIO, flash_attention_forward, flash_forward_io, kLog2e,
                                     n_block_range, online_softmax_update, standard_attention_io,
                                     tile_visible)
from reference.online_softmax import (online_normalizer_update, online_softmax, online_softmax_stats,
                                      safe_softmax)
from reference._validate import causal_visible

pytestmark = pytest.mark.filterwarnings("error")

RTOL = 1e-12


def rel_err(a, b):
    """max |a − b| / max |b| (absolute when b is all zero)."""
    scale = np.max(np.abs(b)) if np.size(b) and np.max(np.abs(b)) > 0 else 1.0
    return float(np.max(np.abs(a - b)) / scale) if np.size(b) else 0.0


def assert_matches_standard(q, k, v, causal, softmax_scale=None, **kw):
    out, lse = flash_attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, **kw)
    ref_out, ref_lse = standard_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert out.dtype == np.float64 and lse.dtype == np.float64
    empty = np.isinf(ref_lse)                                    # rows that see no key
    assert np.array_equal(np.isinf(lse), empty), "the +inf rows of lse differ"
    assert np.all(lse[empty] == np.inf)
    assert np.all(out.transpose(0, 2, 1, 3)[empty] == 0)
    err_out, err_lse = rel_err(out, ref_out), rel_err(lse[~empty], ref_lse[~empty])
    where = np.unravel_index(np.argmax(np.abs(out - ref_out)), out.shape)
    msg = (f"q {q.shape} k {k.shape} causal={causal} {kw}: out rel err {err_out:.3g} "
           f"(worst at {where}), lse rel err {err_lse:.3g}")
    assert err_out <= RTOL and err_lse <= RTOL, msg
    return out, lse


def make_qkv(rng, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim):
    q = rng.standard_normal((batch, seqlen_q, nheads, headdim))
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    return q, k, v


# ---------------------------------------------------------------- online softmax (step 01)

def two_pass_softmax(x):
    """Written here independently: max, then exp and sum, on a copy per row."""
    out = np.zeros(x.shape)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        if np.all(row == -np.inf):
            continue
        e = np.exp(row - row.max())
        out[idx] = e / e.sum()
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), rows=st.integers(1, 4), block=st.integers(1, 80),
       spread=st.sampled_from([1.0, 30.0, 500.0]), mask_frac=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_online_softmax_equals_two_pass(n, rows, block, spread, mask_frac, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * spread
    x[rng.random((rows, n)) < mask_frac] = -np.inf
    ref = two_pass_softmax(x)
    got = online_softmax(x, block)
    assert rel_err(got, ref) <= RTOL
    assert rel_err(safe_softmax(x), ref) <= RTOL
    seen = ~np.all(x == -np.inf, axis=-1)
    np.testing.assert_allclose(got[seen].sum(-1), 1.0, rtol=1e-13)


@pytest.mark.parametrize("n", [1, 113, 203, 1000])
@pytest.mark.parametrize("block", [1, 7, 128, 5000])
def test_online_softmax_awkward_sizes(rng, n, block):
    x = rng.standard_normal((3, n)) * 20
    assert rel_err(online_softmax(x, block), two_pass_softmax(x)) <= RTOL


def test_online_softmax_stats_give_lse_and_history(rng):
    x = rng.standard_normal((2, 3, 50)) * 10
    m, l, m_hist, l_hist = online_softmax_stats(x, 8, history=True)
    assert m.shape == l.shape == (2, 3) and m_hist.shape == l_hist.shape == (7, 2, 3)
    np.testing.assert_array_equal(m, x.max(-1))
    ref_lse = np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1)) + x.max(-1)
    assert rel_err(m + np.log(l), ref_lse) <= RTOL
    assert np.all(np.diff(m_hist, axis=0) >= 0)                  # the running max never falls
    for t in range(7):                                           # history = stats of a prefix
        np.testing.assert_allclose(l_hist[t], online_softmax_stats(x[..., :8 * (t + 1)], 8)[1],
                                   rtol=1e-14)


def test_online_normalizer_update_rescales_and_guards():
    m, l, corr = online_normalizer_update(np.array([1.0, -np.inf]), np.array([2.0, 0.0]),
                                          np.array([[3.0, 0.0], [-np.inf, -np.inf]]))
    np.testing.assert_allclose(m, [3.0, -np.inf])
    np.testing.assert_allclose(corr, [np.exp(-2.0), 0.0])
    np.testing.assert_allclose(l, [2.0 * np.exp(-2.0) + 1.0 + np.exp(-3.0), 0.0], rtol=1e-15)


def test_fully_masked_softmax_row_is_zero():
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 1.0]])
    got = online_softmax(x, 2)
    np.testing.assert_array_equal(got[0], 0.0)
    assert rel_err(got[1], two_pass_softmax(x)[1]) <= RTOL
    m, l = online_softmax_stats(x, 2)
    assert m[0] == -np.inf and l[0] == 0


# ---------------------------------------------------------------- tiled forward (step 02)

@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 2), seqlen_q=st.integers(1, 70), seqlen_k=st.integers(1, 70),
       heads=st.sampled_from([(1, 1), (2, 1), (2, 2), (8, 2), (8, 8), (8, 1)]),
       headdim=st.sampled_from([32, 40, 64, 96, 128, 256]), block_m=st.integers(1, 80),
       block_n=st.integers(1, 80), causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
@example(batch=1, seqlen_q=1, seqlen_k=1, heads=(1, 1), headdim=32, block_m=128, block_n=128,
         causal=False, seed=0)
@example(batch=1, seqlen_q=60, seqlen_k=7, heads=(2, 1), headdim=32, block_m=16, block_n=3,
         causal=True, seed=1)
def test_forward_matches_standard_attention(batch, seqlen_q, seqlen_k, heads, headdim, block_m,
                                            block_n, causal, seed):
    rng = np.random.default_rng(seed)
    nheads, nheads_kv = heads
    q, k, v = make_qkv(rng, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim)
    assert_matches_standard(q, k, v, causal, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (113, 113), (203, 203), (1000, 1000),
                                               (113, 203), (203, 113), (1, 1000), (1000, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_awkward_seqlens(rng, seqlen_q, seqlen_k, causal):
    q, k, v = make_qkv(rng, 1, seqlen_q, seqlen_k, 2, 1, 64)
    assert_matches_standard(q, k, v, causal, block_m=128, block_n=96)


@pytest.mark.parametrize("nheads,nheads_kv", [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2), (8, 8)])
@pytest.mark.parametrize("headdim", [32, 64, 128, 256])
def test_forward_gqa_and_headdims(rng, nheads, nheads_kv, headdim):
    q, k, v = make_qkv(rng, 1, 113, 203, nheads, nheads_kv, headdim)
    assert_matches_standard(q, k, v, True, block_m=64, block_n=48)


def test_forward_gqa_uses_the_shared_kv_head(rng):
    # Query heads 0..3 read KV head 0 and 4..7 read KV head 1: same as repeating K/V explicitly.
    q, k, v = make_qkv(rng, 1, 37, 41, 8, 2, 32)
    out, lse = flash_attention_forward(q, k, v, causal=True, block_m=16, block_n=16)
    k_rep, v_rep = np.repeat(k, 4, axis=2), np.repeat(v, 4, axis=2)
    out_rep, lse_rep = flash_attention_forward(q, k_rep, v_rep, causal=True, block_m=16, block_n=16)
    np.testing.assert_array_equal(out, out_rep)
    np.testing.assert_array_equal(lse, lse_rep)


def test_forward_softmax_scale_and_large_scores(rng):
    q, k, v = make_qkv(rng, 1, 50, 77, 2, 2, 32)
    assert_matches_standard(q * 30, k * 30, v, False, softmax_scale=0.7, block_m=8, block_n=16)


def test_fully_masked_rows_give_zero_and_inf_without_nan(rng):
    # causal with seqlen_q > seqlen_k: the first seqlen_q − seqlen_k rows see no key at all;
    # small tiles make whole tiles of those rows masked, and the kernel order visits them first.
    q, k, v = make_qkv(rng, 1, 40, 5, 2, 1, 32)
    out, lse = assert_matches_standard(q, k, v, True, block_m=4, block_n=2)
    assert np.all(np.isinf(lse[:, :, :35])) and np.all(np.isfinite(lse[:, :, 35:]))
    assert not np.isnan(out).any()


def test_float32_accumulation_is_close_not_exact(rng):
    q, k, v = make_qkv(rng, 1, 113, 113, 2, 1, 64)
    out, lse = flash_attention_forward(q, k, v, causal=True, dtype=np.float32)
    ref_out, ref_lse = standard_attention(q, k, v, causal=True)
    assert out.dtype == np.float32
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    assert rel_err(out, ref_out) > 1e-12                         # it really ran in float32


def test_online_softmax_update_base2_matches_natural_exp(rng):
    s = rng.standard_normal((4, 6)) * 5
    s[1, :3] = -np.inf
    s[2, :] = -np.inf
    scale = 0.3
    p, m, l, acc_scale = online_softmax_update(s, np.full(4, -np.inf), np.zeros(4), scale * kLog2e)
    row_max = s.max(-1)
    with np.errstate(invalid="ignore"):
        ref_p = np.exp(scale * (s - row_max[:, None]))
    ref_p[2] = 0
    np.testing.assert_allclose(p, ref_p, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(acc_scale, 0.0)                # nothing to rescale yet
    np.testing.assert_allclose(l, ref_p.sum(-1), rtol=1e-14)
    # Second tile raises the max of row 0: the old sum is rescaled by exp(α (m_old − m_new)).
    s2 = np.full((4, 2), -np.inf)
    s2[0] = [row_max[0] + 2.0, 0.0]
    p2, m2, l2, acc2 = online_softmax_update(s2, m, l, scale * kLog2e)
    np.testing.assert_allclose(acc2[0], np.exp(-2.0 * scale), rtol=1e-14)
    np.testing.assert_allclose(l2[0], l[0] * np.exp(-2.0 * scale) + p2[0].sum(), rtol=1e-14)
    assert acc2[2] == 0 and l2[2] == 0 and m2[2] == -np.inf      # guard: no NaN


# ---------------------------------------------------------------- causal tile skipping

@settings(max_examples=60, deadline=None)
@given(seqlen_q=st.integers(1, 300), seqlen_k=st.integers(1, 300), block_m=st.integers(1, 130),
       block_n=st.integers(1, 130))
@example(seqlen_q=113, seqlen_k=203, block_m=128, block_n=128)
@example(seqlen_q=1000, seqlen_k=1000, block_m=128, block_n=128)
def test_causal_block_range_skips_exactly_the_fully_masked_tiles(seqlen_q, seqlen_k, block_m,
                                                                 block_n):
    visible = causal_visible(seqlen_q, seqlen_k)
    for m_block in range(-(-seqlen_q // block_m)):
        rows = visible[m_block * block_m:(m_block + 1) * block_m]
        needed = [n for n in range(-(-seqlen_k // block_n))
                  if rows[:, n * block_n:(n + 1) * block_n].any()]
        lo, hi = n_block_range(m_block, seqlen_q, seqlen_k, block_m, block_n, causal=True)
        assert list(range(lo, hi)) == needed, (m_block, lo, hi, needed)
        for n_block in range(lo, hi):
            mask = tile_visible(m_block, n_block, seqlen_q, seqlen_k, block_m, block_n, True)
            dense = rows[:, n_block * block_n:(n_block + 1) * block_n]
            if mask is None:
                assert dense.all()
            else:
                np.testing.assert_array_equal(mask, dense)
    assert n_block_range(0, seqlen_q, seqlen_k, block_m, block_n, False) == (0, -(-seqlen_k // block_n))


# ---------------------------------------------------------------- IO and FLOP counts

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,nbytes", [(np.float16, 2), (np.float64, 8)])
def test_stats_counted_in_the_loop_equal_the_closed_count(rng, causal, dtype, nbytes):
    q, k, v = (x.astype(dtype) for x in make_qkv(rng, 2, 113, 203, 4, 2, 32))
    *_, stats = flash_attention_forward(q, k, v, causal=causal, block_m=32, block_n=48,
                                        return_stats=True)
    assert isinstance(stats, ForwardIO)
    assert stats == flash_forward_io(2, 113, 203, 4, 32, causal=causal, block_m=32, block_n=48,
                                     element_bytes=nbytes, nheads_kv=2)
    assert stats.hbm_floor_bytes == nbytes * 2 * (4 * 113 * 32 * 2 + 2 * 203 * 32 * 2) + 4 * 2 * 4 * 113


def test_io_by_hand_non_causal():
    # 2 Q tiles × 2 K/V tiles, batch·heads = 1, d = 8, 2-byte elements.
    io = flash_forward_io(1, 6, 5, 1, 8, block_m=4, block_n=3, element_bytes=2)
    q_reads, kv_reads = 6 * 8, 2 * (2 * 5 * 8)                  # K and V read once per Q tile
    assert io.hbm_read_bytes == 2 * (q_reads + kv_reads)
    assert io.hbm_write_bytes == 2 * 6 * 8 + 4 * 6              # O in 16 bit, lse in float32
    assert io.flops == 4 * 6 * 5 * 8
    assert (io.tiles_computed, io.tiles_skipped) == (4, 0)
    assert io.hbm_bytes == io.hbm_read_bytes + io.hbm_write_bytes
    assert io.as_dict()["hbm_bytes"] == io.hbm_bytes


def test_causal_skips_about_half_the_tiles_and_flops():
    full = flash_forward_io(1, 4096, 4096, 1, 128, causal=False)
    causal = flash_forward_io(1, 4096, 4096, 1, 128, causal=True)
    assert (full.tiles_computed, full.tiles_skipped) == (32 * 32, 0)
    assert causal.tiles_computed == 32 * 33 // 2 and causal.tiles_skipped == 32 * 31 // 2
    assert causal.flops == full.flops * (32 * 33 // 2) / (32 * 32)


@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_standard_attention_traffic_vs_flash(headdim):
    d, block_m = headdim, 128
    ratios, floor_ratios = [], []
    for n in (512, 2048, 16384):
        flash = flash_forward_io(1, n, n, 1, d, block_m=block_m, element_bytes=2)
        std = standard_attention_io(1, n, n, 1, d, element_bytes=2)
        assert std.flops == flash.flops == 4 * n * n * d
        assert std.hbm_write_bytes == 2 * (2 * n * n + n * d)          # S, P and O
        assert flash.hbm_write_bytes == 2 * n * d + 4 * n              # O and lse only
        assert flash.hbm_floor_bytes == 2 * 4 * n * d + 4 * n          # Q, K, V, O once + lse
        assert flash.hbm_read_bytes == 2 * (n * d + (n // block_m) * 2 * n * d)   # K, V per Q tile
        assert std.hbm_floor_bytes == std.hbm_bytes
        ratios.append(std.hbm_bytes / flash.hbm_bytes)
        floor_ratios.append(std.hbm_bytes / flash.hbm_floor_bytes)
    # As issued, FA re-loads K/V once per Q tile: 2·N²·d/Br against standard's 4·N² for S and P,
    # so for long sequences the ratio tends to 2·Br/d (2 at d = 128, 1 at d = 256); against the
    # floor (K/V re-loads served by L2) the ratio grows linearly in N.
    assert abs(ratios[2] / (2 * block_m / d) - 1) < 0.01
    assert floor_ratios[2] / floor_ratios[1] > 7.0      # ≈ (N/d + 1): 8× longer → 7.2× to 8× ratio
    std = standard_attention_io(2, 100, 50, 3, 16, element_bytes=1)
    assert std.hbm_read_bytes == 6 * (100 * 16 + 50 * 16 + 2 * 100 * 50 + 50 * 16)
    assert std.hbm_write_bytes == 6 * (2 * 100 * 50 + 100 * 16)


# ---------------------------------------------------------------- bad input

def good(rng):
    return make_qkv(rng, 1, 8, 8, 2, 1, 16)


@pytest.mark.parametrize("change,exc,name", [
    (lambda q, k, v: (q.astype(np.int32), k, v), TypeError, "q"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q"),                       # rank 3
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "k"),        # headdim of k != q
    (lambda q, k, v: (q[:, :, :1], k.repeat(2, axis=2)[:, :, :2], v.repeat(2, axis=2)[:, :, :2]),
     ValueError, "k"),                                                      # nheads % nheads_kv
    (lambda q, k, v: (q, k, v[:, :4]), ValueError, "v"),                   # v shape != k shape
    (lambda q, k, v: (q, np.concatenate([k, k]), np.concatenate([v, v])), ValueError, "k"),
    (lambda q, k, v: (q, k.astype(np.complex128), v), TypeError, "k"),
    (lambda q, k, v: (np.where(q > 1, np.nan, q), k, v), ValueError, "q"),
])
def test_forward_bad_arrays(rng, change, exc, name):
    q, k, v = change(*good(rng))
    with pytest.raises(exc, match=rf"^{name}\b"):
        flash_attention_forward(q, k, v)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(block_m=0), ValueError, "block_m"),
    (dict(block_n=-4), ValueError, "block_n"),
    (dict(block_m=64.0), TypeError, "block_m"),
    (dict(block_n=True), TypeError, "block_n"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(causal=1), TypeError, "causal"),
    (dict(return_stats=None), TypeError, "return_stats"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=[0.1]), TypeError, "softmax_scale"),
    (dict(dtype=np.float16), TypeError, "dtype"),
    (dict(dtype="nonsense"), TypeError, "dtype"),
])
def test_forward_bad_options(rng, kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        flash_attention_forward(*good(rng), **kwargs)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: online_softmax(np.arange(4), 2), TypeError, "x"),
    (lambda: online_softmax([1.0, 2.0], 2), TypeError, "x"),
    (lambda: online_softmax(np.array(1.0), 2), ValueError, "x"),
    (lambda: online_softmax(np.zeros((2, 0)), 2), ValueError, "x"),
    (lambda: online_softmax(np.array([1.0, np.nan]), 2), ValueError, "x"),
    (lambda: online_softmax(np.array([1.0, np.inf]), 2), ValueError, "x"),
    (lambda: online_softmax(np.zeros(3), 0), ValueError, "block_size"),
    (lambda: online_softmax(np.zeros(3), 2.5), TypeError, "block_size"),
    (lambda: online_softmax_stats(np.zeros(3), 2, history=1), TypeError, "history"),
    (lambda: safe_softmax(np.zeros(3, dtype=np.int64)), TypeError, "x"),
    (lambda: flash_forward_io(1, 0, 8, 1, 64), ValueError, "seqlen_q"),
    (lambda: flash_forward_io(1, 8, 8, 1, 64, causal=None), TypeError, "causal"),
    (lambda: flash_forward_io(1, 8, 8, 1, 64, element_bytes=0), ValueError, "element_bytes"),
    (lambda: flash_forward_io(1, 8, 8, 4, 64, nheads_kv=3), ValueError, "nheads_kv"),
    (lambda: standard_attention_io(1, 8, 8, 1.5, 64), TypeError, "nheads"),
])
def test_other_bad_input(call, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        call()
