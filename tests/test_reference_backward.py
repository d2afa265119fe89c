"""Step 11's twin, reference/backward.py (App. B.1, Algorithm 3), against a dense backward derived here and
against float64 torch.autograd.

The dense backward below is written from the formulas, not from the tiled code:
    P = softmax(α S) (masked),  dV = Pᵀ dO,  dP = dO Vᵀ,  D = rowsum(dO ∘ O),
    dS = P ∘ (dP − D),  dQ = α dS K,  dK = α dSᵀ Q,
with GQA handled by repeating K/V per query head and summing the group's dK, dV.
Tiled vs dense: <= 1e-10 relative (float64, only the summation order differs).
Finite differences: central differences with h = 1e-5 carry O(h²) truncation and O(eps/h)
rounding error, so they are checked to 1e-6 relative — looser on purpose.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference._validate import causal_visible
from reference.attention import standard_attention
from reference.backward import flash_attention_backward, m_block_range

pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.step11]

RTOL = 1e-10


def rel_err(a, b):
    """max |a − b| / max |b|; the denominator is at least 1e-3 because a true gradient can be 0
    (seqlen_k = 1: softmax over one key is constant, so dQ = 0 and both sides are rounding noise)."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3))


def dense_backward(q, k, v, dout, causal, softmax_scale=None):
    """Gradients of O = softmax(α QKᵀ) V from the formulas, one (batch, head) at a time."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    alpha = 1 / np.sqrt(d) if softmax_scale is None else softmax_scale
    group = nheads // nheads_kv
    visible = causal_visible(seqlen_q, seqlen_k) if causal else np.ones((seqlen_q, seqlen_k), bool)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(batch):
        for h in range(nheads):
            Q, K, V, dO = q[b, :, h], k[b, :, h // group], v[b, :, h // group], dout[b, :, h]
            S = alpha * Q @ K.T
            S[~visible] = -np.inf
            P = np.zeros_like(S)
            seen = visible.any(axis=1)
            e = np.exp(S[seen] - S[seen].max(axis=1, keepdims=True))
            P[seen] = e / e.sum(axis=1, keepdims=True)
            O = P @ V
            dP = dO @ V.T
            D = np.sum(dO * O, axis=1, keepdims=True)
            dS = P * (dP - D)
            dq[b, :, h] = alpha * dS @ K
            dk[b, :, h // group] += alpha * dS.T @ Q
            dv[b, :, h // group] += P.T @ dO
    return dq, dk, dv


def run_both(rng, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, causal, block_m=64,
             block_n=128, softmax_scale=None):
    q = rng.standard_normal((batch, seqlen_q, nheads, headdim))
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    dout = rng.standard_normal(q.shape)
    out, lse = standard_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    got = flash_attention_backward(q, k, v, out, lse, dout, causal=causal,
                                   softmax_scale=softmax_scale, block_m=block_m, block_n=block_n)
    ref = dense_backward(q, k, v, dout, causal, softmax_scale)
    for name, g, r, like in zip(("dq", "dk", "dv"), got, ref, (q, k, v)):
        assert g.shape == like.shape and g.dtype == np.float64, name
        err = rel_err(g, r)
        where = np.unravel_index(np.argmax(np.abs(g - r)), g.shape)
        assert err <= RTOL, (f"{name}: rel err {err:.3g} at {where}; q {q.shape} k {k.shape} "
                             f"causal={causal} block_m={block_m} block_n={block_n}")
    return (q, k, v, out, lse, dout), got


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (113, 113), (203, 203), (113, 203),
                                               (203, 113), (1, 203), (203, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_dense_awkward_sizes(rng, seqlen_q, seqlen_k, causal):
    run_both(rng, 1, seqlen_q, seqlen_k, 2, 1, 64, causal)


def test_backward_seqlen_1000(rng):
    run_both(rng, 1, 1000, 1000, 1, 1, 32, True, block_m=128, block_n=128)


@pytest.mark.parametrize("nheads,nheads_kv", [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2), (8, 8)])
def test_backward_gqa_sums_over_the_group(rng, nheads, nheads_kv):
    run_both(rng, 2, 37, 53, nheads, nheads_kv, 32, True, block_m=16, block_n=16)


@settings(max_examples=15, deadline=None)
@given(seqlen_q=st.integers(1, 60), seqlen_k=st.integers(1, 60),
       heads=st.sampled_from([(1, 1), (2, 1), (8, 2)]), headdim=st.sampled_from([32, 64, 128, 256]),
       block_m=st.integers(1, 70), block_n=st.integers(1, 70), causal=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_backward_matches_dense_random_shapes(seqlen_q, seqlen_k, heads, headdim, block_m, block_n,
                                              causal, seed):
    run_both(np.random.default_rng(seed), 1, seqlen_q, seqlen_k, *heads, headdim, causal,
             block_m=block_m, block_n=block_n)


def test_backward_softmax_scale(rng):
    run_both(rng, 1, 30, 45, 2, 2, 32, False, block_m=8, block_n=16, softmax_scale=0.9)


def test_fully_masked_rows_get_zero_gradient(rng):
    # causal, seqlen_q > seqlen_k: rows 0..34 see no key, lse = +inf there.
    (q, *_), (dq, dk, dv) = run_both(rng, 1, 40, 5, 2, 1, 32, True, block_m=4, block_n=2)
    assert np.all(dq[:, :35] == 0) and np.any(dq[:, 35:] != 0)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))


def test_backward_agrees_with_torch_autograd(rng):
    # A third, independent derivation: torch's autograd through a float64 softmax attention.
    torch = pytest.importorskip("torch")
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, d = 1, 29, 41, 4, 2, 32
    q = rng.standard_normal((batch, seqlen_q, nheads, d))
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, d))
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, d))
    dout = rng.standard_normal(q.shape)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    kk = tk.repeat_interleave(nheads // nheads_kv, dim=2)
    vv = tv.repeat_interleave(nheads // nheads_kv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", tq, kk) / np.sqrt(d)
    mask = torch.tensor(causal_visible(seqlen_q, seqlen_k))
    o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s.masked_fill(~mask, -torch.inf), -1), vv)
    o.backward(torch.tensor(dout))
    out, lse = standard_attention(q, k, v, causal=True)
    got = flash_attention_backward(q, k, v, out, lse, dout, causal=True, block_m=8, block_n=16)
    for g, t in zip(got, (tq.grad, tk.grad, tv.grad)):
        assert rel_err(g, t.numpy()) <= RTOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("seqlen_q,seqlen_k,nheads,nheads_kv", [(1, 1, 1, 1), (7, 7, 2, 2), (113, 203, 4, 2),
                                                                (203, 113, 8, 1), (130, 70, 4, 4)])
def test_kernel_tiles_match_torch_autograd_float64(rng, causal, headdim, seqlen_q, seqlen_k, nheads, nheads_kv):
    """The twin with step 11's own tiles (kernel_tiles: padding of the last m_block and n_block, causal
    m_block_min, GQA per-head slices summed in the postprocess) against float64 torch.autograd, 1e-10."""
    torch = pytest.importorskip("torch")
    from reference.backward import kernel_tiles

    q = rng.standard_normal((1, seqlen_q, nheads, headdim))
    k = rng.standard_normal((1, seqlen_k, nheads_kv, headdim))
    v = rng.standard_normal((1, seqlen_k, nheads_kv, headdim))
    dout = rng.standard_normal(q.shape)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    group = nheads // nheads_kv
    s = torch.einsum("bqhd,bkhd->bhqk", tq, tk.repeat_interleave(group, dim=2)) / np.sqrt(headdim)
    if causal:
        s = s.masked_fill(~torch.tensor(causal_visible(seqlen_q, seqlen_k)), -torch.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see no key: P = 0
    o = torch.einsum("bhqk,bkhd->bqhd", p, tv.repeat_interleave(group, dim=2))
    o.backward(torch.tensor(dout))
    out, lse = standard_attention(q, k, v, causal=causal)
    got = flash_attention_backward(q, k, v, out, lse, dout, causal=causal)  # block sizes: kernel_tiles(headdim)
    assert kernel_tiles(headdim) == {64: (128, 128), 128: (64, 128), 256: (64, 64)}[headdim]
    for name, g, t in zip(("dq", "dk", "dv"), got, (tq.grad, tk.grad, tv.grad)):
        assert rel_err(g, t.numpy()) <= RTOL, (name, rel_err(g, t.numpy()))


@pytest.mark.parametrize("causal", [False, True])
def test_backward_finite_difference_spot_check(rng, causal):
    """L = Σ O ∘ dO; dL/dx[i] ≈ (L(x + h e_i) − L(x − h e_i)) / 2h at a few random entries."""
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, d = 1, 13, 17, 2, 1, 8
    q = rng.standard_normal((batch, seqlen_q, nheads, d))
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, d))
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, d))
    dout = rng.standard_normal(q.shape)
    out, lse = standard_attention(q, k, v, causal=causal)
    grads = flash_attention_backward(q, k, v, out, lse, dout, causal=causal, block_m=4, block_n=8)
    h = 1e-5

    def loss(qq, kk, vv):
        return float(np.sum(standard_attention(qq, kk, vv, causal=causal)[0] * dout))

    for which, (x, g) in enumerate(zip((q, k, v), grads)):
        for idx in zip(*(rng.integers(0, n, 6) for n in x.shape)):
            plus, minus = [a.copy() for a in (q, k, v)], [a.copy() for a in (q, k, v)]
            plus[which][idx] += h
            minus[which][idx] -= h
            fd = (loss(*plus) - loss(*minus)) / (2 * h)
            assert abs(g[idx] - fd) <= 1e-6 * max(1.0, abs(fd)), ("qkv"[which], idx, g[idx], fd)


@settings(max_examples=60, deadline=None)
@given(seqlen_q=st.integers(1, 300), seqlen_k=st.integers(1, 300), block_m=st.integers(1, 130),
       block_n=st.integers(1, 130))
def test_causal_m_block_range_skips_exactly_the_fully_masked_tiles(seqlen_q, seqlen_k, block_m,
                                                                   block_n):
    visible = causal_visible(seqlen_q, seqlen_k)
    for n_block in range(-(-seqlen_k // block_n)):
        cols = visible[:, n_block * block_n:(n_block + 1) * block_n]
        needed = [m for m in range(-(-seqlen_q // block_m))
                  if cols[m * block_m:(m + 1) * block_m].any()]
        lo, hi = m_block_range(n_block, seqlen_q, seqlen_k, block_m, block_n, causal=True)
        assert list(range(lo, hi)) == needed, (n_block, lo, hi, needed)
    assert m_block_range(0, seqlen_q, seqlen_k, block_m, block_n, False) == (0, -(-seqlen_q // block_m))


# ---------------------------------------------------------------- bad input

def poke(value):
    """A copy of the array with its first entry set to ``value``."""
    def f(a):
        a = a.copy()
        a.flat[0] = value
        return a
    return f


def good(rng):
    q = rng.standard_normal((1, 8, 2, 16))
    k = rng.standard_normal((1, 6, 1, 16))
    v = rng.standard_normal((1, 6, 1, 16))
    out, lse = standard_attention(q, k, v)
    return dict(q=q, k=k, v=v, out=out, lse=lse, dout=rng.standard_normal(q.shape))


@pytest.mark.parametrize("change,exc,name", [
    (dict(q=lambda a: a.astype(np.int64)), TypeError, "q"),
    (dict(q=lambda a: a[0]), ValueError, "q"),
    (dict(k=lambda a: a[..., :8], v=lambda a: a[..., :8]), ValueError, "k"),
    (dict(k=lambda a: np.repeat(a, 3, axis=2), v=lambda a: np.repeat(a, 3, axis=2)), ValueError, "k"),
    (dict(v=lambda a: a[:, :3]), ValueError, "v"),
    (dict(out=lambda a: a[:, :4]), ValueError, "out"),
    (dict(out=lambda a: a.tolist()), TypeError, "out"),
    (dict(dout=lambda a: a[..., :8]), ValueError, "dout"),
    (dict(dout=lambda a: a.astype(np.int32)), TypeError, "dout"),
    (dict(dout=poke(np.inf)), ValueError, "dout"),
    (dict(lse=lambda a: a[:, :1]), ValueError, "lse"),
    (dict(lse=poke(np.nan)), ValueError, "lse"),
    (dict(q=poke(np.nan)), ValueError, "q"),
    (dict(lse=poke(-np.inf)), ValueError, "lse"),
])
def test_backward_bad_arrays(rng, change, exc, name):
    args = good(rng)
    for key, f in change.items():
        args[key] = f(args[key])
    with pytest.raises(exc, match=rf"^{name}\b"):
        flash_attention_backward(**args)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(block_m=0), ValueError, "block_m"),
    (dict(block_n=-1), ValueError, "block_n"),
    (dict(block_n=8.0), TypeError, "block_n"),
    (dict(causal=None), TypeError, "causal"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
])
def test_backward_bad_options(rng, kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        flash_attention_backward(**good(rng), **kwargs)
