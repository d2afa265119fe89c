"""The one id scheme of the lab: kernel steps, their NumPy twins, the notebooks (chapters) and markers.

This module is the single source every other file is checked against (``tests/test_ids.py``):

* a **step** is one kernel file, ``cuda/steps/NN_name.cu`` (forward series) or
  ``cuda/steps/bwd/NN_name.cu`` (backward series), holding one idea on top of its ``parent``;
  its id ``NN`` is also its pytest marker ``stepNN`` and the ``step=`` argument of
  :func:`fa3_lab.flash_attn_func`;
* its **twin** is the NumPy model in ``reference/`` that uses the kernel's names in the kernel's
  order (None where no NumPy model says anything the kernel does not);
* a **chapter** is a notebook ``notebooks/NN_name.ipynb``; it names the steps it covers.

Plain data, no imports beyond the standard library: the README table, the docs and the tests read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """One kernel step.

    Attributes:
        id: two-digit step id (marker ``step{id:02d}``).
        name: file stem, e.g. ``"04_intra_warpgroup_overlap"``.
        series: ``"fwd"`` (``cuda/steps/``) or ``"bwd"`` (``cuda/steps/bwd/``).
        parent: the step this one extends (its diff from the parent is the lesson), or None for the
            first step of a series.
        adds: the one idea, in a line.
        paper: where the idea is in the paper ("beyond the paper" for the fast kernel's own ideas).
        twin: ``"reference/module.py"`` (optionally ``::function``) or None.
        dtypes: the input dtypes the step runs.
        headdims: the headdims whose kernels the step changes (a backward step may change one; the others
            compile to its parent's kernels). The step header's "Measured" paragraph is taken at headdim 128
            when it is among them, else at the first.
    """

    id: int
    name: str
    series: str
    parent: int | None
    adds: str
    paper: str
    twin: str | None
    dtypes: tuple = ("fp16", "bf16")
    headdims: tuple = (64, 128, 256)

    @property
    def marker(self) -> str:
        return f"step{self.id:02d}"

    @property
    def path(self) -> str:
        folder = "cuda/steps/" if self.series == "fwd" else "cuda/steps/bwd/"
        return f"{folder}{self.name}.cu"


@dataclass(frozen=True)
class Chapter:
    """One notebook: ``notebooks/{name}.ipynb``, covering ``steps`` (ids; empty for NumPy-only chapters)."""

    id: int
    name: str
    title: str
    steps: tuple = ()


STEPS: tuple[StepInfo, ...] = (
    StepInfo(1, "01_tma_wgmma", "fwd", None,
             "TMA loads + WGMMA GEMMs (SS for QKᵀ, RS for PV), two consumer warpgroups, no specialization",
             "§4.2 Table 2 row 1", "reference/flash_forward.py::flash_attention_forward"),
    StepInfo(2, "02_warp_specialized", "fwd", 1,
             "producer warpgroup, s-stage K/V ring with full/empty mbarriers, setmaxnreg",
             "§3.1 Alg. 1", "reference/fa3_pipeline.py::warp_specialized_forward"),
    StepInfo(3, "03_pingpong", "fwd", 2,
             "named-barrier pingpong of the two consumer warpgroups",
             "§3.1 Fig. 1", "reference/fa3_pipeline.py::pipelined_forward"),
    StepInfo(4, "04_intra_warpgroup_overlap", "fwd", 3,
             "softmax of tile j under the PV GEMM of tile j−1 (two-stage GEMM-softmax pipeline)",
             "§3.2 Alg. 2", "reference/fa3_pipeline.py::pipelined_forward"),
    StepInfo(5, "05_fp8", "fwd", 4,
             "e4m3 operands, per-block descales, V k-major (keys permuted, no P shuffle)",
             "§3.3", "reference/fp8.py::fp8_attention", dtypes=("e4m3",)),
    StepInfo(6, "06_persistent", "fwd", 4,
             "persistent grid: min(tiles, SMs) CTAs stride over the work tiles (static tile scheduler)",
             "beyond the paper", "reference/scheduler.py::static_schedule"),
    StepInfo(7, "07_causal_scheduler", "fwd", 6,
             "causal: dynamic tile scheduler, longest tiles first within L2-sized sections of heads",
             "beyond the paper", "reference/scheduler.py::dynamic_schedule"),
    StepInfo(8, "08_tma_store_epilogue", "fwd", 7,
             "epilogue through shared memory: stmatrix, then one TMA store per warpgroup",
             "beyond the paper", None),
    StepInfo(9, "09_three_warpgroups", "fwd", 8,
             "headdim 64: three consumer warpgroups on 192-row tiles, turns rotating over three",
             "beyond the paper", "reference/fa3_pipeline.py::pipelined_forward"),
    StepInfo(10, "10_kv_multicast", "fwd", 9,
             "clusters of two CTAs share each K/V tile by TMA multicast",
             "beyond the paper", None),
    StepInfo(11, "11_bwd", "bwd", None,
             "backward: preprocess (D, lse·log2 e), K/V-stationary main kernel on WGMMA (Sᵀ, dPᵀ; dV, dK from "
             "registers; dQ = dS·K through smem, fp32 atomics), postprocess (dQ, GQA sums)",
             "App. B.1 Alg. 3", "reference/backward.py::flash_attention_backward"),
    StepInfo(12, "12_bwd_warp_specialized", "bwd", 11,
             "backward: producer warpgroup, Q/dO ring with full/empty mbarriers, dSᵀ double-buffered (one barrier "
             "per m_block)",
             "§3.1 (warp specialization), App. B.1", None),
    StepInfo(13, "13_bwd_dq_writer", "bwd", 12,
             "backward: dQ through an smem tile, added to dq_accum by one bulk reduction of a dQ-writer warp",
             "beyond the paper (FA3's code)", None),
    StepInfo(14, "14_bwd_pipelined", "bwd", 13,
             "backward: m_block i + 1's Sᵀ GEMM queued behind m_block i's dQ GEMM (headdim 128)",
             "beyond the paper (Alg. 2's idea, backward)", None, headdims=(64, 128)),
    StepInfo(15, "15_bwd_gemm_order", "bwd", 13,
             "backward: dQ's GEMM issued before dK's, so dQ_i's store to the writer's tile runs under the dK GEMM "
             "(and dV's under the dSᵀ barrier)",
             "beyond the paper (FA3's code)", None),
    StepInfo(16, "16_bwd_tile_shape", "bwd", 15,
             "backward, headdim 128: m_blocks of 80 queries (less shared-memory traffic per FLOP), dQ swapped "
             "(dQᵀ = Kᵀ·dSᵀ, dS stored by stmatrix .trans)",
             "beyond the paper (FA3's code)", None, headdims=(128,)),
    StepInfo(17, "17_bwd_fused_preprocess", "bwd", 16,
             "backward: the preprocess at bandwidth (16-byte loads of O and dO, kHeadDim/8 threads per row) and "
             "dq_accum zeroed in the same pass instead of a memset",
             "beyond the paper (FA3's code)", None),
    StepInfo(18, "18_bwd_causal_scheduler", "bwd", 17,
             "backward, causal: CTAs launched longest first in L2-sized groups of heads; deterministic: the dQ adds "
             "in reverse n_block order, shortest CTAs first",
             "beyond the paper (FA3's code)", "reference/backward.py::tile_order"),
    StepInfo(19, "19_bwd_tma_store_epilogue", "bwd", 18,
             "backward: dK and dV through shared memory (stmatrix into the free Q/dO ring), written by TMA stores",
             "beyond the paper (FA3's code)", None),
    StepInfo(20, "20_bwd_dq_one_behind", "bwd", 19,
             "backward: m_block i's dQ GEMM in iteration i + 1, so the two consumer warpgroups need not meet every "
             "m_block; they run half an m_block apart and one's exponentials overlap the other's GEMMs",
             "§3.1's pingpong, backward", None),
    StepInfo(21, "21_bwd_gqa_group_in_cta", "bwd", 20,
             "backward, GQA: a CTA walks every query head of its KV head, so dK and dV sum in registers and are "
             "stored once in 16 bits (no fp32 slices per query head, no reduction pass) where that still fills the SMs",
             "beyond the paper", None),
    StepInfo(22, "22_bwd_k_in_registers", "bwd", 21,
             "backward, headdim 64: less shared-memory traffic per m_block — each consumer holds its 64 rows of K_j as "
             "WGMMA A fragments (Sᵀ from registers) and stores dSᵀ with stmatrix",
             "beyond the paper (FA3's code keeps K in shared memory)", None, headdims=(64,)),
    StepInfo(23, "23_bwd_dq_postprocess_tiles", "bwd", 22,
             "backward: the dQ postprocess at memory speed — one CTA per m_block tile, the fp32 fragments put in "
             "(query, headdim) order in shared memory, 16-byte stores of dQ",
             "beyond the paper", "reference/backward.py::postprocess"),
    StepInfo(24, "24_bwd_hd256_dq_writer", "bwd", 23,
             "backward, headdim 256: dQ through the dQ writer's shared-memory tile and one bulk reduction (step 13's "
             "idea) instead of fp32 atomics; the Q/dO ring drops to one stage to make room for the 64 KB tile",
             "beyond the paper (FlashAttention-4's Hopper backward keeps one Q/dO stage at headdim 256)", None,
             headdims=(256,)),
    StepInfo(25, "25_bwd_hd256_split_s", "bwd", 24,
             "backward, headdim 256: each consumer computes half of Sᵀ and dPᵀ (32 of the 64 queries) instead of both "
             "computing all of it; Pᵀ and dSᵀ meet whole in shared memory and come back as A fragments (ldmatrix)",
             "beyond the paper (FlashAttention-4's Hopper backward splits S and dP between its warpgroups)", None,
             headdims=(256,)),
    StepInfo(26, "26_bwd_do_released_early", "bwd", 25,
             "backward: each Q/dO ring stage has two empty barriers — dO_i's half is freed once dV has read it, so "
             "dO_i+2 lands under dK and only Q_i+2 is left on the critical path of consumers half an m_block apart",
             "beyond the paper (FlashAttention-4's Hopper backward has separate Q and dO pipelines)", None,
             headdims=(64, 128)),
    StepInfo(27, "27_bwd_shared_window", "bwd", 26,
             "backward: the dynamic shared memory rounded up as an offset from the __shared__ array, so L_i, D_i and "
             "the dQ tile are LDS/STS instead of generic loads and stores; L_i read under the Sᵀ GEMM",
             "beyond the paper (a compiler matter: the address space of a pointer)", None),
    StepInfo(28, "28_bwd_lse_first", "bwd", 27,
             "backward: L_i's shared-memory loads issued before the Sᵀ and dPᵀ GEMMs, so they do not queue behind "
             "the GEMMs' operand reads (headdim 128 and 256, one head per CTA)",
             "beyond the paper (the order of two instructions in the issue stream)", None, headdims=(128, 256)),
)

CHAPTERS: tuple[Chapter, ...] = (
    Chapter(0, "00_setup_and_roofline", "the machine, rates, arithmetic intensity and roofline"),
    Chapter(1, "01_attention_and_online_softmax", "standard attention, the online softmax and lse"),
    Chapter(2, "02_tiled_flash_attention", "the tiled forward (the loop every kernel step runs)", (1,)),
    Chapter(3, "03_producer_consumer", "warp specialization, the K/V ring, mbarrier phases", (2,)),
    Chapter(4, "04_pingpong_and_overlap", "pingpong and Algorithm 2's GEMM-softmax overlap", (3, 4)),
    Chapter(5, "05_fp8_quantization", "e4m3, block quantization, incoherent processing, Table 3", (5,)),
    Chapter(6, "06_hopper_kernel", "TMA, mbarrier, swizzle, WGMMA; the kernel against its peers", (1, 10)),
    Chapter(7, "07_sass_overlap", "reading the SASS: is the softmax under the GEMM?", (4, 10)),
    Chapter(8, "08_ablation", "what each step buys: Table 2 and the steps beyond the paper",
            (1, 2, 3, 4, 6, 7, 8, 9, 10)),
    Chapter(9, "09_backward", "the backward (App. B.1): recomputation, K/V stationary, dQ accumulated; its speed steps",
            (11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28)),
)

#: The step :func:`fa3_lab.flash_attn_func` runs by default (the last 16-bit forward step), and the FP8 step.
DEFAULT_STEP = 10
FP8_STEP = 5
#: The backward step autograd runs by default (``flash_attn_func(..., bwd_step=None)``).
DEFAULT_BWD_STEP = 27


def step(step_id: int) -> StepInfo:
    """The :class:`StepInfo` of ``step_id``.

    Raises:
        ValueError: no step has that id.
    """
    for s in STEPS:
        if s.id == step_id:
            return s
    raise ValueError(f"step: expected one of {[s.id for s in STEPS]}, got {step_id!r}")


def series(name: str) -> tuple[StepInfo, ...]:
    """The steps of one series (``"fwd"`` or ``"bwd"``), in order."""
    return tuple(s for s in STEPS if s.series == name)
