"""Twin of kernel steps 06–07: the tile schedulers of the persistent steps — which CTA runs which work tile.

Twin of ``cuda/steps/06_persistent.cu`` (:func:`static_schedule`) and ``cuda/steps/07_causal_scheduler.cu``
(:func:`dynamic_schedule`), with the kernel's names: a work tile ``t`` decodes to ``(m_block, h, b)``
(``decode``), CTA ``i`` starts at ``t_first = i`` and, statically, strides by ``t_stride = gridDim.x``;
dynamically, the producer claims its next tile from the global ``tile_counter`` (``atomicAdd`` + ``gridDim.x``)
and the tile order is longest first within sections of ``sched_heads`` (batch, head) pairs sized for L2.

Both return, per CTA, the list of tiles it runs and a makespan model: a tile costs its number of K/V tiles
(``n_block_max``, the kernel's BlockInfo) times ``cost_per_kv_tile`` plus ``cost_per_tile``; the makespan is
the longest CTA's sum. It says why causal inputs want the dynamic order (unequal tiles) and non-causal do not.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """``tiles[i]``: the work tiles CTA i runs, in order, each as ``(m_block, h, b)``; ``busy[i]`` its modelled
    time; ``makespan`` = max(busy); ``ideal`` = sum(busy) / number of CTAs (perfect balance)."""

    tiles: list
    busy: list
    makespan: float
    ideal: float


def n_block_max(m_block: int, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """K/V tiles visited by row block ``m_block`` (cuda/include/fa3/block_info.h, bottom-right causal)."""
    n = -(-seqlen_k // block_n)
    if causal:
        end = (m_block + 1) * block_m + seqlen_k - seqlen_q
        n = min(n, 0 if end <= 0 else -(-end // block_n))
    return n


def _cost(m_block, args, cost_per_kv_tile, cost_per_tile):
    return n_block_max(m_block, *args) * cost_per_kv_tile + cost_per_tile


def static_schedule(batch, nheads, seqlen_q, seqlen_k, block_m, block_n, causal=False, num_ctas=132,
                    cost_per_kv_tile=1.0, cost_per_tile=0.0) -> Schedule:
    """Step 06: ``num_tiles = num_m · nheads · batch``; CTA i runs t = t_first, t_first + t_stride, … with
    ``decode(t)``: m_block = num_m − 1 − t % num_m (last row block first), h = (t / num_m) % nheads,
    b = t / (num_m · nheads). ``num_ctas`` = min(tiles, SMs), as the launcher (persistent_grid)."""
    num_m = -(-seqlen_q // block_m)
    num_tiles = num_m * nheads * batch
    grid = min(num_tiles, num_ctas)

    def decode(t):
        return num_m - 1 - t % num_m, (t // num_m) % nheads, t // (num_m * nheads)

    args = (block_m, block_n, seqlen_q, seqlen_k, causal)
    tiles, busy = [], []
    for t_first in range(grid):
        t_stride = grid
        mine = [decode(t) for t in range(t_first, num_tiles, t_stride)]
        tiles.append(mine)
        busy.append(sum(_cost(m, args, cost_per_kv_tile, cost_per_tile) for m, _, _ in mine))
    return Schedule(tiles, busy, max(busy), sum(busy) / grid)


def dynamic_schedule(batch, nheads, seqlen_q, seqlen_k, block_m, block_n, causal=True, num_ctas=132,
                     sched_heads=None, headdim=128, elem_bytes=2, l2_bytes=32 << 20,
                     cost_per_kv_tile=1.0, cost_per_tile=0.0) -> Schedule:
    """Step 07: CTA i runs t_first = i first; whenever a CTA has issued a tile it claims the next one,
    ``t = atomicAdd(tile_counter, 1) + gridDim.x`` — modelled as: the CTA that frees up first takes the next
    counter value. ``decode(t)``: sections of ``sched_heads`` (batch, head) pairs (default: as many as fit
    ``l2_bytes`` of K and V, the launcher's kSchedL2Bytes); within a section row blocks from the last
    (longest) down, the section's heads fastest."""
    num_m = -(-seqlen_q // block_m)
    total_bh = nheads * batch
    num_tiles = num_m * total_bh
    if sched_heads is None:
        kv_bytes = 2 * seqlen_k * headdim * elem_bytes
        sched_heads = max(1, min(total_bh, l2_bytes // max(kv_bytes, 1)))

    def decode(t):
        sec = t // (num_m * sched_heads)
        w = t - sec * num_m * sched_heads
        heads_here = min(sched_heads, total_bh - sec * sched_heads)
        m_rev = w // heads_here
        bh = sec * sched_heads + (w - m_rev * heads_here)
        return num_m - 1 - m_rev, bh % nheads, bh // nheads

    args = (block_m, block_n, seqlen_q, seqlen_k, causal)
    grid = min(num_tiles, num_ctas)
    tiles = [[] for _ in range(grid)]
    busy = [0.0] * grid
    tile_counter = 0
    ready = [(0.0, i, i) for i in range(grid)]  # (time the CTA frees up, CTA, its next tile t)
    heapq.heapify(ready)
    while ready:
        now, cta, t = heapq.heappop(ready)
        if t >= num_tiles:
            continue
        m_block, h, b = decode(t)
        tiles[cta].append((m_block, h, b))
        busy[cta] = now + _cost(m_block, args, cost_per_kv_tile, cost_per_tile)
        t_next = tile_counter + grid  # atomicAdd(tile_counter, 1) + gridDim.x
        tile_counter += 1
        heapq.heappush(ready, (busy[cta], cta, t_next))
    return Schedule(tiles, busy, max(busy), sum(busy) / grid)
