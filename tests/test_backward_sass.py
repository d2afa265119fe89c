"""The backward steps' SASS (marker ``sass``: needs nvcc + cuobjdump, no GPU): every instantiation of each backward
step's main kernel (dtype × headdim × causal) compiles without spills or local memory, runs its five GEMMs as the
HGMMA groups the tiles ask for, keeps its exponentials under the dPᵀ GEMM (or among the dV GEMM's k-steps), (steps
13+, headdim ≤ 128) adds dQ with one bulk reduction instead of fp32 atomics, and (step 15 and its children) issues
the dQ GEMM between dV's and dK's.

The HGMMA forms, as cuobjdump prints them: Sᵀ and dPᵀ are SS with both descriptors plain (step 22 at headdim 64:
Sᵀ is RS with a plain descriptor, K_j's rows in registers); dV and dK are RS (the A operand a register, ``.tnspB``);
dQ = dS·K is SS with ``.tnspA.tnspB`` (cuda/steps/bwd/11_bwd.cu, "Why transposed").
"""
from __future__ import annotations

import re

import pytest

from fa3_lab import _build, _env, registry
from fa3_lab.lab import sass

pytestmark = pytest.mark.sass

#: headdim → (kBlockM, kBlockN) of the backward steps (each step's Config); step 16 and its children use
#: 80-query m_blocks at headdim 128.
TILES = {64: (128, 128), 128: (64, 128), 256: (64, 64)}


def _extends(s, step_id):
    """Whether step ``s`` is ``step_id`` or built on it (its parent chain)."""
    while s is not None:
        if s.id == step_id:
            return True
        s = registry.step(s.parent) if s.parent is not None else None
    return False


def tiles(s, headdim):
    """(kBlockM, kBlockN) of step ``s`` at ``headdim``."""
    return (80, 128) if headdim == 128 and _extends(s, 16) else TILES[headdim]


def s_cols(s, headdim):
    """Queries per consumer in Sᵀ and dPᵀ: all kBlockM, but half of them at headdim 256 from step 25 (split S)."""
    block_m = tiles(s, headdim)[0]
    return block_m // 2 if headdim == 256 and _extends(s, 25) else block_m
BWD_STEPS = [pytest.param(s, marks=getattr(pytest.mark, s.marker), id=s.marker) for s in registry.series("bwd")]


def _group_walk(name):
    """Whether a main kernel's mangled name is the GQA group-walk variant (step 21's kGroup = true)."""
    m = re.search(r"Li\d+ELb[01]ELb([01])E", name)
    return bool(m) and m.group(1) == "1"


def _mains(funcs):
    """(mangled name, headdim, SASS) of every backward main kernel (bwd_kernel) among a cubin's functions."""
    for name, text in funcs.items():
        if "bwd_kernel" in name:
            yield name, int(re.search(r"Li(\d+)E", name).group(1)), text


def _loop_ops(text):
    """The opcodes of a kernel's main loop (sass.main_loop), in program order."""
    return [i["op"] for i in sass.main_loop(sass.parse_sass(text))["instructions"]]


def _forms(text):
    """The main kernel's HGMMAs in program order, each "sdp", "rs" or "dq", and the form of the last HGMMA before
    each MUFU.EX2."""
    order, before_ex2, last = [], [], None
    for line in text.splitlines():
        m = re.search(r"\bHGMMA\.\S+\s+R\d+,\s*(\S+)", line)
        if m:
            # an A register without .tnspB is Sᵀ from registers (step 22: K_j's fragments, Q_i K-major)
            last = "dq" if "tnspA" in line else "rs" if m.group(1).startswith("R") and "tnspB" in line else "sdp"
            order.append(last)
        if "MUFU.EX2" in line:
            before_ex2.append(last)
    return order, before_ex2


@pytest.fixture(scope="module", params=BWD_STEPS)
def compiled(request):
    s = request.param
    cubin, log = sass.compile_source(_env.REPO_ROOT / s.path)
    return s, _build.ptxas_report(log), sass.dump_sass(cubin), log


def test_no_spills_and_no_local_memory(compiled):
    s, report, funcs, _ = compiled
    rows = [r for r in report if "bwd_kernel" in r["kernel"]]
    count = 24 if _extends(s, 21) else 12  # {fp16, bf16} × {64, 128, 256} × {causal, not} (× GQA group walk or not)
    assert len(rows) == count, [r["kernel"] for r in rows]
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (s.name, r)
        assert r["registers"] <= 255, (s.name, r)
    mains = {name: text for name, text in funcs.items() if "bwd_kernel" in name}
    assert len(mains) == count
    for name, text in mains.items():
        assert not re.search(r"\b(LDL|STL)\b", text), f"{s.name} {name}: local memory in the SASS"


def test_gemm_groups_and_where_the_exponentials_sit(compiled):
    s, _, funcs, _ = compiled
    for name, headdim, text in _mains(funcs):
        block_m, block_n = tiles(s, headdim)
        order, before_ex2 = _forms(text)
        # Sᵀ and dPᵀ: K = headdim in steps of 16, each at least once (step 14 issues Sᵀ in two places)
        assert order.count("sdp") >= 2 * headdim // 16, (s.name, name, order)
        assert order.count("rs") == 2 * block_m // 16, (s.name, name, order)  # dV, dK: K = kBlockM queries
        # dQ: K = kBlockN keys; step 20 on issue it in the loop and once after it (the last m_block's, one behind)
        tail = 2 if _extends(s, 20) and headdim <= 128 else 1
        assert order.count("dq") == tail * block_n // 16, (s.name, name, order)
        # the exponentials: kBlockM/2 per thread (64 keys × kBlockM queries over 128 threads; step 25 at headdim 256:
        # half the queries), under the dPᵀ GEMM (the last HGMMA before them an Sᵀ/dPᵀ one) or, where Pᵀ is packed as
        # it is computed (step 14), among the dV GEMM's k-steps that consume it — never behind the dQ GEMM
        assert len(before_ex2) == s_cols(s, headdim) // 2, (s.name, name, len(before_ex2))
        assert before_ex2[0] == "sdp" and set(before_ex2) <= {"sdp", "rs"}, (s.name, name, before_ex2)


def test_dq_accumulation_form(compiled):
    """Steps 11–12 add dQ with fp32 atomics from registers; from step 13 on, headdim ≤ 128 adds it with one bulk
    reduction (UBLKRED) of the writer warp, and no fp32 global atomic is left in the kernel; headdim 256 from step
    24 on."""
    s, _, funcs, _ = compiled
    for name, headdim, text in _mains(funcs):
        bulk = len(re.findall(r"\bUBLKRED\b", text))
        atomics = len(re.findall(r"\b(?:RED|ATOM|REDG|ATOMG)\.E\.ADD\.F32", text))
        if s.id >= 13 and (headdim <= 128 or _extends(s, 24)):
            assert bulk == 1 and atomics == 0, (s.name, name, bulk, atomics)
        else:
            assert bulk == 0 and atomics > 0, (s.name, name, bulk, atomics)


def test_dq_gemm_between_dv_and_dk(compiled):
    """Step 15's lesson: the dQ GEMM is issued after dV's and before dK's, so dQ_i's store runs under dK; before
    step 15, and at headdim 256 (Config::kDqUnderDk), the two RS GEMMs (dV, dK) come back to back and dQ after them."""
    s, _, funcs, _ = compiled
    for name, headdim, text in _mains(funcs):
        block_m, block_n = tiles(s, headdim)
        order = "".join({"sdp": "s", "rs": "r", "dq": "q"}[f] for f in _forms(text)[0])
        rs, dq = "r" * (block_m // 16), "q" * (block_n // 16)
        expected = rs + dq + rs if _extends(s, 15) and headdim <= 128 else rs + rs + dq  # 256: 13's order (registers)
        assert expected in order, (s.name, name, order)


def test_wgmma_not_serialized(compiled):
    """Where ptxas cannot keep every in-flight WGMMA's registers apart (info C7512) or sees other instructions read
    an accumulator inside the pipeline (C7514), it makes each WGMMA wait for the last — a WARPGROUP.DEPBAR after
    every HGMMA — and the GEMMs overlap nothing. Every step but 14 compiles without it (step 14 has it at
    headdim 128: docs/performance.md)."""
    s, _, funcs, log = compiled
    serialized = set(re.findall(r"wgmma.mma_async instructions are serialized.*?function '(\S+)'", log))
    for name, headdim, text in _mains(funcs):
        waits_after_each = len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", text)) >= len(re.findall(r"\bHGMMA\.", text))
        assert (name in serialized) == waits_after_each, (s.name, name)  # the message and the SASS agree
        if s.id != 14:  # step 14, the measured counter-example, is serialized at headdim 128
            assert name not in serialized, f"{s.name} {name}: WGMMAs serialized (ptxas C7512)"


def test_where_ptxas_waits_for_dp(compiled):
    """Where the exponentials sit, read in the SASS (headdim 64 and 128): the first wait is for Sᵀ alone
    (WARPGROUP.DEPBAR.LE gsb0, 0x1), but before the first MUFU.EX2 ptxas also waits for dPᵀ (0x0) — it moves that
    wait above the exponentials, which the source puts after them. So the exponentials overlap the other consumer's
    GEMMs, not their own dPᵀ. Forcing them under dPᵀ (dV issued before the wait) measured 0.98× step 19
    (docs/performance.md, "What did not pay"); step 20 overlaps them with the other consumer instead."""
    s, _, funcs, _ = compiled
    if not _extends(s, 15):
        pytest.skip("before step 15 the order of the m_block's GEMMs is another lesson")
    for name, headdim, text in _mains(funcs):
        if headdim > 128:
            continue
        # the WGMMA waits between the first HGMMA and the first EX2
        loop = text[text.index("HGMMA."):text.index("MUFU.EX2")]
        waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x\d+)", loop)
        if _extends(s, 27) and (headdim == 64 or _group_walk(name)):
            # step 27 reads L_i by LDS after the Sᵀ wait here (not under the GEMM): ptxas then keeps some
            # exponentials ahead of the dPᵀ wait
            assert waits == ["0x1"], (s.name, name, waits)
        else:
            assert waits and waits[0] == "0x1" and "0x0" in waits, (s.name, name, waits)


def test_without_the_group_walk_step_21_divides_as_step_20(compiled):
    """Step 21's GQA group walk is a template variant (kGroup). Its first build had one kernel that computed each
    iteration's (head, m_block) as i / num_iters, i % num_iters: the producer's and the dQ writer's loops gained
    runtime divisions (MUFU.RCP and ~20 integer instructions each: 8 MUFU.RCP in the headdim-64 kernel against step
    20's 4), and multi-head attention measured 0.98× step 20 at headdim 64 (docs/performance.md). Without the walk
    the kernel must divide no more often than step 20's."""
    s, _, funcs, _ = compiled
    if not _extends(s, 21):
        pytest.skip("the GQA group walk starts at step 21")
    cubin, _ = sass.compile_source(_env.REPO_ROOT / registry.step(20).path)

    def key(name):  # dtype, headdim, causal
        return ("bfloat16" in name,) + re.search(r"Li(\d+)ELb(\d)", name).groups()

    parent = {key(n): t for n, t in sass.dump_sass(cubin).items() if "bwd_kernel" in n}
    checked = 0
    for name, text in funcs.items():
        if "bwd_kernel" not in name or "ELb1EEEv" in name:  # the group-walk variant (last template argument true)
            continue
        assert text.count("MUFU.RCP") <= parent[key(name)].count("MUFU.RCP"), (s.name, name)
        checked += 1
    assert checked == 12


def test_k_in_registers_and_ds_by_stmatrix(compiled):
    """Step 22's lesson, at headdim 64: Sᵀ = K_j·Q_iᵀ takes K_j's rows from registers (kHeadDim/16 HGMMAs with a
    register A operand and a plain descriptor, loaded once by LDSM before the loop) and dSᵀ goes to shared memory by
    STSM (kBlockM/16 per m_block) instead of 32-bit STS; dPᵀ stays SS. Other headdims and earlier steps: no
    register-A Sᵀ, and no LDSM but step 25's at headdim 256 (test_split_s_at_headdim_256)."""
    s, _, funcs, _ = compiled
    for name, headdim, text in _mains(funcs):
        block_m, _ = tiles(s, headdim)
        s_from_regs = len(re.findall(r"\bHGMMA\.\S+\s+R\d+,\s*R\d+,\s*gdesc\[\w+\](?!\.tnsp)", text))
        ldsm = len(re.findall(r"\bLDSM\.", text))
        if _extends(s, 22) and headdim == 64:
            assert s_from_regs == headdim // 16 and ldsm == headdim // 16, (s.name, name, s_from_regs, ldsm)
            loop = sass.main_loop(sass.parse_sass(text))
            assert sum(i["op"].startswith("STSM") for i in loop["instructions"]) == block_m // 16, (s.name, name)
        else:
            assert s_from_regs == 0, (s.name, name, s_from_regs)
            assert ldsm == 0 or (headdim == 256 and _extends(s, 25)), (s.name, name, ldsm)


def test_split_s_at_headdim_256(compiled):
    """Step 25's lesson, at headdim 256: each consumer issues Sᵀ and dPᵀ for its 32 queries only (m64n32k16 SS
    HGMMAs, K = 256: 16 each per m_block), stores its halves of Pᵀ and dSᵀ by STSM (2 each) and loads both tiles
    whole back by LDSM (4 each) for the dV and dK GEMMs. Before step 25, and at headdim 64 and 128, no n32 HGMMA."""
    s, _, funcs, _ = compiled
    for name, headdim, text in _mains(funcs):
        loop = sass.main_loop(sass.parse_sass(text))["instructions"]
        n32 = sum(i["op"].startswith("HGMMA.64x32x16") for i in loop)
        if headdim == 256 and _extends(s, 25):
            assert n32 == 2 * headdim // 16, (s.name, name, n32)
            assert sum(i["op"].startswith("STSM") for i in loop) == 4, (s.name, name)
            assert sum(i["op"].startswith("LDSM") for i in loop) == 8, (s.name, name)
        else:
            assert n32 == 0, (s.name, name, n32)


def test_do_released_after_dv(compiled):
    """Step 26's lesson: at headdim 64 and 128 each consumer arrives on the ring's empty mbarriers twice per m_block
    (dO_i's half once dV is done, Q_i's once dK is), one arrive more in the loop than step 25; at headdim 256 (one
    stage, no lag) the count is step 25's. Counted: the loop's SYNCS.ARRIVE (the dSᵀ buffers' full and empty
    barriers, and the ring's)."""
    s, _, funcs, _ = compiled
    for name, headdim, text in _mains(funcs):
        if not _extends(s, 25):
            continue
        loop = sass.main_loop(sass.parse_sass(text))["instructions"]
        arrives = sum(i["op"].startswith("SYNCS.ARRIVE") for i in loop)
        expected = 3 + (headdim <= 128 and _extends(s, 26))
        assert arrives == expected, (s.name, name, arrives, expected)


def test_shared_window(compiled):
    """Step 27's lesson: the consumers read L_i, D_i and write the dQ tile through pointers the compiler knows are
    shared. Up to step 26 the loop has generic LD.E.64 and ST.E.128 (the uintptr_t round-up of the dynamic shared
    memory loses the address space); from step 27 it has none, and LDS.64 and STS.128 instead. At headdim 128 and
    256 (one head per CTA) L_i's loads sit ahead of the first WGMMA wait, under the Sᵀ GEMM."""
    s, _, funcs, _ = compiled
    if not _extends(s, 19):
        pytest.skip("the dQ tile's stores and the loop's shape are 19's on")
    for name, headdim, text in _mains(funcs):
        ops = _loop_ops(text)
        generic = sum(op.startswith(("LD.E", "ST.E")) for op in ops)
        shared = sum(op.startswith(("LDS.", "STS.")) for op in ops)
        if not _extends(s, 27):
            assert generic > 0 and shared == 0, (s.name, name, generic, shared)
            continue
        assert generic == 0 and shared > 0, (s.name, name, generic, shared)
        if headdim > 64 and not _group_walk(name):
            first_wait = ops.index("WARPGROUP.DEPBAR.LE")
            assert ops[:first_wait].count("LDS.64") > 0, (s.name, name)


def test_lse_read_before_the_gemms(compiled):
    """Step 28's lesson: L_i's loads issued before the loop's first GEMM, not behind the Sᵀ and dPᵀ GEMMs' shared-memory
    operand reads. At headdim 128 and 256 with one head per CTA, step 27 issues its kSCols / 8 LDS.64 of L_i after
    the first HGMMA; from step 28 they all sit ahead of it. Headdim 64 and the GQA walk read L_i after the wait (27)."""
    s, _, funcs, _ = compiled
    if not _extends(s, 27):
        pytest.skip("L_i is read by LDS from step 27 on")
    checked = 0
    for name, headdim, text in _mains(funcs):
        if headdim == 64 or _group_walk(name):
            continue
        ops = _loop_ops(text)
        first_gemm = next(k for k, op in enumerate(ops) if op.startswith("HGMMA"))
        ahead = ops[:first_gemm].count("LDS.64")
        n_l = s_cols(s, headdim) // 8  # one LDS.64 per 8 columns of Sᵀ: L_i's two values of this thread
        if _extends(s, 28):
            assert ahead == n_l, (s.name, name, ahead, n_l)
        else:
            assert ahead == 0, (s.name, name, ahead)
        checked += 1
    assert checked == 8, (s.name, checked)  # 2 dtypes × headdim 128, 256 × causal or not
