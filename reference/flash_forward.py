"""Twin of kernel step 01 (cuda/steps/01_tma_wgmma.cu), chapter 02: the tiled forward pass in FlashAttention-2's loop order, written like the kernel.

Paper §2.3 (and FlashAttention-2, Dao 2023, Algorithm 1). Per (batch, head):

    for m_block (one Q tile Q_i of Br = block_m rows; one thread block / CTA in the kernel):
        load Q_i                                         (Br, d)
        m_i = -inf, l_i = 0, acc_o = 0                   (Br,), (Br,), (Br, d)   registers
        for n_block in [n_block_min, n_block_max), last first (as the kernel walks them):
            load K_j, V_j                                (Bc, d) each, Bc = block_n
            S = Q_i K_jᵀ                                 (Br, Bc)   GEMM0, raw (unscaled) scores
            mask S with -inf where causal hides a key    (only tiles that cross the diagonal)
            m_new = max(m_i, rowmax(S))
            P = exp2(S·scale_log2 − m_new·scale_log2)    one FFMA + one exp2 per element
            acc_o *= exp2((m_i − m_new)·scale_log2);  l_i = l_i·(same) + rowsum(P)
            acc_o += P V_j                               (Br, d)    GEMM1
        epilogue: O_i = acc_o / l_i;  lse_i = m_i·softmax_scale + ln(l_i)

The per-tile pieces are public so the later steps (``reference.fa3_pipeline``) reuse them:
:func:`n_block_range`, :func:`tile_visible`, :func:`online_softmax_update`,
:func:`forward_tile_step`, :func:`softmax_finalize`. IO and FLOPs are counted as the kernel moves
them (:func:`flash_forward_io`) and for the standard, S/P-materializing implementation
(:func:`standard_attention_io`), for notebook 02.

Base 2: ``exp(x) = exp2(x·log2 e)``, so with ``scale_log2 = softmax_scale · kLog2e`` one FFMA gives
the exponent ``S·scale_log2 − m·scale_log2`` and the MUFU's ex2 finishes it; the row max m is kept
on the raw scores, so the scale never costs a separate multiply.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ._validate import (check_block, check_bool, check_compute_dtype, check_finite,
                        check_qkv, resolve_scale)

__all__ = [
    "kLog2e", "ForwardIO", "ceil_div", "n_block_range", "tile_visible", "online_softmax_update",
    "forward_tile_step", "softmax_finalize", "flash_attention_forward", "flash_forward_io",
    "standard_attention_io",
]

kLog2e = math.log2(math.e)  # 1.4426950408889634: exp(x) = exp2(x · kLog2e)
kLseBytes = 4               # the kernel writes softmax_lse in float32


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ for ints, b > 0 (also for a <= 0)."""
    return -(-a // b)


def n_block_range(m_block: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
                  causal: bool) -> tuple[int, int]:
    """The K/V tiles Q tile ``m_block`` must visit: ``range(n_block_min, n_block_max)``.

    Non-causal: all ⌈seqlen_k / Bc⌉ tiles. Causal (bottom-right aligned, row i sees key
    j <= i + seqlen_k − seqlen_q): the last row of the tile, (m_block+1)·Br − 1, sees keys up to
    (m_block+1)·Br − 1 + seqlen_k − seqlen_q, so exactly as the kernel computes it

        n_block_max = ⌈min(seqlen_k, (m_block+1)·Br + seqlen_k − seqlen_q) / Bc⌉,

    clamped at 0 (a Q tile whose rows see no key visits nothing). Tiles at or past n_block_max
    are fully masked and skipped — never loaded, never computed. n_block_min is 0 (no local window).

    Returns:
        (n_block_min, n_block_max), ints, 0 <= n_block_min <= n_block_max.

    Source: FlashAttention-2/3 kernels' ``get_n_block_min_max`` (block_info / tile scheduler).
    """
    n_block_max = ceil_div(seqlen_k, block_n)
    if causal:
        n_block_max = min(n_block_max,
                          ceil_div(min(seqlen_k, (m_block + 1) * block_m + seqlen_k - seqlen_q), block_n))
    return 0, max(n_block_max, 0)


def tile_visible(m_block: int, n_block: int, seqlen_q: int, seqlen_k: int, block_m: int,
                 block_n: int, causal: bool) -> np.ndarray | None:
    """Boolean (rows, cols) mask of the keys tile (m_block, n_block) may see, or None if all may.

    rows = min(Br, seqlen_q − m_block·Br), cols = min(Bc, seqlen_k − n_block·Bc): edge tiles are
    cut to the sequence (the kernel pads them and masks the padding; here they are just smaller).
    None means "no mask needed" — the kernel's fast path for tiles left of the diagonal.
    """
    if not causal:
        return None
    row0, col0 = m_block * block_m, n_block * block_n
    rows, cols = min(block_m, seqlen_q - row0), min(block_n, seqlen_k - col0)
    offset = seqlen_k - seqlen_q
    if col0 + cols - 1 <= row0 + offset:       # the tile's last key is visible to its first row
        return None
    i = np.arange(row0, row0 + rows)[:, None]
    j = np.arange(col0, col0 + cols)[None, :]
    return j <= i + offset


def online_softmax_update(s, m_i, l_i, scale_log2: float):
    """The softmax of one inner-loop step, in base 2, on raw scores S = Q_i K_jᵀ.

    Args:
        s: (Br, Bc) raw scores (not yet scaled), -inf where masked.
        m_i: (Br,) running row max of the raw scores so far (-inf before the first tile).
        l_i: (Br,) running row sum ℓ_i of exp(scaled score − scaled max) (0 before the first tile).
        scale_log2: softmax_scale · kLog2e.

    Returns:
        (p, m_new, l_new, acc_scale):
        p (Br, Bc) = exp2(S·scale_log2 − m_new·scale_log2), one FFMA + exp2 per element;
        m_new, l_new (Br,); acc_scale (Br,) = exp2((m_i − m_new)·scale_log2), the factor the
        caller multiplies O_i's accumulator by (l_new already includes it).

    The −inf − (−inf) guard: a row whose every key so far is masked has m_new = −inf; its scaled
    max is taken as 0, so P = exp2(−inf) = 0 and acc_scale = exp2(−inf) = 0 instead of NaN.

    Source: paper §2.3 and Algorithm 1 lines 18–19 (consumer softmax); FA3 ``hopper/softmax.h``
    (``max_get_scale`` / ``online_softmax``) for the base-2 form and the guard.
    """
    m_new = np.maximum(m_i, np.max(s, axis=-1))                          # (Br,)
    max_scaled = np.where(m_new == -np.inf, 0.0, m_new * scale_log2)      # (Br,) guard
    acc_scale = np.exp2(m_i * scale_log2 - max_scaled)                    # (Br,)
    p = np.exp2(s * scale_log2 - max_scaled[:, None])                     # (Br, Bc) FFMA + ex2
    l_new = l_i * acc_scale + np.sum(p, axis=-1)                          # (Br,)
    return p, m_new, l_new, acc_scale


def forward_tile_step(q_i, k_j, v_j, m_i, l_i, acc_o, scale_log2: float, visible=None):
    """One iteration of the inner loop: GEMM0, mask, online softmax, rescale, GEMM1.

    Args:
        q_i: (Br, d) Q tile; k_j, v_j: (Bc, d) K and V tiles.
        m_i, l_i: (Br,) running max (raw scores) and sum; acc_o: (Br, d) unnormalized O_i.
        scale_log2: softmax_scale · kLog2e.
        visible: optional (Br, Bc) bool mask (from :func:`tile_visible`); False entries get -inf.

    Returns:
        (m_i, l_i, acc_o) after folding in this K/V tile (new arrays; inputs are not modified).

    Source: paper Algorithm 1 lines 17–21 (consumer mainloop); FlashAttention-2 Algorithm 1 lines 8–10.
    """
    s = q_i @ k_j.T                                                       # (Br, Bc) GEMM0
    if visible is not None:
        s = np.where(visible, s, -np.inf)
    p, m_i, l_i, acc_scale = online_softmax_update(s, m_i, l_i, scale_log2)
    acc_o = acc_o * acc_scale[:, None] + p.astype(acc_o.dtype) @ v_j      # (Br, d) GEMM1
    return m_i, l_i, acc_o


def softmax_finalize(acc_o, m_i, l_i, softmax_scale: float):
    """Epilogue: O_i = acc_o / ℓ_i and lse_i = m_i·softmax_scale + ln ℓ_i (natural log).

    Rows with ℓ_i = 0 saw no key: O_i = 0 and lse_i = +inf (FlashAttention's convention).

    Returns:
        (o_i (Br, d) in acc_o's dtype, lse_i (Br,) float64).

    Source: paper Algorithm 1 line 24; FlashAttention-2 Algorithm 1 lines 12–13; FA3 ``softmax.h``.
    """
    seen = l_i > 0
    safe_l = np.where(seen, l_i, 1)
    o_i = np.where(seen[:, None], acc_o / safe_l[:, None], 0).astype(acc_o.dtype)
    lse_i = np.where(seen, m_i.astype(np.float64) * softmax_scale + np.log(safe_l.astype(np.float64)),
                     np.inf)
    return o_i, lse_i


@dataclass(frozen=True)
class ForwardIO:
    """HBM traffic and matmul FLOPs of one forward pass.

    Attributes:
        hbm_read_bytes: bytes loaded, counted per tile load as issued (Q, K, V tiles; for standard
            attention also S and P). A K/V tile re-loaded by another Q tile counts again.
        hbm_write_bytes: bytes stored (O and softmax_lse; for standard attention also S and P).
        hbm_floor_bytes: the least traffic possible: every input read once and every output
            written once (K/V once per KV head). The tiled forward lands near this floor when the
            re-loads of K/V hit in L2 — they usually do, since the CTAs of one head stream the same
            K/V tiles; standard attention cannot, its S and P round trips are real outputs.
        flops: matmul FLOPs, 2·rows·cols·d for QKᵀ plus the same for PV, per computed tile.
        tiles_computed: (m_block, n_block) tiles visited, summed over batch and heads.
        tiles_skipped: causal tiles never visited (fully masked).
    """
    hbm_read_bytes: int
    hbm_write_bytes: int
    hbm_floor_bytes: int
    flops: int
    tiles_computed: int = 0
    tiles_skipped: int = 0

    @property
    def hbm_bytes(self) -> int:
        """Reads plus writes, as issued."""
        return self.hbm_read_bytes + self.hbm_write_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hbm_bytes"] = self.hbm_bytes
        return d


def _floor_bytes(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, q_bytes, kv_bytes, o_bytes):
    """Q read once, K and V once per KV head, O and lse written once."""
    return batch * (nheads * seqlen_q * headdim * (q_bytes + o_bytes) + nheads * seqlen_q * kLseBytes
                    + nheads_kv * seqlen_k * headdim * kv_bytes)


def _check_dims(**dims) -> None:
    for name, value in dims.items():
        check_block(name, value)


def flash_forward_io(batch: int, seqlen_q: int, seqlen_k: int, nheads: int, headdim: int, *,
                     causal: bool = False, block_m: int = 128, block_n: int = 128,
                     element_bytes: int = 2, nheads_kv: int | None = None) -> ForwardIO:
    """IO and FLOPs of the tiled forward, counted without computing it (any size, instantly).

    Per (batch, head, m_block): Q_i read once (rows·d), K_j and V_j read for every visited n_block
    (2·cols·d), O_i written once (rows·d) and lse_i (rows float32). Each head reads its own K/V tiles
    even under GQA (L2 hits are not modelled). S and P never touch HBM. This is what
    ``flash_attention_forward(..., return_stats=True)`` counts tile by tile.

    Args:
        batch, seqlen_q, seqlen_k, nheads, headdim, block_m, block_n: positive ints.
        causal: bool; skipped tiles cost nothing.
        element_bytes: bytes per Q/K/V/O element (2 for fp16/bf16, 1 for e4m3).
        nheads_kv: KV heads (default nheads); only the floor depends on it.

    Returns:
        ForwardIO. Reads as issued ≈ b·h·(sq·d + ⌈sq/Br⌉·2·sk·d)·element_bytes: still Θ(N²) in
        tile loads (Θ(N²d/Br)), but no N² writes; the floor is Θ(N·d).

    Raises:
        TypeError / ValueError: a size that is not a positive int; causal not a bool.

    Source: FlashAttention (Dao et al. 2022) Theorem 2's IO count, for FA2's loop order.
    """
    nheads_kv = nheads if nheads_kv is None else nheads_kv
    _check_dims(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads, headdim=headdim,
                block_m=block_m, block_n=block_n, element_bytes=element_bytes, nheads_kv=nheads_kv)
    if nheads % nheads_kv:
        raise ValueError(f"nheads_kv: nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})")
    causal = check_bool("causal", causal)
    read = write = flops = computed = skipped = 0
    num_n_blocks = ceil_div(seqlen_k, block_n)
    for m_block in range(ceil_div(seqlen_q, block_m)):
        rows = min(block_m, seqlen_q - m_block * block_m)
        lo, hi = n_block_range(m_block, seqlen_q, seqlen_k, block_m, block_n, causal)
        keys = min(hi * block_n, seqlen_k) - lo * block_n                 # keys loaded by this tile
        read += (rows + 2 * keys) * headdim * element_bytes
        write += rows * headdim * element_bytes + rows * kLseBytes
        flops += 4 * rows * keys * headdim
        computed += hi - lo
        skipped += num_n_blocks - (hi - lo)
    bh = batch * nheads
    floor = _floor_bytes(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, element_bytes,
                         2 * element_bytes, element_bytes)
    return ForwardIO(bh * read, bh * write, floor, bh * flops, bh * computed, bh * skipped)


def standard_attention_io(batch: int, seqlen_q: int, seqlen_k: int, nheads: int, headdim: int, *,
                          element_bytes: int = 2) -> ForwardIO:
    """IO and FLOPs of standard attention, which writes S and P to HBM (paper §2.3, Algorithm 0
    of FlashAttention 2022): S = QKᵀ (read Q, K; write S), P = softmax(S) (read S; write P),
    O = PV (read P, V; write O). Θ(N·d + N²) traffic. A causal mask does not shrink S here.

    Args: as :func:`flash_forward_io` (no tiles, no causal).

    Returns:
        ForwardIO with hbm_floor_bytes = hbm_bytes (S and P are outputs of the first two steps)
        and tiles_computed = tiles_skipped = 0. K and V are counted once per query head.

    Source: FlashAttention (Dao et al. 2022) §2.2 Algorithm 0 and Theorem 2.
    """
    _check_dims(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads, headdim=headdim,
                element_bytes=element_bytes)
    bh, sq, sk, d = batch * nheads, seqlen_q, seqlen_k, headdim
    read = (sq * d + sk * d) + sq * sk + (sq * sk + sk * d)                # QKᵀ, softmax, PV
    write = sq * sk + sq * sk + sq * d                                   # S, P, O
    total = bh * (read + write) * element_bytes
    return ForwardIO(bh * read * element_bytes, bh * write * element_bytes, total, bh * 4 * sq * sk * d)


def flash_attention_forward(q, k, v, causal=False, softmax_scale=None, block_m=128, block_n=128,
                            return_stats=False, *, dtype=np.float64):
    """Tiled attention forward in FlashAttention-2's loop order, base-2 online softmax.

    Args:
        q: (batch, seqlen_q, nheads, headdim) floating ndarray (float16/32/64, bfloat16).
        k, v: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0, query head h reads
            KV head h // (nheads // nheads_kv) (GQA/MQA, no copy).
        causal: bool; bottom-right aligned mask; fully masked K/V tiles are skipped
            (:func:`n_block_range`).
        softmax_scale: α, default 1/sqrt(headdim).
        block_m, block_n: Br and Bc, positive ints; need not divide the sequence lengths.
        return_stats: also return a :class:`ForwardIO` counted tile by tile as the loop runs.
            Bytes use the itemsize of q, k, v (pass float16 arrays to count a 16-bit kernel's
            traffic); O is counted in q's dtype, lse as float32; see ForwardIO for the floor.
        dtype: keyword-only, float64 (default) or float32: the precision of S, P, m_i, l_i and the
            O accumulator (float32 is what the kernel's registers hold; P is not rounded to 16 bit).

    Returns:
        out (batch, seqlen_q, nheads, headdim) in ``dtype``; lse (batch, nheads, seqlen_q) float64,
        natural log; rows that see no key: out = 0, lse = +inf (as ``standard_attention``).
        With return_stats=True: (out, lse, stats).

    Raises:
        TypeError: non-floating or non-ndarray q/k/v; causal/return_stats not bool; block sizes
            not ints; unsupported dtype.
        ValueError: shapes that do not fit (``check_qkv``); block sizes <= 0; NaN/inf in q, k, v;
            softmax_scale not positive.

    Source: paper §2.3; FlashAttention-2 (Dao 2023) Algorithm 1; FA3 ``hopper/softmax.h``.
    """
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = check_qkv(q, k, v)
    causal = check_bool("causal", causal)
    return_stats = check_bool("return_stats", return_stats)
    block_m = check_block("block_m", block_m)
    block_n = check_block("block_n", block_n)
    dt = check_compute_dtype("dtype", dtype)
    softmax_scale = resolve_scale(softmax_scale, headdim)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x)

    scale_log2 = softmax_scale * kLog2e
    group = nheads // nheads_kv
    qc, kc, vc = (np.asarray(x, dtype=dt) for x in (q, k, v))
    out = np.zeros((batch, seqlen_q, nheads, headdim), dtype=dt)
    lse = np.zeros((batch, nheads, seqlen_q))
    num_m_blocks = ceil_div(seqlen_q, block_m)
    num_n_blocks = ceil_div(seqlen_k, block_n)
    read = write = flops = computed = 0

    for b in range(batch):
        for h in range(nheads):
            h_kv = h // group                                             # GQA: shared K/V head
            for m_block in range(num_m_blocks):                           # one CTA per Q tile
                row0 = m_block * block_m
                q_i = qc[b, row0:row0 + block_m, h, :]                    # (Br, d)
                rows = q_i.shape[0]
                m_i = np.full(rows, -np.inf, dtype=dt)                    # (Br,) row max, raw S
                l_i = np.zeros(rows, dtype=dt)                            # (Br,) row sum ℓ
                acc_o = np.zeros((rows, headdim), dtype=dt)               # (Br, d) accumulator
                read += rows * headdim * q.itemsize
                n_block_min, n_block_max = n_block_range(m_block, seqlen_q, seqlen_k, block_m,
                                                         block_n, causal)
                # Last tile first, as the kernel does: the tiles that need a mask come first.
                for n_block in range(n_block_max - 1, n_block_min - 1, -1):
                    col0 = n_block * block_n
                    k_j = kc[b, col0:col0 + block_n, h_kv, :]             # (Bc, d)
                    v_j = vc[b, col0:col0 + block_n, h_kv, :]             # (Bc, d)
                    visible = tile_visible(m_block, n_block, seqlen_q, seqlen_k, block_m, block_n,
                                           causal)
                    m_i, l_i, acc_o = forward_tile_step(q_i, k_j, v_j, m_i, l_i, acc_o,
                                                        dt.type(scale_log2), visible)
                    cols = k_j.shape[0]
                    read += cols * headdim * (k.itemsize + v.itemsize)
                    flops += 4 * rows * cols * headdim
                    computed += 1
                o_i, lse_i = softmax_finalize(acc_o, m_i, l_i, softmax_scale)
                out[b, row0:row0 + rows, h, :] = o_i
                lse[b, h, row0:row0 + rows] = lse_i
                write += rows * headdim * q.itemsize + rows * kLseBytes

    if not return_stats:
        return out, lse
    total_tiles = batch * nheads * num_m_blocks * num_n_blocks
    floor = _floor_bytes(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, q.itemsize,
                         k.itemsize + v.itemsize, q.itemsize)
    return out, lse, ForwardIO(read, write, floor, flops, computed, total_tiles - computed)
