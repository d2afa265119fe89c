"""reference/backward.py's twin of step 18's CTA order (tile_order, dq_turn, heads_per_group) and the launch-order
model behind it (launch_makespan), CPU only."""
from __future__ import annotations

import itertools

import pytest

from reference.backward import dq_turn, heads_per_group, launch_makespan, m_block_range, tile_order

pytestmark = pytest.mark.step18

SHAPES = [  # (batch, nheads, seqlen_q, seqlen_k, block_m, block_n, headdim): sq = sk, sq < sk, sq > sk, ragged
    (2, 3, 700, 700, 80, 128, 128),
    (1, 5, 300, 1000, 128, 128, 64),
    (3, 2, 1000, 300, 64, 64, 256),
    (1, 1, 1, 1, 80, 128, 128),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal,deterministic", [(False, False), (False, True), (True, False), (True, True)])
def test_tile_order_launches_every_tile_once(shape, causal, deterministic):
    batch, nheads, sq, sk, _, bn, hd = shape
    order = tile_order(batch, nheads, sq, sk, bn, hd, causal, deterministic)
    num_n = -(-sk // bn)
    assert sorted(order) == sorted(itertools.product(range(num_n), range(nheads), range(batch)))


def test_causal_order_is_longest_first_within_a_group():
    # seqlen 8k, headdim 128: 8 MB of Q, dO and dq_accum per head, so groups of 4 heads (32 MB ≤ 40)
    assert heads_per_group(8192, 128) == 4 and heads_per_group(2048, 128) == 16
    order = tile_order(1, 16, 8192, 8192, 128, 128, causal=True)
    assert order[:5] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0), (1, 0, 0)]
    first_group = order[:4 * 64]
    assert [n for n, _, _ in first_group] == sorted(n for n, _, _ in first_group)
    assert {h for _, h, _ in first_group} == {0, 1, 2, 3}
    det = tile_order(1, 16, 8192, 8192, 128, 128, causal=True, deterministic=True)
    assert det[:2] == [(63, 0, 0), (63, 1, 0)]  # shortest first


def test_heads_per_group_is_a_power_of_two_within_40mb():
    for sq, hd in ((512, 64), (2048, 128), (16384, 128), (131072, 256)):
        g = heads_per_group(sq, hd)
        assert g & (g - 1) == 0 and g >= 1
        assert g == 1 or g * sq * hd * 8 <= 40 << 20
        assert 2 * g * sq * hd * 8 > 40 << 20


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dq_turns_count_up_and_follow_the_launch_order(shape, causal):
    """Deterministic mode: for every query tile, the CTAs that add to it have turns 0, 1, …, count − 1 (its
    semaphore takes each value once), and a CTA's predecessor in turn launches before it (CTAs start in launch
    order, so a waiting CTA never waits for one that has not started)."""
    batch, nheads, sq, sk, bm, bn, hd = shape
    order = tile_order(batch, nheads, sq, sk, bn, hd, causal, deterministic=True)
    position = {t: i for i, t in enumerate(order)}
    for b, h in itertools.product(range(batch), range(nheads)):
        for m_block in range(-(-sq // bm)):
            adders = [n for n in range(-(-sk // bn))
                      if m_block_range(n, sq, sk, bm, bn, causal)[0] <= m_block]
            turns = sorted((dq_turn(n, m_block, sq, sk, bm, bn, causal), n) for n in adders)
            assert [t for t, _ in turns] == list(range(len(adders))), (m_block, turns)
            launched = [position[(n, h, b)] for _, n in turns]
            assert launched == sorted(launched)


@pytest.mark.parametrize("headdim,block_m,block_n,nheads", [(64, 128, 128, 32), (128, 80, 128, 16), (256, 64, 64, 8)])
@pytest.mark.parametrize("seqlen", [2048, 4096, 8192])
def test_longest_first_shortens_the_causal_tail(headdim, block_m, block_n, nheads, seqlen):
    """The model in step 18's header: CTA length = its m_blocks, 132 SMs, batch × seqlen = 16k (the bench grid).
    Head by head the last CTAs run alone (3–7 % over perfect balance at 2k); longest first, ≤ 2 % everywhere."""
    batch = 16384 // seqlen

    def length(tile):
        lo, hi = m_block_range(tile[0], seqlen, seqlen, block_m, block_n, True)
        return hi - lo

    head_by_head = tile_order(batch, nheads, seqlen, seqlen, block_n, headdim, causal=False)  # steps 11–17
    ideal = sum(map(length, head_by_head)) / 132
    before = launch_makespan([length(t) for t in head_by_head]) / ideal
    after = launch_makespan([length(t) for t in tile_order(batch, nheads, seqlen, seqlen, block_n, headdim,
                                                           causal=True)]) / ideal
    assert after <= min(before, 1.02)
    if seqlen == 2048:
        assert before >= 1.03


def test_launch_makespan_is_greedy_list_scheduling():
    assert launch_makespan([3, 3, 2, 2, 2], num_sms=2) == 7  # 3 | 3, 2 | 2, then the last 2 alone
    assert launch_makespan([1] * 10, num_sms=4) == 3
    assert launch_makespan([5, 1, 1, 1, 1, 1], num_sms=2) == 5
