"""Steps 01–04 timed (chapters 04 and 08): a discrete-event model of one H100 SM running one FlashAttention CTA.

Why do warp specialization, pingpong and the intra-warpgroup pipeline pay, and by how much? This
module replays one CTA (one Q tile of Br = block_m rows against ``seqlen`` keys, non-causal, 16-bit
inputs) on three shared resources of an SM, with durations computed from the H100 SXM5 rates the
paper uses (Table 1 / §3.1), divided by the 132 SMs:

=====================  =========================================  ==========================
resource               work                                       rate per SM (default)
=====================  =========================================  ==========================
tensor cores           GEMM0 S = Q Kᵀ and GEMM1 O += P V          989 TFLOPs / 132
MUFU + FP32 pipes      softmax: exp2 on the MUFU, the rest (max,  3.9 TFLOPs / 132 (exp);
                       FFMA, sum, convert, O rescale) on FP32     67 TFLOPs / 132 (FP32)
TMA / memory           Q, K_j, V_j loads, O store                 3.35 TB/s / 132 + latency
=====================  =========================================  ==========================

Two consumer warpgroups (WG1, WG2) each own Br/2 rows, as in FA3's kernel. Each warpgroup is a
process that issues work to the resources in the order its schedule dictates. Work that runs at the
same time on a resource shares it (processor sharing): two warpgroups that issue together both
finish late. The tensor cores run wgmmas in issue order (only work issued at the same instant
shares), the MUFU/FP32 pipes interleave every warp with work — so two consumers that start in
lock-step stay in lock-step, with their softmaxes together, unless pingpong separates them.

The schedules (:data:`SCHEDULES`):

* ``"sequential"`` — no producer warpgroup: each iteration the CTA syncs (one shared K/V buffer),
  loads K_j, V_j and waits for them, then each consumer runs GEMM0 → softmax → GEMM1, waiting for
  each. Loads are exposed. (cuda step 01_tma_wgmma.)
* ``"warp_specialized"`` — Algorithm 1: a producer fills a ``num_stages`` ring ahead of the
  consumers, so loads hide; the two consumers still run GEMM0 → softmax → GEMM1 in lock-step:
  their softmaxes coincide and the tensor cores idle meanwhile. (02_warp_specialized.)
* ``"pingpong"`` — Algorithm 1 plus named barriers: WG1 issues its GEMMs (GEMM1 of iteration
  j−1, then GEMM0 of j) before WG2 issues its, so one warpgroup's softmax runs under the other's
  GEMMs (§3.1, Figure 1). Algorithm 1 still waits for GEMM1 before issuing GEMM0. (03_pingpong.)
* ``"intra_warpgroup_overlap"`` — Algorithm 2 plus pingpong (FlashAttention-3 as benchmarked):
  GEMM0 of j and GEMM1 of j−1 are issued back to back without a wait, and the softmax of j runs
  while GEMM1 of j−1 is still on the tensor cores (§3.2, Figure 2). (04_intra_warpgroup_overlap.)

Overheads that decide the ordering are named constants, in SM clock cycles (the clock is derived
from the rates: ``matmul_tflops / (num_sms · 4096 FLOPs/clock)``, 1.83 GHz by default); all of them
are guesses of the right order, not paper numbers — see :data:`DEFAULT_RATES`. What the model leaves
out: register pressure, instruction issue, L2 bandwidth and misses, wave quantization, clock
throttling, the causal mask. Its TFLOPs are an upper bound; its use is the ordering and the reasons.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from .fa3_pipeline import PipelineDeadlock

__all__ = ["SCHEDULES", "DEFAULT_RATES", "PAPER_TFLOPS", "Segment", "SimResult", "simulate",
           "plot_timeline", "exp_to_matmul_ratio"]

SCHEDULES = ("sequential", "warp_specialized", "pingpong", "intra_warpgroup_overlap")

DEFAULT_RATES = {
    # H100 SXM5, paper Table 1 / §3.1 (whole chip; the model divides by num_sms).
    "matmul_tflops": 989.0,     # dense FP16/BF16 tensor-core matmul
    "exp_tflops": 3.9,          # special functions (MUFU ex2)
    "fp32_tflops": 67.0,        # FP32 FMA pipes (an FFMA counts 2 FLOPs, so instructions/s is half)
    "hbm_tbps": 3.35,           # HBM3 bandwidth
    "num_sms": 132,
    # Overheads in SM clock cycles. Guesses (not in the paper), of the order microbenchmarks of
    # Hopper report; change them and watch what moves.
    "wgmma_wait_cycles": 128,   # last MMA of a wgmma group done → wgmma.wait_group returns
    "mbarrier_wait_cycles": 20,  # mbarrier.try_wait on a phase that has already completed
    "named_barrier_cycles": 20,  # bar.sync hand-off (pingpong) or a CTA-wide __syncthreads
    "tma_latency_cycles": 1000,  # TMA load issue → first bytes land (HBM/L2 latency, ~0.5 µs)
    "num_stages": 2,            # K/V ring slots of the producer (Algorithm 1)
}

# Paper numbers (H100 SXM5, FP16, head dim 128, seqlen 8K, non-causal) beside the schedule they
# are compared with in notebook 04. The pairing is loose; see PAPER_SOURCES.
PAPER_TFLOPS = {"sequential": 570, "warp_specialized": 582, "pingpong": 620,
                "intra_warpgroup_overlap": 661}
PAPER_SOURCES = {
    "sequential": "Table 2: GEMM-softmax pipelining, no warp specialization (570); also §3.1's "
                  "'before pingpong' figure (570)",
    "warp_specialized": "Table 2: warp specialization, no GEMM-softmax pipelining (582)",
    "pingpong": "§3.1: pingpong scheduling lifts the forward pass to 620–640",
    "intra_warpgroup_overlap": "Table 2: FlashAttention-3, all of it (661)",
}

kTcFlopsPerClock = 4096    # dense FP16 FLOPs per clock per H100 SM: 4 tensor cores × 512 FMA × 2
kElementBytes = 2          # fp16 / bf16
kFp32OpsPerScore = 4       # per S element: FMNMX (row max), FFMA (scale − max), FADD (row sum), F2FP
kConsumers = 2             # consumer warpgroups, each Br/2 rows


class Segment(NamedTuple):
    """One busy interval on the timeline: ``lane`` ("TMA", "tensor cores", "MUFU+FP32"), ``op``
    ("GEMM0", "GEMM1", "softmax", "K", "V", "Q", "O"), start and end in µs, the warpgroup
    (1, 2; 0 for the producer) and the K/V iteration j (-1 for Q/O)."""
    lane: str
    op: str
    start: float
    end: float
    warpgroup: int
    iteration: int


@dataclass
class SimResult:
    """What :func:`simulate` returns.

    Attributes:
        schedule, headdim, seqlen, block_m, block_n: the inputs.
        timeline: list of :class:`Segment` (µs), for :func:`plot_timeline`.
        cta_time_us: time for the CTA, first load issued to last O byte stored.
        tflops: predicted chip TFLOPs/s: 4·block_m·seqlen·headdim per CTA time, times num_sms
            (every SM runs such CTAs back to back; prologue and epilogue are not overlapped).
        tensor_core_busy: fraction of cta_time the tensor cores compute.
        exp_to_matmul_ratio: MUFU time of the exps / tensor-core time of both GEMMs, per K/V tile.
        durations_us: one warpgroup's GEMM0, GEMM1, exp, fp32 part, softmax; the K/V tile load.
        rates: the rates and overheads used (DEFAULT_RATES updated by the caller's).
    """
    schedule: str
    headdim: int
    seqlen: int
    block_m: int
    block_n: int
    timeline: list = field(repr=False)
    cta_time_us: float
    tflops: float
    tensor_core_busy: float
    exp_to_matmul_ratio: float
    durations_us: dict
    rates: dict = field(repr=False)

    def __getitem__(self, key):  # result["tflops"] works too
        return getattr(self, key)


def exp_to_matmul_ratio(headdim: int, matmul_tflops: float = 989.0, exp_tflops: float = 3.9) -> float:
    """Time of the exps over time of the two GEMMs for one S tile: (Br·Bc / exp rate) /
    (4·Br·Bc·d / matmul rate) = matmul_tflops / (4 · headdim · exp_tflops). 0.49 at d = 128:
    "exponential can take 50% of the cycle time compared to matmul" (paper §3.1)."""
    return matmul_tflops / (4 * headdim * exp_tflops)


# ---------------------------------------------------------------------------------------------
# A tiny discrete-event engine: processes are generators, resources are shared
# ---------------------------------------------------------------------------------------------

class _Signal:
    def __init__(self, sim):
        self.sim, self.done, self.time, self.waiters = sim, False, None, []

    def fire(self):
        self.done, self.time = True, self.sim.now
        for gen in self.waiters:
            self.sim.at(self.sim.now, gen)
        self.waiters = []


class _Sim:
    def __init__(self):
        self.now, self._heap, self._seq = 0.0, [], 0

    def at(self, t, gen, value=None):
        heapq.heappush(self._heap, (t, self._seq, gen, value))
        self._seq += 1

    def signal(self):
        return _Signal(self)

    def run(self):
        while self._heap:
            t, _, gen, value = heapq.heappop(self._heap)
            self.now = t
            if callable(gen):                 # a plain callback
                gen()
                continue
            try:
                cmd = gen.send(value)
            except StopIteration:
                continue
            kind, arg = cmd
            if kind == "delay":
                self.at(self.now + arg, gen)
            elif kind == "wait":
                if arg.done:
                    self.at(self.now, gen)
                else:
                    arg.waiters.append(gen)


def _delay(dt):
    return ("delay", dt)


def _wait(sig):
    return ("wait", sig)


class _Resource:
    """A unit shared by the warpgroups' work, by processor sharing: n jobs in service each progress
    at 1/n of the rate (two warpgroups whose instructions interleave both finish late).

    ``in_order=True`` (the tensor cores): wgmma instructions execute in the order they were issued,
    so a job issued while others are in service waits for them; only jobs that two warpgroups
    issue at the same instant (lock-step) share — unless ``ordered`` (issued in a pingpong turn,
    after a named barrier, so it is behind the other warpgroup's by construction). ``in_order=False`` (the MUFU/FP32 pipes): the warp
    schedulers interleave every warp that has work, so all jobs share at once.
    """

    _EPS = 1e-15  # seconds; "the same instant"

    def __init__(self, sim, lane, timeline, in_order):
        self.sim, self.lane, self.timeline, self.in_order = sim, lane, timeline, in_order
        self.active, self.waiting = [], []
        self.last, self.version, self.busy_time = 0.0, 0, 0.0

    def _advance(self):
        dt = self.sim.now - self.last
        if self.active and dt > 0:
            for job in self.active:
                job["left"] -= dt / len(self.active)
            self.busy_time += dt
        self.last = self.sim.now

    def submit(self, op, duration, wg, it, ordered=False):
        """Queue ``duration`` seconds of work (at the full rate); returns the completion signal."""
        self._advance()
        job = {"left": duration, "done": self.sim.signal(), "op": op, "wg": wg, "it": it,
               "issued": self.sim.now, "start": None, "lock_step_ok": not ordered}
        lock_step = not ordered and all(abs(j["issued"] - job["issued"]) < self._EPS
                                        and j["wg"] != wg for j in self.active)
        if self.in_order and (self.waiting or (self.active and not lock_step)):
            self.waiting.append(job)
        else:
            self._admit(job)
        self._reschedule()
        return job["done"]

    def _admit(self, job):
        job["start"] = self.sim.now
        self.active.append(job)

    def _reschedule(self):
        self.version += 1
        if not self.active:
            return
        version = self.version
        t_next = self.sim.now + min(j["left"] for j in self.active) * len(self.active)

        def tick():
            if version != self.version:
                return
            self._advance()
            finished = [j for j in self.active if j["left"] <= self._EPS]
            self.active = [j for j in self.active if j["left"] > self._EPS]
            for j in finished:
                self.timeline.append(Segment(self.lane, j["op"], j["start"] * 1e6, self.sim.now * 1e6,
                                             j["wg"], j["it"]))
                j["done"].fire()
            if not self.active and self.waiting:          # next: a job, or a lock-step pair
                first = self.waiting.pop(0)
                self._admit(first)
                while (self.waiting and first["lock_step_ok"] and self.waiting[0]["lock_step_ok"]
                       and abs(self.waiting[0]["issued"] - first["issued"]) < self._EPS
                       and all(self.waiting[0]["wg"] != j["wg"] for j in self.active)):
                    self._admit(self.waiting.pop(0))
            self._reschedule()

        self.sim.at(t_next, tick)


class _Rendezvous:
    """A barrier of ``n`` parties (named barrier / __syncthreads): ``arrive`` returns the signal of
    the current generation."""

    def __init__(self, sim, n):
        self.sim, self.n, self.count, self.sig = sim, n, 0, sim.signal()

    def arrive(self):
        sig = self.sig
        self.count += 1
        if self.count == self.n:
            self.count, self.sig = 0, self.sim.signal()
            sig.fire()
        return sig


# ---------------------------------------------------------------------------------------------
# The CTA
# ---------------------------------------------------------------------------------------------

class _Model:
    def __init__(self, schedule, headdim, seqlen, block_m, block_n, r):
        self.schedule, self.r = schedule, r
        self.ordered = schedule in ("pingpong", "intra_warpgroup_overlap")   # named-barrier turns
        self.sim = _Sim()
        self.timeline: list[Segment] = []
        self.tc = _Resource(self.sim, "tensor cores", self.timeline, in_order=True)
        self.sfu = _Resource(self.sim, "MUFU+FP32", self.timeline, in_order=False)
        sms = r["num_sms"]
        self.clock_hz = r["matmul_tflops"] * 1e12 / (sms * kTcFlopsPerClock)
        cyc = 1.0 / self.clock_hz
        self.t_wait = r["wgmma_wait_cycles"] * cyc
        self.t_mbar = r["mbarrier_wait_cycles"] * cyc
        self.t_named = r["named_barrier_cycles"] * cyc
        self.t_tma = r["tma_latency_cycles"] * cyc
        tc_rate = r["matmul_tflops"] * 1e12 / sms              # FLOP/s per SM
        exp_rate = r["exp_tflops"] * 1e12 / sms                # exp/s per SM
        fp32_inst = r["fp32_tflops"] * 1e12 / sms / 2          # FP32 instructions/s per SM
        hbm = r["hbm_tbps"] * 1e12 / sms                       # B/s per SM
        d, bn = headdim, block_n
        self.rows = block_m // kConsumers                     # per warpgroup (64 for Br = 128)
        self.n_blocks = math.ceil(seqlen / bn)
        self.num_stages = r["num_stages"]
        m = self.rows
        self.t_gemm0 = 2 * m * bn * d / tc_rate               # S (m, Bc) = Q (m, d) Kᵀ
        self.t_gemm1 = 2 * m * bn * d / tc_rate               # O (m, d) += P (m, Bc) V (Bc, d)
        self.t_exp = m * bn / exp_rate
        self.t_fp32 = (kFp32OpsPerScore * m * bn + m * d) / fp32_inst
        self.t_softmax = self.t_exp + self.t_fp32              # row max → exp → row sum: in series
        self.t_final = m * d / fp32_inst                       # epilogue: O_i = diag(ℓ_i)⁻¹ O_i
        # K/V tiles of one head are re-read by every Q tile's CTA; the first read comes from HBM
        # and the others hit in L2, so each CTA is charged its 1/(Q tiles) share of HBM bytes.
        reuse = max(1, math.ceil(seqlen / block_m))
        self.t_kv = self.t_tma + bn * d * kElementBytes / reuse / hbm
        self.t_q = self.t_tma + block_m * d * kElementBytes / hbm
        self.t_o = self.t_tma + m * d * kElementBytes / hbm   # per warpgroup's rows
        s = self.sim
        self.q_full = s.signal()
        self.k_full = [s.signal() for _ in range(self.n_blocks)]
        self.v_full = [s.signal() for _ in range(self.n_blocks)]
        self.k_free = [_Rendezvous(s, kConsumers) for _ in range(self.n_blocks)]
        self.v_free = [_Rendezvous(s, kConsumers) for _ in range(self.n_blocks)]
        self.k_free_sig = [f.sig for f in self.k_free]
        self.v_free_sig = [f.sig for f in self.v_free]
        self.turn = [_Rendezvous(s, 2) for _ in range(kConsumers)]   # pingpong named barriers
        self.cta_bar = _Rendezvous(s, kConsumers)
        self.finished = 0.0
        self.done_warpgroups = 0

    # -- building blocks (generators; use with `yield from`) --------------------------------------
    def load(self, op, sig, it, t):
        def go():
            start = self.sim.now
            yield _delay(t)
            self.timeline.append(Segment("TMA", op, start * 1e6, self.sim.now * 1e6, 0, it))
            sig.fire()
        self.sim.at(self.sim.now, go())

    def wait_full(self, sig):
        yield _wait(sig)
        yield _delay(self.t_mbar)

    def wait_gemm(self, sig):
        """wgmma.wait_group: returns wgmma_wait_cycles after the GEMM finished."""
        yield _wait(sig)
        yield _delay(max(0.0, sig.time + self.t_wait - self.sim.now))

    def softmax(self, wg, j):
        yield _wait(self.sfu.submit("softmax", self.t_softmax, wg, j))

    def gemm0(self, wg, j):
        return self.tc.submit("GEMM0", self.t_gemm0, wg, j, ordered=self.ordered)

    def gemm1(self, wg, j):
        return self.tc.submit("GEMM1", self.t_gemm1, wg, j, ordered=self.ordered)

    def release(self, j, k=True, v=True):
        if k:
            self.k_free[j].arrive()
        if v:
            self.v_free[j].arrive()

    def sync(self, wg):                            # pingpong: bar.sync on my barrier
        yield _wait(self.turn[wg - 1].arrive())
        yield _delay(self.t_named)

    def hand_off(self, wg):                        # pingpong: bar.arrive on the other's barrier
        self.turn[2 - wg].arrive()

    def epilogue(self, wg):
        yield _wait(self.sfu.submit("epilogue", self.t_final, wg, -1))      # O_i /= ℓ_i
        sig = self.sim.signal()
        self.load("O", sig, -1, self.t_o)
        yield _wait(sig)
        self.finished = max(self.finished, self.sim.now)
        self.done_warpgroups += 1

    # -- the producer (Algorithm 1 lines 2–10) --------------------------------------------------
    def producer(self):
        self.load("Q", self.q_full, -1, self.t_q)
        for j in range(self.n_blocks):
            if j >= self.num_stages:
                yield _wait(self.k_free_sig[j - self.num_stages])
                yield _delay(self.t_mbar)
            self.load("K", self.k_full[j], j, self.t_kv)
            if j >= self.num_stages:
                yield _wait(self.v_free_sig[j - self.num_stages])
                yield _delay(self.t_mbar)
            self.load("V", self.v_full[j], j, self.t_kv)

    # -- consumers -------------------------------------------------------------------------------
    def sequential(self, wg):
        if wg == 1:
            self.load("Q", self.q_full, -1, self.t_q)
        yield from self.wait_full(self.q_full)
        for j in range(self.n_blocks):
            yield _wait(self.cta_bar.arrive())                  # one K/V buffer: all done with j-1
            yield _delay(self.t_named)
            if wg == 1:
                self.load("K", self.k_full[j], j, self.t_kv)
                self.load("V", self.v_full[j], j, self.t_kv)
            yield from self.wait_full(self.k_full[j])
            yield from self.wait_gemm(self.gemm0(wg, j))
            yield from self.softmax(wg, j)
            yield from self.wait_full(self.v_full[j])
            yield from self.wait_gemm(self.gemm1(wg, j))
        yield from self.epilogue(wg)

    def warp_specialized(self, wg):                             # Algorithm 1 consumer
        yield from self.wait_full(self.q_full)                  # line 14
        for j in range(self.n_blocks):
            yield from self.wait_full(self.k_full[j])           # line 16
            yield from self.wait_gemm(self.gemm0(wg, j))        # line 17
            yield from self.softmax(wg, j)                      # line 18–19
            yield from self.wait_full(self.v_full[j])           # line 20
            yield from self.wait_gemm(self.gemm1(wg, j))        # line 21
            self.release(j)                                     # line 22
        yield from self.epilogue(wg)

    def pingpong(self, wg):                                     # Algorithm 1 + named barriers
        yield from self.wait_full(self.q_full)
        for j in range(self.n_blocks + 1):
            yield from self.sync(wg)                            # my turn on the tensor cores
            if j > 0:                                           # GEMM1 of j-1, commit and wait
                yield from self.wait_full(self.v_full[j - 1])
                yield from self.wait_gemm(self.gemm1(wg, j - 1))
                self.release(j - 1)
            if j < self.n_blocks:                               # GEMM0 of j
                yield from self.wait_full(self.k_full[j])
                g0 = self.gemm0(wg, j)
            self.hand_off(wg)
            if j < self.n_blocks:
                yield from self.wait_gemm(g0)
                yield from self.softmax(wg, j)
        yield from self.epilogue(wg)

    def intra_warpgroup_overlap(self, wg):                      # Algorithm 2 + pingpong
        T = self.n_blocks
        yield from self.wait_full(self.q_full)                  # line 3
        yield from self.wait_full(self.k_full[0])
        yield from self.sync(wg)
        g0 = self.gemm0(wg, 0)                                  # line 4
        self.hand_off(wg)
        yield from self.wait_gemm(g0)
        self.release(0, v=False)                                # line 5
        yield from self.softmax(wg, 0)                          # line 6
        for j in range(1, T):                                   # line 7
            yield from self.wait_full(self.k_full[j])           # line 8
            yield from self.sync(wg)
            g0 = self.gemm0(wg, j)                              # line 9
            yield from self.wait_full(self.v_full[j - 1])       # line 10
            g1 = self.gemm1(wg, j - 1)                          # line 11
            self.hand_off(wg)
            yield from self.wait_gemm(g0)                       # line 12
            yield from self.softmax(wg, j)                      # line 13
            yield from self.wait_gemm(g1)                       # line 14
            self.release(j, v=False)                            # line 15
            self.release(j - 1, k=False)
        yield from self.wait_full(self.v_full[T - 1])           # line 18
        yield from self.sync(wg)
        g1 = self.gemm1(wg, T - 1)                              # line 19
        self.hand_off(wg)
        yield from self.wait_gemm(g1)
        self.release(T - 1, k=False)
        yield from self.epilogue(wg)                            # line 20

    def run(self):
        consumer = getattr(self, self.schedule)
        if self.schedule != "sequential":
            self.sim.at(0.0, self.producer())
        if self.schedule in ("pingpong", "intra_warpgroup_overlap"):
            self.turn[0].arrive()                               # WG1 goes first
        for wg in (1, 2):
            self.sim.at(0.0, consumer(wg))
        self.sim.run()


def _check_rates(rates):
    r = dict(DEFAULT_RATES)
    for name, value in rates.items():
        if name not in DEFAULT_RATES:
            raise TypeError(f"simulate: unknown rate {name!r}; expected one of {sorted(DEFAULT_RATES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not name.endswith("_cycles")):
            raise ValueError(f"{name}: expected a positive finite number, got {value}")
        r[name] = value
    for name in ("num_sms", "num_stages"):
        if int(r[name]) != r[name] or r[name] < 1:
            raise ValueError(f"{name}: expected a positive int, got {r[name]}")
        r[name] = int(r[name])
    return r


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")


def simulate(schedule, headdim, seqlen, block_m=128, block_n=128, **rates) -> SimResult:
    """Run the one-SM model of one CTA for a schedule and return its timeline and TFLOPs.

    Args:
        schedule: one of :data:`SCHEDULES`.
        headdim: d (positive int).
        seqlen: keys the Q tile attends to (non-causal; positive int). Also the query length, for
            the L2 reuse of K/V tiles (⌈seqlen / block_m⌉ CTAs share each).
        block_m: Br, split between the two consumer warpgroups (even int >= 2).
        block_n: Bc (positive int).
        **rates: overrides of :data:`DEFAULT_RATES` (chip rates, overhead cycles, num_stages).

    Returns:
        :class:`SimResult` (also indexable: ``result["tflops"]``).

    Raises:
        TypeError: non-int sizes; an unknown rate name or a non-number rate.
        ValueError: an unknown schedule; sizes <= 0 or an odd block_m; a rate <= 0 (cycles may
            be 0); a non-integer num_sms / num_stages.
        PipelineDeadlock: the schedule cannot finish (``"pingpong"`` with ``num_stages=1``).

    Source: paper §3.1 (Table 1 rates, the 50% exp/matmul estimate, pingpong), §3.2 (Algorithm 2),
    §4.2 Table 2 (the ablation it is compared with).
    """
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    for name, value in (("headdim", headdim), ("seqlen", seqlen), ("block_m", block_m),
                        ("block_n", block_n)):
        _check_size(name, value)
    if block_m % kConsumers:
        raise ValueError(f"block_m: expected a multiple of {kConsumers} (two consumer warpgroups), "
                         f"got {block_m}")
    r = _check_rates(rates)
    model = _Model(schedule, headdim, seqlen, block_m, block_n, r)
    model.run()
    if model.done_warpgroups != kConsumers:
        raise PipelineDeadlock(
            f"schedule {schedule!r} with num_stages={r['num_stages']} deadlocks: the event queue ran "
            f"dry with {kConsumers - model.done_warpgroups} consumer warpgroup(s) unfinished (pingpong "
            f"with Algorithm 1 needs 2 stages: WG1 waits for K_j in its turn while WG2, whose turn "
            f"comes next, still holds K_(j-1))")
    t = model.finished
    flops = 4 * block_m * seqlen * headdim
    timeline = sorted(model.timeline, key=lambda s: (s.start, s.lane))
    durations = {"gemm0": model.t_gemm0, "gemm1": model.t_gemm1, "exp": model.t_exp,
                 "fp32": model.t_fp32, "softmax": model.t_softmax, "kv_load": model.t_kv}
    return SimResult(
        schedule=schedule, headdim=headdim, seqlen=seqlen, block_m=block_m, block_n=block_n,
        timeline=timeline, cta_time_us=t * 1e6, tflops=flops / t * r["num_sms"] / 1e12,
        tensor_core_busy=model.tc.busy_time / t,
        exp_to_matmul_ratio=model.t_exp / (model.t_gemm0 + model.t_gemm1),
        durations_us={k: v * 1e6 for k, v in durations.items()}, rates=r)


_COLORS = {("GEMM0", 1): "#1f77b4", ("GEMM1", 1): "#6baed6", ("GEMM0", 2): "#d62728",
           ("GEMM1", 2): "#fc9272", ("softmax", 1): "#2ca02c", ("softmax", 2): "#98df8a",
           ("epilogue", 1): "#7f7f7f", ("epilogue", 2): "#bdbdbd"}
_LOAD_COLORS = {"Q": "#9467bd", "K": "#8c564b", "V": "#e377c2", "O": "#7f7f7f"}


def plot_timeline(result: SimResult, ax=None, t_max_us=None):
    """Gantt chart of a :class:`SimResult`: one row per resource, GEMMs and softmaxes colored by
    warpgroup (blue WG1, red WG2; light = GEMM1; dark/light green = softmax of WG1/WG2), WG1's
    work in the upper half of a row and WG2's in the lower half (both at once = shared), TMA
    loads in flight (issue to landing) on top.

    Args:
        result: from :func:`simulate`.
        ax: a matplotlib Axes (default: a new figure's).
        t_max_us: show [0, t_max_us] only (default: all).

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not isinstance(result, SimResult):
        raise TypeError(f"result: expected a SimResult from simulate(), got {type(result).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 2.4))
    lanes = ["TMA", "tensor cores", "MUFU+FP32"]
    for seg in result.timeline:
        if t_max_us is not None and seg.start > t_max_us:
            continue
        y = lanes.index(seg.lane)
        if seg.lane == "TMA":                   # three sub-rows: K, V, Q/O (loads overlap in flight)
            k = {"K": 0, "V": 1}.get(seg.op, 2)
            ax.barh(y - 0.3 + 0.3 * k, seg.end - seg.start, left=seg.start, height=0.28,
                    color=_LOAD_COLORS[seg.op], alpha=0.6)
        else:                                   # WG1 above WG2: sharing shows as both at once
            ax.barh(y - 0.2 + 0.4 * (seg.warpgroup - 1), seg.end - seg.start, left=seg.start,
                    height=0.38, color=_COLORS.get((seg.op, seg.warpgroup), "k"),
                    edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("time (µs)")
    if t_max_us is not None:
        ax.set_xlim(0, t_max_us)
    ax.set_title(f"{result.schedule}: d={result.headdim}, {result.tflops:.0f} TFLOPs/s predicted, "
                 f"tensor cores busy {100 * result.tensor_core_busy:.0f}%", fontsize=9)
    handles = [Patch(color=_COLORS[(op, wg)], label=f"{op} WG{wg}")
               for op in ("GEMM0", "GEMM1", "softmax") for wg in (1, 2)]
    handles += [Patch(color=_LOAD_COLORS[o], alpha=0.6, label=f"load {o}") for o in ("K", "V")]
    ax.legend(handles=handles, fontsize=6, ncol=4, loc="upper right", bbox_to_anchor=(1.0, -0.35))
    return ax
