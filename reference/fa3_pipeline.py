"""Twin of kernel steps 02–04 and 09 (chapters 03–04): FlashAttention-3's producer/consumer pipeline as an executable model.

Paper §3.1 (Algorithm 1: warp specialization with an s-stage circular buffer; pingpong scheduling)
and §3.2 (Algorithm 2: the consumer that overlaps the softmax of iteration j with the PV GEMM of
iteration j−1). The kernel runs one thread block (CTA) per Q tile Q_i with three warpgroups:

    producer warpgroup     issues TMA loads of Q_i, then K_j, V_j into a ring of ``num_stages`` slots
    consumer warpgroups    (2 in FA3) compute S = Q_i K_jᵀ, the online softmax and O_i += P̃ V_j

Here each warpgroup is a Python generator (a coroutine) and a small scheduler interleaves them one
step at a time, in an order you choose (round robin, one role first, or seeded random), so the
barriers have real work to do. What the kernel gets from the hardware, the model spells out:

* :class:`MBarrier` — ``mbarrier`` with an expected arrival count, a transaction (byte) count and a
  phase bit; :meth:`MBarrier.try_wait` is PTX ``mbarrier.try_wait.parity``.
* ``full_k[s]``, ``full_v[s]`` (arrival count 1 + bytes: the producer's ``arrive.expect_tx`` and the
  TMA's ``complete_tx``) and ``empty_k[s]``, ``empty_v[s]`` (arrival count = num_consumers). K and V
  have separate barriers, as Algorithm 1 waits for K_j (line 16) and V_j (line 20) separately and
  Algorithm 2 releases them at different times (line 15).
* The TMA is its own agent: a copy issued by the producer lands ``tma_latency`` TMA turns later
  (zero-filling rows past the sequence end, as TMA does for out-of-bounds boxes).
* Shared memory is checked: a consumer that reads a slot whose copy has not landed (or holds another
  tile), or a producer that issues a copy into a slot a consumer has not released, raises
  :class:`BarrierViolation`. The barriers are what prevents that; ``fault=...`` removes one on
  purpose to show it (a wait skipped, a wrong parity, a release too early).

Consumer row split: like FA3 with ``kBlockM = 128`` and two consumer warpgroups (one ``wgmma`` is
64 rows tall), consumer c owns a contiguous slice of the Br rows of the *same* Q tile
(``np.array_split(range(Br), num_consumers)[c]``): 64 + 64 for Br = 128. Every consumer reads
every K_j, V_j, so each ``empty`` barrier expects one arrival per consumer.

Numerics: float64, base 2 (``exp2`` with ``softmax_scale · log2 e`` folded in), the per-tile math of
``reference.flash_forward`` (:func:`~reference.flash_forward.online_softmax_update`). K/V tiles are
visited in increasing j, as the paper's listings write them.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validate import (check_block, check_bool, check_finite, check_qkv, resolve_scale)
from .flash_forward import (ceil_div, kLog2e, n_block_range, online_softmax_update,
                            softmax_finalize)

__all__ = [
    "BarrierViolation", "PipelineDeadlock", "MBarrier", "NamedBarrier", "TraceEvent",
    "SCHEDULES", "FAULTS", "stage_phase", "warp_specialized_forward", "pipelined_forward",
]

SCHEDULES = ("round_robin", "producer_first", "consumers_first", "random")
FAULTS = {
    # name: what is broken (both algorithms unless noted)
    "consumer_skips_full_wait": "consumers read K_j/V_j without waiting on full[stage]",
    "consumer_wrong_parity": "consumers wait on full[stage] with the flipped phase",
    "producer_skips_empty_wait": "the producer reuses a slot without waiting on empty[stage]",
    "producer_wrong_parity": "the producer waits on empty[stage] with the unflipped phase",
    "consumer_skips_release": "consumers never arrive on empty[stage]",
    "release_before_wgmma_wait": "Algorithm 2 only: release K_j before waiting for the QKᵀ wgmma",
}
kElementBytes = 2  # the kernel's Q/K/V are fp16/bf16: bytes each TMA copy moves per element


class BarrierViolation(RuntimeError):
    """A warpgroup touched shared memory that the barrier protocol had not handed to it."""


class PipelineDeadlock(RuntimeError):
    """Every unfinished warpgroup waits on a barrier that no one will complete."""


class MBarrier:
    """An ``mbarrier`` object in shared memory (PTX ISA, "Parallel Synchronization and
    Communication Instructions: mbarrier").

    State: the current phase's parity bit (0 after ``mbarrier.init``), its pending arrival count
    and its pending transaction count (bytes). A phase completes when both reach 0; then the parity
    flips and the arrival count is re-armed with ``expected_count``.

    Args:
        expected_count: arrivals that complete one phase (positive int).
        name: for messages and the trace, e.g. ``"full_k[1]"``.
    """

    def __init__(self, expected_count: int, name: str = "mbarrier"):
        self.expected_count = check_block("expected_count", expected_count)
        self.name = name
        self.phase = 0                # parity of the phase in progress
        self.pending = self.expected_count
        self.tx_count = 0
        self.completed_phases = 0

    def arrive(self, count: int = 1) -> None:
        """``mbarrier.arrive``: count down the pending arrivals of the current phase.

        Raises:
            BarrierViolation: more arrivals than the phase expects.
        """
        if count > self.pending:
            raise BarrierViolation(f"{self.name}: {count} arrival(s) but only {self.pending} pending "
                                   f"in phase {self.completed_phases} (parity {self.phase})")
        self.pending -= count
        self._maybe_complete()

    def expect_tx(self, nbytes: int) -> None:
        """``mbarrier.expect_tx``: the phase also waits for ``nbytes`` of async copies."""
        self.tx_count += int(nbytes)

    def arrive_expect_tx(self, nbytes: int) -> None:
        """``mbarrier.arrive.expect_tx``: what the producer does before issuing a TMA load."""
        self.expect_tx(nbytes)
        self.arrive()

    def complete_tx(self, nbytes: int) -> None:
        """The TMA unit's ``complete_tx`` when ``nbytes`` of a copy have landed in shared memory."""
        self.tx_count -= int(nbytes)
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.pending == 0 and self.tx_count == 0:
            self.phase ^= 1
            self.pending = self.expected_count
            self.completed_phases += 1

    def try_wait(self, parity: int) -> bool:
        """``mbarrier.try_wait.parity``: True once the phase with parity ``parity`` has completed.

        The barrier only knows its current phase, so "the phase with this parity" is the current one
        (not complete: False) or the one just before it (complete: True). A fresh barrier therefore
        answers True to parity 1 — why the producer, which must not wait for the first use of a
        slot, starts with the flipped phase.
        """
        if parity not in (0, 1):
            raise ValueError(f"parity: expected 0 or 1, got {parity!r}")
        return self.phase != parity

    def __repr__(self) -> str:
        return (f"MBarrier({self.name}: parity {self.phase}, {self.pending}/{self.expected_count} "
                f"arrivals and {self.tx_count} bytes pending)")


class NamedBarrier:
    """A hardware named barrier (``bar.sync id, n`` / ``bar.arrive id, n``), counted in warpgroups.

    ``sync`` arrives and waits until ``expected`` arrivals complete the barrier; ``arrive`` does not
    wait. Pingpong (§3.1) gives each consumer warpgroup one: it ``sync``s on its own before issuing
    its GEMMs and ``arrive``s on the other's after, handing the tensor cores over.
    """

    def __init__(self, name: str, expected: int = 2):
        self.name = name
        self.expected = check_block("expected", expected)
        self.count = 0
        self.generation = 0

    def arrive(self) -> int:
        """Arrive; returns the generation this arrival belongs to."""
        g = self.generation
        self.count += 1
        if self.count == self.expected:
            self.count = 0
            self.generation += 1
        return g

    def passed(self, generation: int) -> bool:
        return self.generation > generation


class TraceEvent(NamedTuple):
    """One step of one warpgroup in the model.

    cta: (batch, head, m_block); step: the scheduler step (0, 1, ... per CTA); role: ``"producer"``,
    ``"tma"``, ``"consumer0"``...; action: what it did (``"wait full_k"``, ``"load K"``,
    ``"S=QKᵀ"``...); tile: ``"K_3"``, ``"Q_0"`` or ``""``; stage: ring slot or None.
    """
    cta: tuple
    step: int
    role: str
    action: str
    tile: str
    stage: int | None


def stage_phase(j: int, num_stages: int) -> tuple[int, int]:
    """Ring slot and phase parity of K/V tile j: ``(j % num_stages, (j // num_stages) % 2)``.

    Consumers wait on ``full[stage]`` with this parity; the producer waits on ``empty[stage]`` with
    the flipped one. Source: CUTLASS ``PipelineState`` (index, phase), as FA3 uses it.
    """
    return j % num_stages, (j // num_stages) & 1


# ---------------------------------------------------------------------------------------------
# Shared memory with a hazard checker, the TMA agent, the scheduler
# ---------------------------------------------------------------------------------------------

class _Slot:
    """One shared-memory tile buffer, e.g. ``smem_k[1]``: (rows, d) float64, with the facts the
    hazard checker needs: which tile was last written, whether that copy has landed, and which
    consumers still have to release it."""

    def __init__(self, name: str, shape, consumers: int):
        self.name = name
        self.data = np.full(shape, np.nan)
        self.tile: str | None = None
        self.landed = False
        self.readers: set[int] = set()
        self.consumers = consumers

    def issue_write(self, tile: str, who: str) -> None:
        if self.readers:
            held = ", ".join(f"consumer{c}" for c in sorted(self.readers))
            raise BarrierViolation(
                f"{who} issued the TMA load of {tile} into {self.name} while {held} had not released "
                f"{self.tile}: the producer must wait on the slot's empty barrier")
        self.tile, self.landed = tile, False
        self.readers = set(range(self.consumers))
        self.data[...] = np.nan  # in flight: contents undefined

    def land(self, data: np.ndarray) -> None:
        self.data[...] = 0.0               # TMA zero-fills the out-of-bounds part of the box
        self.data[:data.shape[0]] = data
        self.landed = True

    def read(self, consumer: int, tile: str) -> np.ndarray:
        if self.tile != tile or not self.landed:
            state = "nothing" if self.tile is None else (
                f"{self.tile} (landed)" if self.landed else f"{self.tile} (copy still in flight)")
            raise BarrierViolation(
                f"consumer{consumer} read {self.name} expecting {tile} but it holds {state}: "
                f"the consumer must wait on the slot's full barrier with the right phase")
        if consumer not in self.readers:
            raise BarrierViolation(f"consumer{consumer} read {self.name} ({tile}) after releasing it")
        return self.data.copy()

    def release(self, consumer: int, tile: str) -> None:
        if self.tile != tile or consumer not in self.readers:
            raise BarrierViolation(f"consumer{consumer} released {self.name} ({tile}) it does not hold")
        self.readers.discard(consumer)


class _Blocked:
    """What an agent yields when it cannot go on: a predicate the scheduler polls (try_wait)."""

    def __init__(self, ready, what: str):
        self.ready, self.what = ready, what


class _Copy:
    def __init__(self, slot: _Slot, data: np.ndarray, barrier: MBarrier, nbytes: int, tile: str,
                 stage):
        self.slot, self.data, self.barrier, self.nbytes = slot, data, barrier, nbytes
        self.tile, self.stage, self.age = tile, stage, 0


class _Cta:
    """One thread block: its barriers, shared memory, TMA queue, trace and scheduler."""

    def __init__(self, coords, q_i, k_head, v_head, n_blocks, *, block_m, block_n, num_stages,
                 num_consumers, row0, seqlen_q, seqlen_k, causal, scale_log2, fault, tma_latency,
                 trace):
        self.coords = coords
        self.q_i, self.k_head, self.v_head = q_i, k_head, v_head
        self.n_blocks = n_blocks
        self.block_m, self.block_n = block_m, block_n
        self.num_stages, self.num_consumers = num_stages, num_consumers
        self.row0, self.seqlen_q, self.seqlen_k, self.causal = row0, seqlen_q, seqlen_k, causal
        self.scale_log2, self.fault, self.tma_latency = scale_log2, fault, tma_latency
        self.tracing = trace
        self.events: list[TraceEvent] = []
        self.step = 0
        d = q_i.shape[1]
        S, C = num_stages, num_consumers
        self.full_q = MBarrier(1, "full_q")
        self.full_k = [MBarrier(1, f"full_k[{s}]") for s in range(S)]
        self.full_v = [MBarrier(1, f"full_v[{s}]") for s in range(S)]
        self.empty_k = [MBarrier(C, f"empty_k[{s}]") for s in range(S)]
        self.empty_v = [MBarrier(C, f"empty_v[{s}]") for s in range(S)]
        self.smem_q = _Slot("smem_q", (block_m, d), C)
        self.smem_k = [_Slot(f"smem_k[{s}]", (block_n, d), C) for s in range(S)]
        self.smem_v = [_Slot(f"smem_v[{s}]", (block_n, d), C) for s in range(S)]
        self.inflight: list[_Copy] = []
        self.producer_done = False
        self.rows = np.array_split(np.arange(block_m), C)   # consumer c's rows of the Br tile
        self.o_acc = np.zeros((block_m, d))
        self.lse = np.full(block_m, np.inf)

    # -- trace -------------------------------------------------------------------------------
    def log(self, role: str, action: str, tile: str = "", stage=None) -> None:
        if self.tracing:
            self.events.append(TraceEvent(self.coords, self.step, role, action, tile, stage))

    # -- waits: a generator that blocks until the barrier's phase with `parity` completed -------
    def wait(self, role: str, bar: MBarrier, parity: int, tile: str = "", stage=None):
        if not bar.try_wait(parity):
            yield _Blocked(lambda: bar.try_wait(parity), f"{role} waits on {bar.name} parity {parity}")
        self.log(role, f"wait {bar.name.split('[')[0]}", tile, stage)

    # -- TMA ---------------------------------------------------------------------------------
    def tma_load(self, role: str, slot: _Slot, data: np.ndarray, bar: MBarrier, tile: str, stage):
        """Producer side: ``arrive.expect_tx`` on the full barrier, then issue the copy."""
        nbytes = slot.data.size * kElementBytes
        slot.issue_write(tile, role)
        bar.arrive_expect_tx(nbytes)
        self.inflight.append(_Copy(slot, data, bar, nbytes, tile, stage))
        self.log(role, f"load {tile.split('_')[0]}", tile, stage)

    def tma_agent(self):
        """The copy engine: each turn ages the copies in flight and lands the oldest ready one."""
        while True:
            if not self.inflight:
                if self.producer_done:
                    return
                yield _Blocked(lambda: bool(self.inflight) or self.producer_done, "tma idle")
                continue
            for c in self.inflight:
                c.age += 1
            if self.inflight[0].age >= self.tma_latency:
                c = self.inflight.pop(0)
                c.slot.land(c.data)
                c.barrier.complete_tx(c.nbytes)
                self.log("tma", "landed", c.tile, c.stage)
            yield None

    # -- the K/V tiles and masks ---------------------------------------------------------------
    def n_block_of(self, i: int) -> int:
        """The K/V tile of iteration i: tiles are visited from n_block_max − 1 down to 0, as in the
        kernels (block_info.h), so the tiles that need a mask come first."""
        return self.n_blocks - 1 - i

    def kv_tile(self, head: np.ndarray, n_block: int) -> np.ndarray:
        return head[n_block * self.block_n:(n_block + 1) * self.block_n]  # (<= Bc, d), cut at seqlen_k

    def needs_mask(self, n_block: int) -> bool:
        """Does tile n_block hold a key past seqlen_k, or past the diagonal for some row of this CTA?
        (``BlockInfo::needs_mask``, cuda/include/fa3/block_info.h.)"""
        crosses_end = (n_block + 1) * self.block_n > self.seqlen_k
        crosses_diag = self.causal and ((n_block + 1) * self.block_n - 1 >
                                        self.row0 + self.seqlen_k - self.seqlen_q)
        return crosses_end or crosses_diag

    def mask(self, s: np.ndarray, rows: np.ndarray, n_block: int) -> np.ndarray:
        """-inf where key n_block·Bc + col is past seqlen_k (TMA padding) or hidden by the causal mask."""
        keys = n_block * self.block_n + np.arange(self.block_n)[None, :]
        visible = keys < self.seqlen_k
        if self.causal:
            visible = visible & (keys <= (self.row0 + rows)[:, None] + self.seqlen_k - self.seqlen_q)
        return np.where(visible, s, -np.inf)

    def epilogue(self, c: int, acc_o, m_i, l_i, softmax_scale: float) -> None:
        o_i, lse_i = softmax_finalize(acc_o, m_i, l_i, softmax_scale)
        self.store_o_lse(c, o_i, lse_i)

    def store_o_lse(self, c: int, o, lse) -> None:
        """Consumer c's rows of O (normalized) and lse to HBM."""
        self.o_acc[self.rows[c]] = o
        self.lse[self.rows[c]] = lse
        self.log(f"consumer{c}", "epilogue: O_i, L_i to HBM", f"O_{self.coords[2]}")

    # -- scheduler ---------------------------------------------------------------------------
    def run(self, agents: dict, schedule: str, rng) -> None:
        waiting = {name: None for name in agents}
        order = list(agents)
        if schedule == "consumers_first":
            order = [n for n in order if n.startswith("consumer")] + ["tma", "producer"]
        last = -1
        while agents:
            runnable = [n for n in order if n in agents
                        and (waiting[n] is None or waiting[n].ready())]
            if not runnable:
                blocked = "; ".join(waiting[n].what for n in order if n in agents)
                raise PipelineDeadlock(f"CTA {self.coords} at step {self.step}: every warpgroup "
                                       f"is blocked — {blocked}")
            if schedule == "random":
                name = runnable[int(rng.integers(len(runnable)))]
            elif schedule == "round_robin":
                idx = [order.index(n) for n in runnable]
                after = [i for i in idx if i > last]
                name = order[min(after) if after else min(idx)]
                last = order.index(name)
            else:                                                       # a fixed priority
                name = runnable[0]
            try:
                waiting[name] = next(agents[name])
            except StopIteration:
                del agents[name]
            self.step += 1


# ---------------------------------------------------------------------------------------------
# Algorithm 1: producer and consumers
# ---------------------------------------------------------------------------------------------

def _producer(cta: _Cta):
    """Algorithm 1 lines 2–10 (the producer warpgroup)."""
    role, f = "producer", cta.fault
    cta.log(role, "setmaxnreg.dec")                                      # line 3
    yield None
    cta.tma_load(role, cta.smem_q, cta.q_i, cta.full_q, f"Q_{cta.coords[2]}", None)  # line 4–5
    yield None
    for j in range(cta.n_blocks):                                        # line 6
        stage, phase = stage_phase(j, cta.num_stages)
        parity = phase if f == "producer_wrong_parity" else phase ^ 1
        for name, empty, full, smem, head in (("K", cta.empty_k, cta.full_k, cta.smem_k, cta.k_head),
                                              ("V", cta.empty_v, cta.full_v, cta.smem_v, cta.v_head)):
            if f != "producer_skips_empty_wait":                         # line 7
                yield from cta.wait(role, empty[stage], parity, f"{name}_{j}", stage)
            cta.tma_load(role, smem[stage], cta.kv_tile(head, cta.n_block_of(j)), full[stage], f"{name}_{j}",
                         stage)
            yield None                                                   # line 8–9
    cta.producer_done = True


def _consumer_wait_full(cta: _Cta, role: str, full: MBarrier, phase: int, tile: str, stage: int):
    if cta.fault == "consumer_skips_full_wait":
        return
    parity = phase ^ 1 if cta.fault == "consumer_wrong_parity" else phase
    yield from cta.wait(role, full, parity, tile, stage)


def _consumer_release(cta: _Cta, c: int, role: str, which: str, stage: int, j: int) -> None:
    smem, empty = (cta.smem_k, cta.empty_k) if which == "K" else (cta.smem_v, cta.empty_v)
    if cta.fault == "consumer_skips_release":
        return
    smem[stage].release(c, f"{which}_{j}")
    empty[stage].arrive()
    cta.log(role, f"release {which}", f"{which}_{j}", stage)


def _consumer_alg1(cta: _Cta, c: int, softmax_scale: float):
    """Algorithm 1 lines 11–25 (one consumer warpgroup, rows ``cta.rows[c]`` of Q_i)."""
    role, rows = f"consumer{c}", cta.rows[c]
    d = cta.q_i.shape[1]
    cta.log(role, "setmaxnreg.inc")                                      # line 12
    yield None
    acc_o = np.zeros((len(rows), d))                                     # line 13  (Br/C, d) regs
    l_i, m_i = np.zeros(len(rows)), np.full(len(rows), -np.inf)          #          (Br/C,)
    yield from cta.wait(role, cta.full_q, 0, f"Q_{cta.coords[2]}")       # line 14
    q_i = cta.smem_q.read(c, f"Q_{cta.coords[2]}")[rows]                 # (Br/C, d) smem
    for j in range(cta.n_blocks):                                        # line 15
        stage, phase = stage_phase(j, cta.num_stages)
        yield from _consumer_wait_full(cta, role, cta.full_k[stage], phase, f"K_{j}", stage)  # 16
        k_j = cta.smem_k[stage].read(c, f"K_{j}")                        # (Bc, d) smem
        s_ij = cta.mask(q_i @ k_j.T, rows, cta.n_block_of(j))            # line 17  SS-GEMM
        cta.log(role, "S=QKᵀ", f"K_{j}", stage)
        yield None
        p_ij, m_i, l_i, acc_scale = online_softmax_update(s_ij, m_i, l_i, cta.scale_log2)  # 18–19
        cta.log(role, "softmax", f"K_{j}", stage)
        yield None
        yield from _consumer_wait_full(cta, role, cta.full_v[stage], phase, f"V_{j}", stage)  # 20
        v_j = cta.smem_v[stage].read(c, f"V_{j}")                        # (Bc, d) smem
        acc_o = acc_o * acc_scale[:, None] + p_ij @ v_j                  # line 21  RS-GEMM
        cta.log(role, "O+=PV", f"V_{j}", stage)
        yield None
        _consumer_release(cta, c, role, "K", stage, j)                   # line 22
        _consumer_release(cta, c, role, "V", stage, j)
        yield None
    cta.epilogue(c, acc_o, m_i, l_i, softmax_scale)                      # line 24–25


# ---------------------------------------------------------------------------------------------
# Algorithm 2: the consumer with the two-stage GEMM-softmax pipeline, and pingpong
# ---------------------------------------------------------------------------------------------

class _Wgmma:
    """An issued, not yet waited ``wgmma.mma_async``: it reads its shared-memory operand when it
    runs, so the model reads the slot at the wait (``wgmma.wait_group``), where a slot released or
    overwritten too early shows up."""

    def __init__(self, compute):
        self.compute = compute

    def wait(self):
        return self.compute()


def _pingpong_sync(cta: _Cta, role: str, bars, c: int, j: int):
    if bars is None:
        return
    g = bars[c].arrive()                                                 # bar.sync own barrier
    if not bars[c].passed(g):
        yield _Blocked(lambda: bars[c].passed(g), f"{role} waits on {bars[c].name} (pingpong)")
    cta.log(role, "pingpong: my turn", f"iter_{j}")


def _pingpong_arrive(cta: _Cta, role: str, bars, c: int, j: int) -> None:
    if bars is None:
        return
    other = 1 - c
    bars[other].arrive()                                                 # bar.arrive other's barrier
    cta.log(role, f"pingpong: hand off to consumer{other}", f"iter_{j}")


class OnlineSoftmax:
    """Twin of ``OnlineSoftmax`` in cuda/include/fa3/softmax.h: per row the running max ``row_max`` (raw
    scores) and sum ``row_sum``; base 2 with the scale folded into one FFMA; −inf − (−inf) guarded."""

    def __init__(self, rows: int):
        self.row_max = np.full(rows, -np.inf)
        self.row_sum = np.zeros(rows)

    def update(self, s: np.ndarray, scale_log2: float) -> np.ndarray:
        """``update``: s (rows, Bc) raw scores → P in place of s (returned), and corr (rows,)."""
        m_new = np.maximum(self.row_max, s.max(axis=1))
        offset = np.where(m_new == -np.inf, 0.0, m_new * scale_log2)          # guard −inf − (−inf)
        corr = np.exp2(self.row_max * scale_log2 - offset)                     # 0 while row_max = −inf
        self.row_max = m_new
        p = np.exp2(s * scale_log2 - offset[:, None])                          # one FFMA + MUFU.EX2
        self.row_sum = self.row_sum * corr + p.sum(axis=1)
        return p, corr

    def update_lazy(self, s: np.ndarray, scale_log2: float, threshold: float = 8.0):
        """``update_lazy`` (conditional rescaling): the max moves only when a row's tile max exceeds it by
        more than ``threshold`` in log2 units; returns (P, corr, rescale). corr is 1 where the max stayed;
        ``rescale`` is whether any row moved (the kernel asks per warp; multiplying by 1 changes nothing)."""
        m_new = np.maximum(self.row_max, s.max(axis=1))
        with np.errstate(invalid="ignore"):                                    # −inf − (−inf): stays
            grow = (m_new - self.row_max) * scale_log2 > threshold
            corr = np.where(grow, np.exp2((self.row_max - m_new) * scale_log2), 1.0)
        self.row_max = np.where(grow, m_new, self.row_max)
        offset = np.where(self.row_max == -np.inf, 0.0, self.row_max * scale_log2)
        p = np.exp2(s * scale_log2 - offset[:, None])
        self.row_sum = self.row_sum * corr + p.sum(axis=1)
        return p, corr, bool(grow.any())

    def finalize(self, softmax_scale: float):
        """(inv_sum, lse): 1/ℓ (0 for a row that saw no key) and lse = m·α + ln ℓ (+inf for such a row)."""
        empty = self.row_sum == 0
        inv_sum = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, self.row_sum))
        lse = np.where(empty, np.inf, self.row_max * softmax_scale + np.log(np.where(empty, 1.0, self.row_sum)))
        return inv_sum, lse


def _consumer_step04(cta: _Cta, c: int, softmax_scale: float, turns, lazy_rescale: bool = True):
    """Twin of step 04's consumer warpgroup (cuda/steps/04_intra_warpgroup_overlap.cu): the kernel's
    names (``s``, ``pa``, ``o``, ``corr``, ``softmax``, ``wait_turn``/``pass_turn``, ``stage_of``/``phase_of``),
    its order (tiles from n_block_max − 1 down, the masked ones first), its stage numbers 1–7 and its
    release points. Algorithm 2's line numbers are in the right margin. ``turns`` are the pingpong's
    named barriers (None: no pingpong)."""
    role, rows, f = f"consumer{c}", cta.rows[c], cta.fault
    n_block_max, kStages = cta.n_blocks, cta.num_stages
    kHeadDim = cta.q_i.shape[1]

    def wait_turn(i):                                                    # named_barrier_sync(turn[c])
        yield from _pingpong_sync(cta, role, turns, c, i)

    def pass_turn(i):                                                    # named_barrier_arrive(turn[c+1])
        _pingpong_arrive(cta, role, turns, c, i)

    def stage_of(i):
        return i % kStages

    def phase_of(i):
        return (i // kStages) & 1

    cta.log(role, "setmaxnreg.inc")                                      # Alg. 2 line 1
    yield None
    softmax = OnlineSoftmax(len(rows))                                   # row_max, row_sum (64,)
    o = np.zeros((len(rows), kHeadDim))                                  # (64, kHeadDim) fp32 regs  line 2
    yield from cta.wait(role, cta.full_q, 0, f"Q_{cta.coords[2]}")       # line 3
    q = cta.smem_q.read(c, f"Q_{cta.coords[2]}")[rows]                   # (64, kHeadDim) smem
    if n_block_max <= 0:                                                 # causal, seqlen_q > seqlen_k
        inv_sum, lse = softmax.finalize(softmax_scale)                   # store_empty_rows
        cta.store_o_lse(c, o * inv_sum[:, None], lse)
        return
    # prologue, tile 0: S = Q·K_0ᵀ
    yield from _consumer_wait_full(cta, role, cta.full_k[stage_of(0)], phase_of(0), "K_0", stage_of(0))  # line 3
    yield from wait_turn(0)
    s = q @ cta.smem_k[stage_of(0)].read(c, "K_0").T                     # (64, kBlockN) fp32  line 4
    cta.log(role, "issue S=QKᵀ", "K_0", stage_of(0))
    pass_turn(0)
    yield None
    _consumer_release(cta, c, role, "K", stage_of(0), 0)                 # K_0 read: release   line 5
    n_block = n_block_max - 1
    if cta.needs_mask(n_block):
        s = cta.mask(s, rows, n_block)
    pa, corr = softmax.update(s, cta.scale_log2)                         # P_0 → pa            line 6
    cta.log(role, "softmax", "K_0", stage_of(0))
    yield None
    for i in range(1, n_block_max):                                      # line 7: masked tiles first
        n_block = n_block_max - 1 - i
        stage, prev = stage_of(i), stage_of(i - 1)
        # 1. operands ready; my turn
        yield from _consumer_wait_full(cta, role, cta.full_k[stage], phase_of(i), f"K_{i}", stage)  # line 8
        yield from wait_turn(i)
        # 2. S_next = Q·K_iᵀ (group 1); O += P_{i−1}·V_{i−1} (group 2); hand over
        slot_k = cta.smem_k[stage]
        gemm0 = _Wgmma(lambda i=i, slot_k=slot_k: q @ slot_k.read(c, f"K_{i}").T)  # line 9
        cta.log(role, "issue S=QKᵀ", f"K_{i}", stage)
        yield None
        yield from _consumer_wait_full(cta, role, cta.full_v[prev], phase_of(i - 1), f"V_{i-1}", prev)  # line 10
        slot_v = cta.smem_v[prev]
        gemm1 = _Wgmma(lambda i=i, slot_v=slot_v, pa=pa: pa @ slot_v.read(c, f"V_{i-1}"))  # line 11
        cta.log(role, "issue O+=PV", f"V_{i-1}", prev)
        pass_turn(i)
        yield None
        if f == "release_before_wgmma_wait":                             # (broken: K released too early)
            _consumer_release(cta, c, role, "K", stage, i)
            yield None
        # 3. wgmma.wait_group 1: S_next ready, P·V still in flight; release K_i
        s = gemm0.wait()                                                 # line 12
        cta.log(role, "wait S", f"K_{i}", stage)
        if f != "release_before_wgmma_wait":
            _consumer_release(cta, c, role, "K", stage, i)               # line 15 (K part)
        # 4. mask; online softmax of S_next (under the P·V GEMM)
        if cta.needs_mask(n_block):
            s = cta.mask(s, rows, n_block)
        if lazy_rescale:
            p, corr, rescale = softmax.update_lazy(s, cta.scale_log2)    # line 13
        else:
            (p, corr), rescale = softmax.update(s, cta.scale_log2), True
        cta.log(role, "softmax", f"K_{i}", stage)
        yield None
        # 5. wgmma.wait_group 0: P·V done; release V_{i−1}
        o = o + gemm1.wait()                                             # line 14 (wait)
        cta.log(role, "wait PV, rescale O", f"V_{i-1}", prev)
        _consumer_release(cta, c, role, "V", prev, i - 1)                # line 15 (V part)
        # 6. P_i → pa; O *= corr_i (lazy: only if a max moved)
        pa = p                                                           # line 16
        if rescale:
            o = o * corr[:, None]                                        # line 14 (rescale)
        corr = np.ones(len(rows))
        yield None
    # epilogue turn: O += P_last·V_last
    last = stage_of(n_block_max - 1)
    yield from _consumer_wait_full(cta, role, cta.full_v[last], phase_of(n_block_max - 1),
                                   f"V_{n_block_max-1}", last)           # line 18
    yield from wait_turn(n_block_max)
    o = o * corr[:, None]
    o = o + pa @ cta.smem_v[last].read(c, f"V_{n_block_max-1}")          # line 19
    cta.log(role, "issue O+=PV", f"V_{n_block_max-1}", last)
    pass_turn(n_block_max)
    _consumer_release(cta, c, role, "V", last, n_block_max - 1)
    yield None
    # 7. epilogue: O / ℓ and lse
    inv_sum, lse = softmax.finalize(softmax_scale)                       # line 20
    cta.store_o_lse(c, o * inv_sum[:, None], lse)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def _check_options(schedule, seed, fault, tma_latency, allowed_faults):
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if fault is not None and fault not in allowed_faults:
        raise ValueError(f"fault: expected None or one of {tuple(allowed_faults)}, got {fault!r}")
    return check_block("tma_latency", tma_latency)


def _run(q, k, v, causal, softmax_scale, block_m, block_n, num_stages, num_consumers, trace,
         schedule, seed, fault, tma_latency, make_consumer):
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = check_qkv(q, k, v)
    causal = check_bool("causal", causal)
    trace = check_bool("trace", trace)
    softmax_scale = resolve_scale(softmax_scale, headdim)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x)
    scale_log2 = softmax_scale * kLog2e
    group = nheads // nheads_kv
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    out = np.zeros((batch, seqlen_q, nheads, headdim))
    lse = np.zeros((batch, nheads, seqlen_q))
    rng = np.random.default_rng(seed)
    events: list[TraceEvent] = []
    for b in range(batch):
        for h in range(nheads):
            k_head, v_head = k64[b, :, h // group, :], v64[b, :, h // group, :]   # GQA by index
            for m_block in range(ceil_div(seqlen_q, block_m)):                    # one CTA each
                row0 = m_block * block_m
                _, n_blocks = n_block_range(m_block, seqlen_q, seqlen_k, block_m, block_n, causal)
                cta = _Cta((b, h, m_block), q64[b, row0:row0 + block_m, h, :], k_head, v_head,
                           n_blocks, block_m=block_m, block_n=block_n, num_stages=num_stages,
                           num_consumers=num_consumers, row0=row0, seqlen_q=seqlen_q,
                           seqlen_k=seqlen_k, causal=causal, scale_log2=scale_log2, fault=fault,
                           tma_latency=tma_latency, trace=trace)
                agents = {"producer": _producer(cta), "tma": cta.tma_agent()}
                agents.update(make_consumer(cta, softmax_scale))
                cta.run(agents, schedule, rng)
                rows = min(block_m, seqlen_q - row0)
                out[b, row0:row0 + rows, h, :] = cta.o_acc[:rows]
                lse[b, h, row0:row0 + rows] = cta.lse[:rows]
                events.extend(cta.events)
    return (out, lse, events) if trace else (out, lse)


def warp_specialized_forward(q, k, v, causal=False, softmax_scale=None, block_m=128, block_n=128,
                             num_stages=2, num_consumers=2, trace=False, *, schedule="round_robin",
                             seed=0, fault=None, tma_latency=2):
    """Attention forward as Algorithm 1 runs it: a producer, ``num_consumers`` consumers, a ring.

    Per CTA (batch, head, Q tile Q_i of Br = block_m rows) the producer loads Q_i, then for each
    visible K/V tile j waits on ``empty_k/v[j % num_stages]`` (flipped phase), issues the TMA loads
    of K_j and V_j (``full_k/v`` complete when they land); each consumer (its slice of the Br rows)
    waits on ``full`` with the phase, computes S = Q_i K_jᵀ, the online softmax and O_i += P̃ V_j,
    and arrives on ``empty``. A scheduler interleaves the warpgroups step by step.

    Args:
        q: (batch, seqlen_q, nheads, headdim) floating ndarray.
        k, v: (batch, seqlen_k, nheads_kv, headdim); query head h reads KV head
            h // (nheads // nheads_kv).
        causal: bottom-right aligned causal mask; fully masked K/V tiles are not loaded.
        softmax_scale: α, default 1/sqrt(headdim).
        block_m, block_n: Br, Bc (positive ints; need not divide the sequence lengths).
        num_stages: ring slots s (positive int).
        num_consumers: consumer warpgroups splitting the Br rows (positive int).
        trace: also return the list of :class:`TraceEvent` (every CTA, in step order).
        schedule: keyword-only, one of :data:`SCHEDULES`: ``"round_robin"`` (producer, tma,
            consumer0, ... in turn), ``"producer_first"`` / ``"consumers_first"`` (strict priority)
            or ``"random"`` (seeded by ``seed``). The result never depends on it; races do.
        seed: int, for ``schedule="random"``.
        fault: None or a key of :data:`FAULTS` except ``"release_before_wgmma_wait"`` — break the
            protocol on purpose.
        tma_latency: TMA turns between issuing a copy and its landing (positive int).

    Returns:
        out (batch, seqlen_q, nheads, headdim) float64 and lse (batch, nheads, seqlen_q) float64
        (natural log; rows that see no key: out 0, lse +inf) — equal to ``standard_attention`` —
        and with trace=True also the trace events.

    Raises:
        TypeError: non-floating q/k/v, non-bool causal/trace, non-int sizes or seed.
        ValueError: shapes (``check_qkv``), sizes <= 0, NaN/inf inputs, an unknown schedule or fault.
        BarrierViolation: shared memory read before its copy landed, or overwritten before it was
            released (only with a ``fault``).
        PipelineDeadlock: every warpgroup waits forever (only with a ``fault``).

    Source: paper §3.1, Algorithm 1 (line numbers in the code).
    """
    block_m, block_n = check_block("block_m", block_m), check_block("block_n", block_n)
    num_stages = check_block("num_stages", num_stages)
    num_consumers = check_block("num_consumers", num_consumers)
    faults = {k_: v_ for k_, v_ in FAULTS.items() if k_ != "release_before_wgmma_wait"}
    tma_latency = _check_options(schedule, seed, fault, tma_latency, faults)

    def consumers(cta, scale):
        return {f"consumer{c}": _consumer_alg1(cta, c, scale) for c in range(num_consumers)}

    return _run(q, k, v, causal, softmax_scale, block_m, block_n, num_stages, num_consumers, trace,
                schedule, seed, fault, tma_latency, consumers)


def pipelined_forward(q, k, v, causal=False, softmax_scale=None, block_m=128, block_n=128,
                      pingpong=True, trace=False, *, num_stages=2, schedule="round_robin", seed=0,
                      fault=None, tma_latency=2):
    """Attention forward with Algorithm 2's consumers (two of them) and, optionally, pingpong.

    Each of the two consumer warpgroups (rows split as in :func:`warp_specialized_forward`) issues
    S_next = Q_i K_jᵀ and then O_i += P̃_cur V_{j−1} without waiting, waits only for S_next, runs
    the softmax of iteration j while the PV GEMM of j−1 is in flight, then waits for it and rescales
    O_i (paper §3.2). The wgmma's shared-memory reads happen at its wait, so a slot released before
    the wait (``fault="release_before_wgmma_wait"``) can be overwritten under it.

    With ``pingpong=True`` each consumer ``bar.sync``s on its named barrier before issuing the GEMMs
    of an iteration and ``bar.arrive``s on the other's after, so consumer0's GEMMs of iteration j
    are issued before consumer1's, whose are issued before consumer0's of j+1 (§3.1): in the trace
    the ``issue`` events alternate between the consumers whatever the schedule.

    Args:
        q, k, v, causal, softmax_scale, block_m, block_n, trace: as :func:`warp_specialized_forward`.
        pingpong: bool, the named-barrier hand-off between the two consumers.
        num_stages, schedule, seed, tma_latency: keyword-only, as :func:`warp_specialized_forward`.
        fault: None or a key of :data:`FAULTS`.

    Returns:
        (out, lse) or (out, lse, trace_events), as :func:`warp_specialized_forward`.

    Raises:
        As :func:`warp_specialized_forward`; TypeError for a non-bool pingpong.

    Source: paper §3.2, Algorithm 2 (line numbers in the code); §3.1 "Pingpong scheduling".
    """
    block_m, block_n = check_block("block_m", block_m), check_block("block_n", block_n)
    num_stages = check_block("num_stages", num_stages)
    pingpong = check_bool("pingpong", pingpong)
    tma_latency = _check_options(schedule, seed, fault, tma_latency, FAULTS)

    def consumers(cta, scale):
        bars = None
        if pingpong:
            bars = [NamedBarrier(f"pingpong_bar[{c}]") for c in range(2)]
            bars[0].arrive()                 # consumer1 lets consumer0 go first
        return {f"consumer{c}": _consumer_step04(cta, c, scale, bars) for c in range(2)}

    return _run(q, k, v, causal, softmax_scale, block_m, block_n, num_stages, 2, trace,
                schedule, seed, fault, tma_latency, consumers)
