"""Steps 03–04: the producer/consumer model (Algorithms 1 and 2) and the one-SM pipeline model.

The forwards must equal standard attention in float64 whatever the schedule; the barriers must be
real (remove one and a hazard or a deadlock follows); the SM model must order the schedules as the
paper measured them and reproduce §3.1's "exp takes about half the matmul time at d = 128".
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.attention import standard_attention
from reference.fa3_pipeline import (FAULTS, SCHEDULES, BarrierViolation, MBarrier, NamedBarrier,
                                    PipelineDeadlock, pipelined_forward, stage_phase,
                                    warp_specialized_forward)
from reference import pipeline_model as pm

FORWARDS = {"alg1": warp_specialized_forward, "alg2": pipelined_forward}
# alg1 is the twin of step 02; alg2 (pingpong and step 04's consumer) of steps 03, 04 and 09 (registry)
ALGS = [pytest.param("alg1", marks=pytest.mark.step02),
        pytest.param("alg2", marks=[pytest.mark.step03, pytest.mark.step04, pytest.mark.step09])]


def _qkv(rng, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim):
    q = rng.standard_normal((batch, seqlen_q, nheads, headdim))
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim))
    return q, k, v


def _assert_matches(out, lse, ref_out, ref_lse, tol=1e-12, what=""):
    """Relative max error of out and of the finite lse <= tol; +inf lse (no visible key) in the
    same rows, where out must be 0."""
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert np.array_equal(np.isinf(lse), np.isinf(ref_lse)), f"{what}: rows without keys differ"
    err_o = np.max(np.abs(out - ref_out)) / max(np.max(np.abs(ref_out)), 1e-300)
    fin = np.isfinite(ref_lse)
    err_l = np.max(np.abs(lse[fin] - ref_lse[fin]) / np.maximum(np.abs(ref_lse[fin]), 1.0)) if fin.any() else 0.0
    if err_o > tol or err_l > tol:
        idx = np.unravel_index(np.argmax(np.abs(out - ref_out)), out.shape)
        raise AssertionError(f"{what}: rel err out {err_o:.3g} lse {err_l:.3g} > {tol}; "
                             f"worst out index {idx}, shapes q {out.shape}")


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------

CASES = [
    # batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, block_m, block_n, causal, stages, consumers
    (1, 1, 1, 1, 1, 32, 128, 128, False, 2, 2),
    (1, 1, 1, 1, 1, 64, 128, 128, True, 1, 1),
    (2, 113, 113, 2, 1, 64, 64, 32, True, 2, 2),
    (1, 203, 203, 8, 2, 32, 128, 64, False, 3, 3),
    (1, 113, 203, 2, 2, 128, 64, 48, True, 4, 2),
    (1, 203, 113, 2, 1, 96, 32, 64, True, 1, 2),    # seqlen_q > seqlen_k: rows with no key
    (1, 1000, 1000, 2, 1, 32, 128, 128, True, 2, 2),
    (1, 1000, 203, 1, 1, 256, 128, 96, False, 2, 1),
    (1, 64, 1000, 1, 1, 160, 64, 128, True, 3, 3),
]


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_matches_standard_attention(rng, alg, case):
    batch, sq, sk, h, hkv, d, bm, bn, causal, stages, consumers = case
    q, k, v = _qkv(rng, batch, sq, sk, h, hkv, d)
    ref_out, ref_lse = standard_attention(q, k, v, causal=causal)
    if alg == "alg1":
        out, lse = warp_specialized_forward(q, k, v, causal=causal, block_m=bm, block_n=bn,
                                            num_stages=stages, num_consumers=consumers)
    else:
        out, lse = pipelined_forward(q, k, v, causal=causal, block_m=bm, block_n=bn,
                                     num_stages=stages)
    _assert_matches(out, lse, ref_out, ref_lse, what=f"{alg} {case}")


def test_softmax_scale_is_used(rng):
    q, k, v = _qkv(rng, 1, 37, 53, 2, 2, 16)
    for fn in FORWARDS.values():
        out, lse = fn(q, k, v, softmax_scale=0.37, block_m=16, block_n=16)
        ref_out, ref_lse = standard_attention(q, k, v, softmax_scale=0.37)
        _assert_matches(out, lse, ref_out, ref_lse)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sq=st.integers(1, 70), sk=st.integers(1, 70), hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 4]), d=st.sampled_from([8, 32, 40]),
       bm=st.integers(1, 48), bn=st.integers(1, 48), causal=st.booleans(),
       stages=st.integers(1, 4), consumers=st.integers(1, 3), pingpong=st.booleans(),
       schedule=st.sampled_from(SCHEDULES), seed=st.integers(0, 2**16))
def test_forward_property(sq, sk, hkv, group, d, bm, bn, causal, stages, consumers, pingpong,
                          schedule, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, 1, sq, sk, hkv * group, hkv, d)
    ref_out, ref_lse = standard_attention(q, k, v, causal=causal)
    out, lse = warp_specialized_forward(q, k, v, causal=causal, block_m=bm, block_n=bn,
                                        num_stages=stages, num_consumers=consumers,
                                        schedule=schedule, seed=seed)
    _assert_matches(out, lse, ref_out, ref_lse, what="alg1")
    out, lse = pipelined_forward(q, k, v, causal=causal, block_m=bm, block_n=bn, pingpong=pingpong,
                                 num_stages=stages, schedule=schedule, seed=seed)
    _assert_matches(out, lse, ref_out, ref_lse, what="alg2")


@pytest.mark.parametrize("alg", ALGS)
def test_result_does_not_depend_on_the_interleaving(rng, alg):
    q, k, v = _qkv(rng, 1, 150, 230, 2, 1, 24)
    fn = FORWARDS[alg]
    base_out, base_lse = fn(q, k, v, causal=True, block_m=64, block_n=32)
    for schedule in SCHEDULES:
        for seed in range(3 if schedule == "random" else 1):
            out, lse = fn(q, k, v, causal=True, block_m=64, block_n=32, schedule=schedule, seed=seed)
            assert np.array_equal(out, base_out) and np.array_equal(lse, base_lse), (schedule, seed)


# ---------------------------------------------------------------------------------------------
# The barriers are real
# ---------------------------------------------------------------------------------------------

def test_mbarrier_phase_and_parity():
    bar = MBarrier(2, "empty[0]")
    assert bar.phase == 0 and bar.try_wait(1) and not bar.try_wait(0)   # fresh: "parity 1 done"
    bar.arrive()
    assert not bar.try_wait(0) and bar.pending == 1
    bar.arrive()                                                         # phase 0 completes
    assert bar.phase == 1 and bar.try_wait(0) and not bar.try_wait(1)
    assert bar.pending == 2 and bar.completed_phases == 1
    with pytest.raises(BarrierViolation, match="empty"):
        bar.arrive(3)
    with pytest.raises(ValueError, match="parity"):
        bar.try_wait(2)


def test_mbarrier_waits_for_transaction_bytes():
    bar = MBarrier(1, "full_k[0]")
    bar.arrive_expect_tx(4096)               # producer's arrival alone does not complete it
    assert not bar.try_wait(0)
    bar.complete_tx(1024)
    assert not bar.try_wait(0)
    bar.complete_tx(3072)                    # the last bytes land
    assert bar.try_wait(0) and bar.phase == 1


def test_named_barrier_generations():
    bar = NamedBarrier("pingpong_bar[0]")
    g = bar.arrive()
    assert not bar.passed(g)
    assert bar.arrive() == g and bar.passed(g)


@pytest.mark.parametrize("j,stages,expected", [(0, 2, (0, 0)), (1, 2, (1, 0)), (2, 2, (0, 1)),
                                               (5, 2, (1, 0)), (7, 3, (1, 0)), (4, 1, (0, 0)),
                                               (3, 1, (0, 1)), (9, 4, (1, 0))])
def test_stage_phase(j, stages, expected):
    assert stage_phase(j, stages) == expected


def _small(rng):
    return _qkv(rng, 1, 128, 512, 1, 1, 16)          # 8 K/V tiles of 64: > any ring below


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("fault,schedule,error", [
    ("consumer_skips_full_wait", "consumers_first", BarrierViolation),
    ("consumer_wrong_parity", "consumers_first", BarrierViolation),
    ("producer_skips_empty_wait", "producer_first", BarrierViolation),
    ("producer_skips_empty_wait", "round_robin", BarrierViolation),
    ("producer_wrong_parity", "round_robin", PipelineDeadlock),
    ("consumer_skips_release", "random", PipelineDeadlock),
])
def test_breaking_a_barrier_is_caught(rng, alg, fault, schedule, error):
    q, k, v = _small(rng)
    with pytest.raises(error):
        FORWARDS[alg](q, k, v, block_m=128, block_n=64, num_stages=2, schedule=schedule, fault=fault)


def test_releasing_before_the_wgmma_wait_is_caught(rng):
    q, k, v = _small(rng)
    with pytest.raises(BarrierViolation, match="smem_k"):
        pipelined_forward(q, k, v, block_n=64, num_stages=1, schedule="producer_first",
                          fault="release_before_wgmma_wait")
    with pytest.raises(ValueError, match="fault"):   # Algorithm 1 has no async wgmma to release under
        warp_specialized_forward(q, k, v, fault="release_before_wgmma_wait")


def test_a_skipped_wait_is_a_race_the_schedule_may_hide(rng):
    """Without the full-barrier wait the answer depends on who runs first: the producer-first
    schedule happens to land every tile in time (correct output), consumers-first does not."""
    q, k, v = _small(rng)
    out, lse = pipelined_forward(q, k, v, block_n=64, schedule="producer_first",
                                 fault="consumer_skips_full_wait")
    _assert_matches(out, lse, *standard_attention(q, k, v))
    with pytest.raises(BarrierViolation, match="full barrier"):
        pipelined_forward(q, k, v, block_n=64, schedule="consumers_first",
                          fault="consumer_skips_full_wait")


def test_skipped_release_only_matters_when_a_slot_is_reused(rng):
    q, k, v = _qkv(rng, 1, 64, 128, 1, 1, 16)        # 2 K/V tiles, 2 stages: no slot reused
    out, lse = warp_specialized_forward(q, k, v, block_n=64, num_stages=2,
                                        fault="consumer_skips_release")
    _assert_matches(out, lse, *standard_attention(q, k, v))
    with pytest.raises(PipelineDeadlock, match="empty"):
        warp_specialized_forward(q, k, v, block_n=64, num_stages=1, fault="consumer_skips_release")


# ---------------------------------------------------------------------------------------------
# The trace
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_trace_follows_the_protocol(rng, schedule):
    q, k, v = _qkv(rng, 1, 96, 300, 1, 1, 16)
    stages, consumers = 2, 3
    out, lse, trace = warp_specialized_forward(q, k, v, block_m=96, block_n=32, num_stages=stages,
                                               num_consumers=consumers, trace=True,
                                               schedule=schedule, seed=7)
    n_blocks = 10
    step_of = {}
    for e in trace:
        step_of.setdefault((e.role, e.action, e.tile), e.step)
    assert [e.step for e in trace] == sorted(e.step for e in trace)
    for j in range(n_blocks):
        landed = step_of[("tma", "landed", f"K_{j}")]
        for c in range(consumers):
            assert step_of[(f"consumer{c}", "S=QKᵀ", f"K_{j}")] > landed    # read after landing
        if j >= stages:                                                   # reuse after release
            issued = step_of[("producer", "load K", f"K_{j}")]
            for c in range(consumers):
                assert step_of[(f"consumer{c}", "release K", f"K_{j - stages}")] < issued
        stage = [e.stage for e in trace if e.tile == f"K_{j}" and e.action == "load K"]
        assert stage == [j % stages]
    for c in range(consumers):
        assert sum(e.role == f"consumer{c}" and e.action == "S=QKᵀ" for e in trace) == n_blocks


def test_pingpong_alternates_gemm_turns(rng):
    q, k, v = _qkv(rng, 1, 128, 512, 1, 1, 16)
    for seed in range(4):
        *_, trace = pipelined_forward(q, k, v, block_n=64, trace=True, schedule="random", seed=seed)
        turns = [e.role for e in trace if e.action == "pingpong: my turn"]
        assert turns == ["consumer0", "consumer1"] * (len(turns) // 2) and len(turns) == 2 * 9
        owner = None
        for e in trace:                               # every GEMM issue happens in its own turn
            if e.action == "pingpong: my turn":
                owner = e.role
            elif e.action.startswith("issue"):
                assert e.role == owner, (seed, e)
    orders = set()
    for seed in range(6):                             # without the barriers nothing forces it
        *_, trace = pipelined_forward(q, k, v, block_n=64, trace=True, pingpong=False,
                                      schedule="random", seed=seed)
        issues = [e.role for e in trace if e.action == "issue S=QKᵀ"]
        orders.add(tuple(issues))
        assert not any(e.action.startswith("pingpong") for e in trace)
    alternating = tuple(["consumer0", "consumer1"] * 8)
    assert any(order != alternating for order in orders), orders


def test_algorithm2_overlaps_softmax_with_the_pv_gemm_in_flight(rng):
    q, k, v = _qkv(rng, 1, 64, 256, 1, 1, 16)
    *_, trace = pipelined_forward(q, k, v, block_m=64, block_n=64, trace=True, schedule="round_robin")
    for c in ("consumer0", "consumer1"):
        mine = [(e.action, e.tile) for e in trace if e.role == c]
        for j in range(1, 4):   # issue PV(j-1) < softmax(j) < wait PV(j-1): PV in flight meanwhile
            i_pv = mine.index(("issue O+=PV", f"V_{j - 1}"))
            i_sm = mine.index(("softmax", f"K_{j}"))
            i_wait = mine.index(("wait PV, rescale O", f"V_{j - 1}"))
            assert i_pv < i_sm < i_wait


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,name", [
    ({"num_stages": 0}, ValueError, "num_stages"),
    ({"num_stages": 1.5}, TypeError, "num_stages"),
    ({"num_consumers": 0}, ValueError, "num_consumers"),
    ({"block_m": -1}, ValueError, "block_m"),
    ({"block_n": True}, TypeError, "block_n"),
    ({"schedule": "fastest"}, ValueError, "schedule"),
    ({"fault": "meteor"}, ValueError, "fault"),
    ({"seed": "7"}, TypeError, "seed"),
    ({"tma_latency": 0}, ValueError, "tma_latency"),
    ({"causal": 1}, TypeError, "causal"),
    ({"trace": "yes"}, TypeError, "trace"),
    ({"softmax_scale": -1.0}, ValueError, "softmax_scale"),
])
def test_bad_options_raise(rng, kwargs, error, name):
    q, k, v = _qkv(rng, 1, 8, 8, 1, 1, 8)
    with pytest.raises(error, match=name):
        warp_specialized_forward(q, k, v, **kwargs)


def test_bad_arrays_raise(rng):
    q, k, v = _qkv(rng, 1, 8, 8, 2, 2, 8)
    with pytest.raises(TypeError, match="q"):
        pipelined_forward(q.tolist(), k, v)
    with pytest.raises(ValueError, match="nheads"):
        pipelined_forward(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(TypeError, match="pingpong"):
        pipelined_forward(q, k, v, pingpong=None)
    with pytest.raises(ValueError, match="num_stages"):
        pipelined_forward(q, k, v, num_stages=0)
    bad = q.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="q"):
        warp_specialized_forward(bad, k, v)


def test_faults_are_documented():
    assert set(FAULTS) == {"consumer_skips_full_wait", "consumer_wrong_parity",
                           "producer_skips_empty_wait", "producer_wrong_parity",
                           "consumer_skips_release", "release_before_wgmma_wait"}


# ---------------------------------------------------------------------------------------------
# The one-SM model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ablation():
    """The paper's Table 2 shape: head dim 128, seqlen 8448 (one CTA's view)."""
    return {s: pm.simulate(s, 128, 8448) for s in pm.SCHEDULES}


def test_model_orders_the_schedules_as_the_paper(ablation):
    tflops = [ablation[s].tflops for s in pm.SCHEDULES]
    assert tflops == sorted(tflops) and len(set(tflops)) == 4, tflops
    assert all(t < 989 for t in tflops)                 # never above the tensor-core peak


def test_exp_takes_about_half_the_matmul_time_at_d128(ablation):
    r = ablation["intra_warpgroup_overlap"]
    assert 0.45 < r.exp_to_matmul_ratio < 0.55           # §3.1: "50% of the cycle time"
    assert r.exp_to_matmul_ratio == pytest.approx(pm.exp_to_matmul_ratio(128))
    assert r.durations_us["exp"] == pytest.approx(0.5 * (r.durations_us["gemm0"] + r.durations_us["gemm1"]), rel=0.05)
    assert pm.exp_to_matmul_ratio(64) == pytest.approx(2 * pm.exp_to_matmul_ratio(128))
    assert pm.simulate("sequential", 256, 1024).exp_to_matmul_ratio == pytest.approx(pm.exp_to_matmul_ratio(256))


def test_model_conserves_tensor_core_work(ablation):
    for r in ablation.values():
        n_blocks = -(-8448 // 128)
        work = 2 * n_blocks * (r.durations_us["gemm0"] + r.durations_us["gemm1"])
        assert r.tensor_core_busy * r.cta_time_us == pytest.approx(work, rel=1e-9)
        tc = [s for s in r.timeline if s.lane == "tensor cores"]
        for wg in (1, 2):
            for op in ("GEMM0", "GEMM1"):
                its = sorted(s.iteration for s in tc if s.warpgroup == wg and s.op == op)
                assert its == list(range(n_blocks))


def test_model_lock_step_versus_pingpong(ablation):
    def gemm0_start(r, wg, j):
        return next(s.start for s in r.timeline if s.op == "GEMM0" and s.warpgroup == wg and s.iteration == j)
    ws, pp = ablation["warp_specialized"], ablation["pingpong"]
    for j in (3, 30):
        assert gemm0_start(ws, 1, j) == pytest.approx(gemm0_start(ws, 2, j))   # together
        assert gemm0_start(pp, 2, j) > gemm0_start(pp, 1, j) + ws.durations_us["gemm0"] * 0.99
    tc = sorted((s for s in pp.timeline if s.lane == "tensor cores"), key=lambda s: s.start)
    for a, b in zip(tc, tc[1:]):                       # pingpong: one GEMM at a time
        assert b.start >= a.end - 1e-9


def test_model_overlaps_softmax_with_gemm1_in_algorithm2(ablation):
    r = ablation["intra_warpgroup_overlap"]
    seg = {(s.op, s.warpgroup, s.iteration): s for s in r.timeline}
    for j in (5, 40):
        sm, g1 = seg[("softmax", 1, j)], seg[("GEMM1", 1, j - 1)]
        assert min(sm.end, g1.end) - max(sm.start, g1.start) > 0


def test_model_stages_and_overheads():
    ws1 = pm.simulate("warp_specialized", 128, 4096, num_stages=1).tflops
    ws2 = pm.simulate("warp_specialized", 128, 4096, num_stages=2).tflops
    assert ws1 < ws2                                    # one slot: every load exposed again
    with pytest.raises(PipelineDeadlock, match="num_stages"):
        pm.simulate("pingpong", 128, 4096, num_stages=1)
    slow = pm.simulate("pingpong", 128, 4096, wgmma_wait_cycles=512).tflops
    assert slow < pm.simulate("pingpong", 128, 4096).tflops
    assert pm.simulate("sequential", 128, 4096, tma_latency_cycles=0).tflops > \
        pm.simulate("sequential", 128, 4096).tflops


@pytest.mark.parametrize("args,kwargs,error,name", [
    (("pipelined", 128, 1024), {}, ValueError, "schedule"),
    (("pingpong", 0, 1024), {}, ValueError, "headdim"),
    (("pingpong", 128.0, 1024), {}, TypeError, "headdim"),
    (("pingpong", 128, 1024), {"block_m": 127}, ValueError, "block_m"),
    (("pingpong", 128, 1024), {"clock_ghz": 2.0}, TypeError, "clock_ghz"),
    (("pingpong", 128, 1024), {"matmul_tflops": -1}, ValueError, "matmul_tflops"),
    (("pingpong", 128, 1024), {"num_stages": 0}, ValueError, "num_stages"),
    (("pingpong", 128, 1024), {"hbm_tbps": "fast"}, TypeError, "hbm_tbps"),
])
def test_model_bad_input(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        pm.simulate(*args, **kwargs)


def test_plot_timeline_draws_every_segment():
    import matplotlib.pyplot as plt
    r = pm.simulate("pingpong", 128, 512)
    ax = pm.plot_timeline(r)
    assert len(ax.patches) == len(r.timeline)
    assert r["tflops"] == r.tflops
    plt.close("all")
    with pytest.raises(TypeError, match="result"):
        pm.plot_timeline({"timeline": []})
