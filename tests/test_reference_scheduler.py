"""reference/scheduler.py, the NumPy-side twin of steps 06 (static) and 07 (dynamic) tile schedulers (CPU)."""
from __future__ import annotations

import pytest

from reference.scheduler import dynamic_schedule, n_block_max, static_schedule


def _all_tiles(s):
    return sorted(t for cta in s.tiles for t in cta)


@pytest.mark.step06
@pytest.mark.parametrize("causal", [False, True])
def test_static_covers_every_tile_once(causal):
    s = static_schedule(batch=3, nheads=5, seqlen_q=1000, seqlen_k=700, block_m=128, block_n=176, causal=causal,
                        num_ctas=16)
    num_m = -(-1000 // 128)
    assert _all_tiles(s) == sorted((m, h, b) for m in range(num_m) for h in range(5) for b in range(3))
    assert s.tiles[0][0] == (num_m - 1, 0, 0)  # t_first = 0 is the last row block of head 0
    assert s.tiles[0][1] == static_schedule(3, 5, 1000, 700, 128, 176, causal, 16).tiles[0][1]


@pytest.mark.step06
def test_static_is_balanced_when_tiles_are_equal():
    s = static_schedule(batch=4, nheads=16, seqlen_q=8448, seqlen_k=8448, block_m=128, block_n=176, num_ctas=132)
    assert s.makespan / s.ideal < 1.05  # 4224 equal tiles over 132 CTAs: 32 each


@pytest.mark.step07
def test_dynamic_covers_every_tile_once_and_longest_first():
    s = dynamic_schedule(batch=2, nheads=4, seqlen_q=2048, seqlen_k=2048, block_m=128, block_n=128, num_ctas=10,
                         sched_heads=3)
    num_m = 16
    assert _all_tiles(s) == sorted((m, h, b) for m in range(num_m) for h in range(4) for b in range(2))
    firsts = [cta[0] for cta in s.tiles]
    assert all(m == num_m - 1 for m, _, _ in firsts[:3])  # the section's heads, longest row block first


@pytest.mark.step07
def test_dynamic_beats_static_on_causal():
    """Causal tiles differ in length (n_block_max grows with m_block): a static round robin leaves some CTAs
    with the long ones; claiming longest first from a counter packs the tail — why step 07 exists."""
    kw = dict(batch=2, nheads=16, seqlen_q=4096, seqlen_k=4096, block_m=128, block_n=128, num_ctas=132)
    st = static_schedule(causal=True, **kw)
    dy = dynamic_schedule(causal=True, **kw)
    assert dy.makespan < st.makespan
    assert dy.makespan / dy.ideal < 1.1


@pytest.mark.step07
def test_n_block_max_matches_block_info():
    assert n_block_max(0, 128, 128, 4096, 4096, True) == 1
    assert n_block_max(31, 128, 128, 4096, 4096, True) == 32
    assert n_block_max(0, 128, 128, 4096, 4096, False) == 32
    assert n_block_max(0, 128, 128, 1000, 100, True) == 0  # seqlen_q > seqlen_k: the first rows see no key
