// ============================================================================================
// fa3-lab — FlashAttention-3 BACKWARD, built up in steps (cuda/steps/bwd/):
//   11_bwd                  preprocess + K/V-stationary main kernel + postprocess, all GEMMs on WGMMA
//   12_bwd_warp_specialized + producer warpgroup, Q/dO ring with full/empty mbarriers, dSᵀ double-buffered
//   13_bwd_dq_writer        + dQ through smem, added by a bulk reduce of a dQ-writer warp
//   14_bwd_pipelined        + m_block i + 1's Sᵀ GEMM queued behind m_block i's dQ GEMM (headdim 128)
//   15_bwd_gemm_order       (from 13) + dQ's GEMM before dK's, dQ_i's store under the dK GEMM
//   16_bwd_tile_shape       + headdim 128: 80-query m_blocks, dQᵀ = Kᵀ·dSᵀ
//   17_bwd_fused_preprocess + D with 16-byte loads, dq_accum zeroed in the same pass
//   18_bwd_causal_scheduler + causal: longest n_blocks first in L2-sized head groups; deterministic: reverse
//   19_bwd_tma_store_epilogue + dK, dV through shared memory, written by TMA stores
//   20_bwd_dq_one_behind    + m_block i's dQ GEMM in iteration i + 1: the consumers run out of step
//   21_bwd_gqa_group_in_cta + GQA: a CTA walks its KV head's query heads, dK and dV summed in registers
//   22_bwd_k_in_registers   + headdim 64: K_j's rows in registers (Sᵀ from registers), dSᵀ stored by stmatrix
//   23_bwd_dq_postprocess_tiles + the dQ postprocess: one CTA per m_block tile through shared memory, 16-byte stores
//   24_bwd_hd256_dq_writer  + headdim 256: dQ added by the dQ writer's bulk reduction (not atomics), one Q/dO stage
//   25_bwd_hd256_split_s    + headdim 256: Sᵀ, dPᵀ split by queries between the consumers, Pᵀ and dSᵀ through smem
//   26_bwd_do_released_early + dO_i's half of the ring freed once dV has read it: dO_i+2 lands under dK
//   27_bwd_shared_window    + L_i, D_i and the dQ tile through a __shared__ pointer (LDS/STS), L_i read under Sᵀ
//   28_bwd_lse_first        + L_i's LDS issued before the Sᵀ, dPᵀ GEMMs, not queued behind their operand reads  <- this file
// (The forward series is cuda/steps/01..10; fa3_lab/registry.py is the one list of ids.)
// ============================================================================================
//
// Step 28 extends 27 by one move. Step 27 reads L_i by LDS ahead of the wait for Sᵀ, but after the Sᵀ and dPᵀ WGMMAs
// are issued, and its own stall sampling (H200, 1da38d2/ncu27_stalls.csv) still has the first FFMA on L_i waiting
// about as long as step 26's generic loads did. A WGMMA with both operands in shared memory reads them through the
// same pipe as LDS, so (inferred, not sampled) the ten LDS.64 queue behind the operand reads of two GEMMs (2 × 36 KB
// per consumer at headdim 128: K's or V's 64 rows and Q_i's or dO_i's 80) and land after Sᵀ itself. Here the loads
// are issued right after the wait for the Q_i stage (L_i lands with Q_i) and before the first WGMMA: they can leave
// the pipe before the operand reads fill it, and the registers they fill are the ones step 27 already held across
// the Sᵀ GEMM (headdim 128 and 256 with one head per CTA: kLFirst, step 27's kLUnderS). The SASS shows it: the
// loop's LDS.64 of L_i sit ahead of its first HGMMA (tests/test_backward_sass.py).
// Predicted: the exponentials start when Sᵀ lands, not when the queued loads do — the 8 % of the consumers' loop
// samples on that FFMA mostly gone: +2–4 % at headdim 128, less at 256 (longer GEMMs hide more of the queue),
// nothing at headdim 64 and in the GQA walk (unchanged code).
// Twin: none — the order of two instructions in the issue stream, not the algorithm (reference/backward.py).
// Tried: nothing else; D_i read early as well would hold 20 more registers across both GEMMs (not compiled).
// Measured: the current recorded run (fa3_lab/results/) has no row for this step; `python -m fa3_lab bench`
//   records one.
// Known limits: an A/B before it was a step (H200, 2026-12-04, a dev build of fc86c39 with this file as step 28,
//   tools/experiments/results/nvidia-h200/fc86c39-lse-first/): ÷ step 27, backward alone, headdim 128 non-causal
//   1.011–1.045 (bf16 + fp16, 2k–16k, 5 rounds; 1.021–1.035 bf16 in a 3-round run), causal 0.996–1.018 (both runs),
//   headdim 256 0.992–1.022 (3 rounds); bitwise equal to step 27 with deterministic=True (12 of 12 cases). Why
//   causal gains nothing is not settled (its masked m_blocks run the same loads; not traced).
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "fa3/bwd.h"
#include "fa3/bwd_passes.h"  // preprocess_kernel, tile_of, dq_turn, postprocess_dkv_kernel, grid_stride_blocks
#include "fa3/epilogue.h"
#include "fa3/host.h"
#include "fa3/launch.h"  // sm_count
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/trace.h"  // FA3_TRACE builds: tools/experiments/bwd_trace.py
#include "fa3/wgmma.h"

namespace fa3 {
namespace step28 {

constexpr int kThreadsPerWarpgroup = 128;
constexpr int kRowsPerWarpgroup = 64;  // M of every WGMMA
constexpr int kBarSkew = 1;                      // once: consumer 1 starts after consumer 0's first exponentials
constexpr int kBarDqEmpty = 3, kBarDqFull = 8;   // + cwg: a consumer's half of the dQ tile (2: atomics' turn)
constexpr int kBarRingDone = 5;                  // both consumers are past their last GEMM: the ring is free
constexpr int kBarEpi = 6;                       // + cwg: this warpgroup's dK/dV tiles are in shared memory

constexpr int block_n_of(int headdim) { return headdim == 256 ? 64 : 128; }  // Config::kBlockN (the host needs it too)

template <typename T, int kHeadDim>
struct Config {
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : kHeadDim == 128 ? 80 : 64;  // queries per m_block (Q_i, dO_i rows)
  static constexpr int kBlockN = block_n_of(kHeadDim);         // keys per CTA (K_j, V_j rows)
  static constexpr int kNumWarpgroups = 2;                          // consumers (+ 1 producer warpgroup)
  static constexpr int kConsumerThreads = kThreadsPerWarpgroup * kNumWarpgroups;
  static constexpr int kThreads = kConsumerThreads + kThreadsPerWarpgroup;
  static constexpr int kProducerRegs = 24;   // 24·128 + 240·256 = 64512 ≤ 65536 registers per SM
  static constexpr int kConsumerRegs = 240;
  static constexpr int kKeyGroups = kBlockN / kRowsPerWarpgroup;    // warpgroups along the keys
  static constexpr int kColSplit = kNumWarpgroups / kKeyGroups;     // ... along dK, dV's columns
  static constexpr int kDKVCols = kHeadDim / kColSplit;             // N of the dV, dK GEMMs
  static constexpr int kDqRowSplit = kBlockM / kRowsPerWarpgroup;   // warpgroups along dQ's rows
  static constexpr int kDqColSplit = kNumWarpgroups / kDqRowSplit;  // ... along dQ's columns
  static constexpr int kDqCols = kHeadDim / kDqColSplit;            // N of the dQ GEMM (swapped: its M)
  static constexpr bool kDqSwapped = kBlockM % kRowsPerWarpgroup != 0;  // dQᵀ = Kᵀ·dSᵀ (see the header)
  static constexpr int kDqFrag = kDqSwapped ? kBlockM / 2 : kDqCols / 2;  // dQ accumulators per thread
  static constexpr int kStages = kHeadDim == 256 ? 1 : 2;  // headdim 256: one Q/dO stage makes room for the dQ tile
  static constexpr bool kKInRegs = kHeadDim == 64;  // Sᵀ = K_j·Q_iᵀ with K_j's A fragments in registers (see the header)
  static constexpr bool kSplitS = kHeadDim == 256;  // Sᵀ, dPᵀ split by queries; Pᵀ, dSᵀ whole through smem (header)
  static constexpr int kSCols = kSplitS ? kBlockM / kNumWarpgroups : kBlockM;  // N of a consumer's Sᵀ and dPᵀ
  static constexpr int kAtoms = kHeadDim / kAtomCols16;
  static constexpr int kQBytes = kBlockM * kHeadDim * sizeof(T);   // one Q_i (or dO_i) tile
  static constexpr int kKVBytes = kBlockN * kHeadDim * sizeof(T);  // K_j (or V_j)
  static constexpr int kDSBytes = kBlockN * kBlockM * sizeof(T);   // dSᵀ
  static constexpr int kRowBytes = kBlockM * sizeof(float);        // L_i (or D_i)
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKVBytes;
  static constexpr int kOffQ = kOffV + kKVBytes;
  static constexpr int kOffDO = kOffQ + kStages * kQBytes;
  static constexpr int kOffDS = kOffDO + kStages * kQBytes;
  static constexpr int kOffP = kOffDS + 2 * kDSBytes;  // (2, kBlockN keys, kBlockM queries) Pᵀ, split S only
  static constexpr int kOffLse = kOffP + (kSplitS ? 2 * kDSBytes : 0);
  static constexpr int kOffD = kOffLse + kStages * kRowBytes;
  static constexpr bool kDqUnderDk = kHeadDim <= 128;  // else 13's order: at headdim 256 this one's leaves ptxas
                                                       // too few registers and it serializes every WGMMA (C7512)
  static constexpr int kDqLag = kDqUnderDk ? 1 : 0;    // m_block i's dQ GEMM runs in iteration i + kDqLag
  static constexpr int kDqBytes = kBlockM * kHeadDim * sizeof(float);  // the fp32 dQ_i(partial) tile
  static constexpr int kDKVTileBytes = kRowsPerWarpgroup * kDKVCols * sizeof(T);  // one warpgroup's dK (or dV)
  static constexpr int kOffDKV = kOffQ;  // the epilogue's dK, dV tiles: (consumer, dK|dV) in the Q/dO ring
  static constexpr int kOffDQ = kOffD + kStages * kRowBytes;
  static constexpr int kOffBar = kOffDQ + kDqBytes;
  static constexpr int kSmemBytes = 1024 /*alignment slack*/ + kOffBar + 8 * (1 + 3 * kStages + 4);
  static_assert(kSmemBytes <= 227 * 1024, "smem");
  static_assert(kOffDQ % 16 == 0 && kDqBytes % 16 == 0, "bulk reduce: 16-byte aligned");
  static_assert(kNumWarpgroups * 2 * kDKVTileBytes <= 2 * kStages * kQBytes && kOffDKV % 1024 == 0,
                "dK, dV tiles fit the Q/dO ring, on swizzle-atom boundaries");
  static_assert(kDKVCols % kAtomCols16 == 0 && kDqCols % kAtomCols16 == 0, "column splits on atom boundaries");
};

// ---------------------------------------------------------------- main kernel
// kGroup: a CTA walks heads_per_cta > 1 query heads (run() picks the variant); without it, step 20's loop exactly.
template <typename T, int kHeadDim, bool kCausal, bool kGroup>
__global__ void __launch_bounds__(Config<T, kHeadDim>::kThreads, 1)
    bwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_v, const __grid_constant__ CUtensorMap tmap_do,
               const __grid_constant__ CUtensorMap tmap_dk, const __grid_constant__ CUtensorMap tmap_dv,
               const BwdParams p, const int heads_per_group, const int heads_per_cta) {
  using Cfg = Config<T, kHeadDim>;
  using Traits = ElemTraits<T>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kAtomBytesQ = kBlockM * kSwizzleBytes;   // one 64-column atom of a Q_i / dO_i tile
  constexpr int kAtomBytesKV = kBlockN * kSwizzleBytes;  // ... of K_j / V_j, and of the dSᵀ tile
  // L_i read before the Sᵀ GEMM is issued: its kSCols / 4 registers fit beside step 26's at headdim 128 and 256
  // without the group walk (headdim 64 holds K_j's A fragments, the walk its (head, m_block) arithmetic: ptxas spills)
  constexpr bool kLFirst = !Cfg::kKInRegs && !kGroup;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sK = reinterpret_cast<T*>(smem + Cfg::kOffK);           // (kBlockN, kHeadDim) smem, 128B swizzle, kAtoms atoms
  T* sV = reinterpret_cast<T*>(smem + Cfg::kOffV);           // (kBlockN, kHeadDim), same layout
  T* sQ = reinterpret_cast<T*>(smem + Cfg::kOffQ);           // (kStages, kBlockM, kHeadDim), same layout
  T* sdO = reinterpret_cast<T*>(smem + Cfg::kOffDO);         // (kStages, kBlockM, kHeadDim)
  const uint32_t sdS_addr = smem_u32(smem + Cfg::kOffDS);    // (2, kBlockN keys, kBlockM queries) dSᵀ, 16-bit, swizzled
  const uint32_t sP_addr = smem_u32(smem + Cfg::kOffP);      // (2, kBlockN, kBlockM) Pᵀ, same (split S only)
  float* sLse = reinterpret_cast<float*>(smem + Cfg::kOffLse);  // (kStages, kBlockM) L_i·log2 e
  float* sD = reinterpret_cast<float*>(smem + Cfg::kOffD);      // (kStages, kBlockM) D_i
  uint64_t* bar_kv = reinterpret_cast<uint64_t*>(smem + Cfg::kOffBar);  // "K_j, V_j have landed"
  uint64_t* bar_q = bar_kv + 1;           // (kStages) full: "Q_i, dO_i, L_i, D_i have landed"
  uint64_t* bar_q_empty = bar_q + kStages;  // (kStages) empty: "both consumers are done with Q_i and L_i" (256: all)
  uint64_t* bar_do_empty = bar_q_empty + kStages;  // (kStages) ... "with dO_i and D_i" (headdim ≤ 128; 256: unused)
  uint64_t* bar_ds_full = bar_do_empty + kStages;  // (2) "both consumers' dSᵀ rows of the buffer are in smem"
  uint64_t* bar_ds_empty = bar_ds_full + 2;       // (2) "both consumers' dQ GEMMs have read the buffer"

  const int num_n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const Tile tile = tile_of<kCausal>(blockIdx.x, p, num_n_blocks, heads_per_group, kGroup ? heads_per_cta : 1);
  const int n_block = tile.n_block, h0 = tile.h, b = tile.b;
  const int h_kv = h0 / (p.nheads / p.nheads_kv);  // GQA/MQA by index arithmetic
  const int wg = warpgroup_id();
  const int cwg = wg - 1;                          // consumer index (warpgroup 0 is the producer)
  const int key_group = cwg % Cfg::kKeyGroups;   // this consumer's dK, dV (col_part: a constant where it is 0, a
  const int col_part = Cfg::kColSplit == 1 ? 0 : cwg / Cfg::kKeyGroups;  // register fewer at headdim 128)
  const int dq_row_part = cwg % Cfg::kDqRowSplit, dq_col_part = cwg / Cfg::kDqRowSplit;  // ... and dQ slice
  const int causal_offset = p.seqlen_k - p.seqlen_q;

  // The Q tiles that see any key of this K/V tile (reference.backward.m_block_range); computed after setmaxnreg
  // (a value live across it is spilled).
  auto first_m_block = [&](int num_m_blocks) {
    return kCausal ? min(max(0, n_block * kBlockN - causal_offset) / kBlockM, num_m_blocks) : 0;
  };
  // (head, m_block) pair i of this CTA's loop: head-major, each head's m_blocks from first_m_block on
  auto row_base = [&](int h) { return (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q_rounded; };  // lse_log2, dpsum, dq_accum

  if (threadIdx.x == 0) {
    mbarrier_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s)
      mbarrier_init(&bar_q[s], 1), mbarrier_init(&bar_q_empty[s], Cfg::kConsumerThreads),
          mbarrier_init(&bar_do_empty[s], Cfg::kConsumerThreads);
    for (int s = 0; s < 2; ++s) mbarrier_init(&bar_ds_full[s], Cfg::kConsumerThreads), mbarrier_init(&bar_ds_empty[s], Cfg::kConsumerThreads);
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer warpgroup
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
    const int m_block_min = first_m_block(num_m_blocks), num_iters = num_m_blocks - m_block_min;
    const int total = kGroup ? heads_per_cta * num_iters : num_iters;
    if (threadIdx.x / 32 == 1) {  // warp 1: the dQ writer (at every headdim from step 24)
      if (num_iters > 0) {
        const float* sdq = reinterpret_cast<const float*>(smem + Cfg::kOffDQ);
        FA3_TRACE_DECL(tr);
        FA3_TRACE_INIT(tr, p, 1, threadIdx.x % 32 == 0);
        constexpr int kHalf = Cfg::kDqBytes / 2 / sizeof(float);  // a consumer's part, contiguous (as in dq_accum)
        named_barrier_arrive(kBarDqEmpty, kThreadsPerWarpgroup + 32);  // the tile starts empty
        named_barrier_arrive(kBarDqEmpty + 1, kThreadsPerWarpgroup + 32);
        for (int i = 0; i < 2 * total; ++i) {  // consumer 0's half of pair i / 2, then 1's: neither waits
          const int h = h0 + (kGroup ? i / 2 / num_iters : 0), w = i % 2;
          const int m_block = m_block_min + (kGroup ? i / 2 % num_iters : i / 2);
          named_barrier_sync(kBarDqFull + w, kThreadsPerWarpgroup + 32);
          if (w == 0) { FA3_TRACE_STAMP(tr, kBwdDqFull, m_block); }
          if (threadIdx.x % 32 == 0) {
            int* sem = p.dq_semaphore + (static_cast<int64_t>(b) * p.nheads + h) * num_m_blocks + m_block;
            if (p.deterministic && w == 0)  // n_blocks add in turn (dq_turn)
              while (ld_acquire_gpu(sem) != dq_turn<kCausal, kBlockM, kBlockN>(n_block, m_block, num_n_blocks,
                                                                                causal_offset)) {
              }
            bulk_reduce_add_f32(p.dq_accum + (row_base(h) + m_block * kBlockM) * kHeadDim + w * kHalf, sdq + w * kHalf,
                                Cfg::kDqBytes / 2);
            bulk_commit();
            if (p.deterministic && w == 1) {
              bulk_wait<0>();  // the adds are done: pass the turn
              fence_proxy_async_global();
              __threadfence();
              atomicAdd(sem, 1);
            } else {
              bulk_wait_read<0>();
            }
            if (w == 1) { FA3_TRACE_STAMP(tr, kBwdDqAdded, m_block); }
          }
          __syncwarp();
          if (i + 2 < 2 * total) named_barrier_arrive(kBarDqEmpty + w, kThreadsPerWarpgroup + 32);
        }
        if (threadIdx.x % 32 == 0) bulk_wait<0>();
        FA3_TRACE_FINISH(tr);
        return;
      }
    }
    if (threadIdx.x / 32 != 0 || !elect_one() || num_iters == 0) return;
    FA3_TRACE_DECL(tr);
    FA3_TRACE_INIT(tr, p, 0, true);
    // 0. K_j, V_j once
    mbarrier_arrive_expect_tx(bar_kv, 2 * Cfg::kKVBytes);
#pragma unroll
    for (int a = 0; a < Cfg::kAtoms; ++a) {
      tma_load_4d(reinterpret_cast<uint8_t*>(sK) + a * kAtomBytesKV, &tmap_k, bar_kv, a * kAtomCols16,
                  n_block * kBlockN, h_kv, b);
      tma_load_4d(reinterpret_cast<uint8_t*>(sV) + a * kAtomBytesKV, &tmap_v, bar_kv, a * kAtomCols16,
                  n_block * kBlockN, h_kv, b);
    }
    FA3_TRACE_STAMP(tr, kBwdIssueKV, 0);
    // Q_i, dO_i, L_i, D_i of every m_block into the ring, up to kStages ahead of the consumers
#pragma unroll (kStages == 1 ? 1 : 0)  // one stage: unrolled (by 4) it spills the producer's 24 registers; 0: ignored
    for (int i = 0; i < total; ++i) {
      const int stage = i % kStages, h = h0 + (kGroup ? i / num_iters : 0);
      const int m_block = m_block_min + (kGroup ? i % num_iters : i);
      // headdim ≤ 128 (consumers half an m_block apart): dO_i and D_i first, as soon as both consumers' dV GEMMs of
      // m_block i − kStages are done, then Q_i and L_i once their dK GEMMs are (one full barrier for the four: the
      // consumer needs Q_i first anyway). Headdim 256 (one stage, no lag) frees the stage at one point: step 25's loads
      constexpr bool kDoFirst = Cfg::kDqLag == 1;
      const uint32_t reuse_phase = ((i / kStages) - 1) & 1;  // the stage's previous use
      if (i >= kStages) mbarrier_wait(kDoFirst ? &bar_do_empty[stage] : &bar_q_empty[stage], reuse_phase);
      mbarrier_arrive_expect_tx(&bar_q[stage], 2 * Cfg::kQBytes + 2 * Cfg::kRowBytes);
      if constexpr (kDoFirst) {
#pragma unroll
        for (int a = 0; a < Cfg::kAtoms; ++a)
          tma_load_4d(reinterpret_cast<uint8_t*>(sdO) + stage * Cfg::kQBytes + a * kAtomBytesQ, &tmap_do, &bar_q[stage],
                      a * kAtomCols16, m_block * kBlockM, h, b);
        bulk_load_1d(sD + stage * kBlockM, p.dpsum + row_base(h) + m_block * kBlockM, Cfg::kRowBytes, &bar_q[stage]);
        if (i >= kStages) mbarrier_wait(&bar_q_empty[stage], reuse_phase);
      }
#pragma unroll
      for (int a = 0; a < Cfg::kAtoms; ++a) {
        tma_load_4d(reinterpret_cast<uint8_t*>(sQ) + stage * Cfg::kQBytes + a * kAtomBytesQ, &tmap_q, &bar_q[stage],
                    a * kAtomCols16, m_block * kBlockM, h, b);
        if constexpr (!kDoFirst)
          tma_load_4d(reinterpret_cast<uint8_t*>(sdO) + stage * Cfg::kQBytes + a * kAtomBytesQ, &tmap_do, &bar_q[stage],
                      a * kAtomCols16, m_block * kBlockM, h, b);
      }
      bulk_load_1d(sLse + stage * kBlockM, p.lse_log2 + row_base(h) + m_block * kBlockM, Cfg::kRowBytes, &bar_q[stage]);
      if constexpr (!kDoFirst)
        bulk_load_1d(sD + stage * kBlockM, p.dpsum + row_base(h) + m_block * kBlockM, Cfg::kRowBytes, &bar_q[stage]);
      FA3_TRACE_STAMP(tr, kBwdIssueQ, m_block);
    }
    FA3_TRACE_FINISH(tr);
    return;
  }
  // -------------------------------------------------------------------- consumer warpgroups
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  // The consumers' own reads and writes (L_i, D_i; the dQ tile) through pointers the compiler knows are shared: the
  // same bytes as an offset from the __shared__ array, so LDS/STS and not generic LD/ST (the header)
  uint8_t* const smem_sh = smem_raw + (smem - smem_raw);
  const float* sLse_sh = reinterpret_cast<const float*>(smem_sh + Cfg::kOffLse);  // sLse, sD
  const float* sD_sh = reinterpret_cast<const float*>(smem_sh + Cfg::kOffD);
  FA3_TRACE_DECL(tr);
  FA3_TRACE_INIT(tr, p, 2 + cwg, threadIdx.x % kThreadsPerWarpgroup == 0);
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int m_block_min = first_m_block(num_m_blocks), num_iters = num_m_blocks - m_block_min;
  const int total = kGroup ? heads_per_cta * num_iters : num_iters;  // dK, dV sum over the CTA's heads in registers
  float dv[Cfg::kDKVCols / 2];  // (64 keys, kDKVCols) fp32 accumulator fragment, registers
  float dk[Cfg::kDKVCols / 2];
#pragma unroll
  for (int e = 0; e < Cfg::kDKVCols / 2; ++e) dv[e] = dk[e] = 0.f;

  const uint32_t sK_addr = smem_u32(sK), sV_addr = smem_u32(sV);
  const int lane = threadIdx.x % 32;
  const int key0 = n_block * kBlockN + key_group * kRowsPerWarpgroup;  // this warpgroup's first key
  if (num_iters > 0) mbarrier_wait(bar_kv, 0);
  FA3_TRACE_STAMP(tr, kBwdKVReady, 0);
  uint32_t ka[Cfg::kKInRegs ? kHeadDim / 16 : 1][4];  // this warpgroup's 64 rows of K_j, A fragments (headdim 64)
  if constexpr (Cfg::kKInRegs) load_a_frag<kBlockN, kHeadDim>(ka, sK_addr, key_group * kRowsPerWarpgroup);

  // 6. dQ_j(partial) = dS·K_j of m_block m_block_min + j over both consumers' dSᵀ rows (buffer j % 2): rows
  //    64·dq_row_part.., columns kDqCols·dq_col_part.., K = kBlockN keys; swapped, dQᵀ: rows = headdim
  //    kDqCols·dq_col_part.., columns = the kBlockM queries
  //    (j = −1: a GEMM whose result is dropped — an issue under a branch serializes every WGMMA, ptxas C7514)
  auto issue_dq = [&](float (&dq)[Cfg::kDqFrag], int j) {
    const uint32_t sdS_j = sdS_addr + (j & 1) * Cfg::kDSBytes;
    if (j >= 0) mbarrier_wait(&bar_ds_full[j & 1], (j >> 1) & 1);  // the other consumer's rows are in too
    wgmma_fence();
    if constexpr (Cfg::kDqSwapped)
      gemm_ss_ta<T, kBlockM, kBlockN, kBlockN, kBlockM>(dq, sK_addr + dq_col_part * kAtomBytesKV, sdS_j);
    else
      gemm_ss_tt<T, Cfg::kDqCols, kBlockN, kBlockN, kBlockN>(
          dq, sdS_j + dq_row_part * kAtomBytesKV, sK_addr + dq_col_part * (Cfg::kDqCols / kAtomCols16) * kAtomBytesKV);
    wgmma_commit();
  };
  // 7. dQ_j(partial) → this consumer's half of the smem tile, once the writer has read its last one; the writer adds
  //    it to dq_accum
  auto store_dq = [&](const float (&dq)[Cfg::kDqFrag]) {
    float4* sdq = reinterpret_cast<float4*>(smem_sh + Cfg::kOffDQ) + cwg * (Cfg::kDqFrag / 4) * kThreadsPerWarpgroup;
    named_barrier_sync(kBarDqEmpty + cwg, kThreadsPerWarpgroup + 32);
#pragma unroll
    for (int j = 0; j < Cfg::kDqFrag / 4; ++j)
      sdq[j * kThreadsPerWarpgroup + threadIdx.x % kThreadsPerWarpgroup] =
          make_float4(dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3]);
    fence_proxy_async();  // the generic-proxy stores before the bulk reduce (async proxy) reads them
    named_barrier_arrive(kBarDqFull + cwg, kThreadsPerWarpgroup + 32);
  };

  for (int i = 0; i < total; ++i) {
    const int m_block = m_block_min + (kGroup ? i % num_iters : i);
    const int stage = i % kStages;
    const uint32_t phase = (i / kStages) & 1;
    const uint32_t sQ_addr = smem_u32(sQ) + stage * Cfg::kQBytes;
    const uint32_t sdO_addr = smem_u32(sdO) + stage * Cfg::kQBytes;
    const uint32_t sdS_i = sdS_addr + (i % 2) * Cfg::kDSBytes;  // dSᵀ double-buffered: one barrier per m_block
    const uint32_t sP_i = sP_addr + (i % 2) * Cfg::kDSBytes;    // Pᵀ likewise (split S)
    const int qcol0 = Cfg::kSplitS ? cwg * Cfg::kSCols : 0;      // this consumer's first query of Sᵀ and dPᵀ

    // 1. Sᵀ = K_j·Q_iᵀ and dPᵀ = V_j·dO_iᵀ, rows = this warpgroup's 64 keys, columns = kSCols queries from qcol0
    float s[Cfg::kSCols / 2];   // (64 keys, kSCols queries) fp32 accumulator fragment
    float dp[Cfg::kSCols / 2];  // same
    if (Cfg::kDqLag == 1 && i == 0 && cwg == 1) named_barrier_sync(kBarSkew, Cfg::kConsumerThreads);  // see 3
    mbarrier_wait(&bar_q[stage], phase);
    FA3_TRACE_STAMP(tr, kBwdIterBegin, m_block);
    // L_i of this thread's columns (a short LDS each): before the GEMMs' operand reads fill the shared-memory pipe
    const float* lse_s = sLse_sh + stage * kBlockM + qcol0;
    float2 l2[Cfg::kSCols / 8];
    auto read_l = [&] {
#pragma unroll
      for (int c = 0; c < Cfg::kSCols / 8; ++c) l2[c] = *reinterpret_cast<const float2*>(lse_s + 8 * c + 2 * (lane % 4));
    };
    if constexpr (kLFirst) read_l();
    wgmma_fence();
    if constexpr (Cfg::kKInRegs)
      gemm_rs_kmajor<T, kBlockM, kHeadDim, kBlockM>(s, ka, sQ_addr);
    else
      gemm_ss<T, Cfg::kSCols, kHeadDim, kBlockN, kBlockM>(s, sK_addr, key_group * kRowsPerWarpgroup,
                                                          sQ_addr + qcol0 * kSwizzleBytes, false);
    wgmma_commit();
    gemm_ss<T, Cfg::kSCols, kHeadDim, kBlockN, kBlockM>(dp, sV_addr, key_group * kRowsPerWarpgroup,
                                                        sdO_addr + qcol0 * kSwizzleBytes, false);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(s);
    if constexpr (!kLFirst) read_l();

    // 2. mask: keys past seqlen_k; causal: key > query + seqlen_k − seqlen_q
    const int q0 = m_block * kBlockM;
    const bool crosses_end = key0 + kRowsPerWarpgroup > p.seqlen_k;
    const bool crosses_diag = kCausal && key0 + kRowsPerWarpgroup - 1 > q0 + causal_offset;
    if (crosses_end || crosses_diag) {
#pragma unroll
      for (int e = 0; e < Cfg::kSCols / 2; ++e) {
        const int key = key0 + frag_row(e), query = q0 + qcol0 + frag_col(e);
        bool masked = key >= p.seqlen_k;
        if constexpr (kCausal) masked |= key > query + causal_offset;
        if (masked) s[e] = kNegInf;
      }
    }

    // 3. Pᵀ = exp2(Sᵀ·scale_log2 − L·log2 e), L per column (query); padding rows have L = +inf → 0
    const float* d_s = sD_sh + stage * kBlockM + qcol0;
#pragma unroll
    for (int c = 0; c < Cfg::kSCols / 8; ++c) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[4 * c + j] = fast_exp2(fmaf(s[4 * c + j], p.scale_log2, -((j & 1) ? l2[c].y : l2[c].x)));
    }
    // consumer 1 starts here, half an m_block behind consumer 0: from now on one's exponentials run under the
    // other's GEMMs (nothing makes them wait for each other within an m_block any more: dQ is one m_block behind)
    if (Cfg::kDqLag == 1 && i == 0 && cwg == 0) named_barrier_arrive(kBarSkew, Cfg::kConsumerThreads);

    // 4. dSᵀ = Pᵀ ∘ (dPᵀ − D), D per column
    wgmma_wait<0>();
    fence_regs(dp);
#pragma unroll
    for (int c = 0; c < Cfg::kSCols / 8; ++c) {
      const float2 d2 = *reinterpret_cast<const float2*>(d_s + 8 * c + 2 * (lane % 4));
#pragma unroll
      for (int j = 0; j < 4; ++j) dp[4 * c + j] = s[4 * c + j] * (dp[4 * c + j] - ((j & 1) ? d2.y : d2.x));
    }

    // 5. dSᵀ → smem buffer i % 2, once both consumers' dQ GEMMs of m_block i − 2 have read it (split S: each
    //    consumer its columns of dSᵀ and of Pᵀ, then both tiles whole back as A fragments), then dV_j += Pᵀ·dO_i
    //    (this warpgroup's kDKVCols columns); the store first: under dV (19's order) one register spills at
    //    headdim 128, causal
    uint32_t pa[kBlockM / 16][4];   // Pᵀ, 16-bit A fragments (64 keys × kBlockM queries)
    uint32_t dsa[kBlockM / 16][4];  // dSᵀ, same
    auto& pa_own = *reinterpret_cast<uint32_t(*)[Cfg::kSCols / 16][4]>(pa);  // the first kSCols queries' (all but
    auto& dsa_own = *reinterpret_cast<uint32_t(*)[Cfg::kSCols / 16][4]>(dsa);  // with split S)
    pack_p<Traits, Cfg::kSCols>(s, pa_own);
    pack_p<Traits, Cfg::kSCols>(dp, dsa_own);
    if (i >= 2 - Cfg::kDqLag)  // with the lag, buffer 1 is also read at i = 0 (see 6)
      mbarrier_wait(&bar_ds_empty[i % 2], (i / 2 - 1 + Cfg::kDqLag * (i % 2)) & 1);
    if (col_part == 0 || Cfg::kSplitS) {
      if constexpr (Cfg::kDqSwapped)  // as dS: (kBlockM queries × kBlockN keys), keys contiguous
        store_frag_transposed<kBlockM, kBlockM>(dsa, sdS_i, key_group * kRowsPerWarpgroup);
      else
        store_frag_stmatrix<kBlockN, Cfg::kSCols>(dsa_own, sdS_i, key_group * kRowsPerWarpgroup, qcol0);
    }
    if constexpr (Cfg::kSplitS) store_frag_stmatrix<kBlockN, Cfg::kSCols>(pa_own, sP_i, 0, qcol0);
    fence_proxy_async();  // the generic-proxy stores before the WGMMA (async proxy) reads of the dQ GEMM
    mbarrier_arrive(&bar_ds_full[i % 2]);
    if constexpr (Cfg::kSplitS) {  // the other consumer's columns are in too
      mbarrier_wait(&bar_ds_full[i % 2], (i >> 1) & 1);
      load_a_frag<kBlockN, kBlockM>(pa, sP_i, 0);
      load_a_frag<kBlockN, kBlockM>(dsa, sdS_i, 0);
    }
    wgmma_fence();
    gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dv, pa, sdO_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
    if constexpr (!Cfg::kDqUnderDk)
      gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dk, dsa, sQ_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
    wgmma_commit();

    // 6. dQ_i(partial) = dS·K_j: rows 64·dq_row_part.., columns kDqCols·dq_col_part.., K = kBlockN keys; then
    //    dK_j += dSᵀ·Q_i behind it. Each wait_group 1 waits for the GEMM before the one just issued.
    // (64 queries, kDqCols) fp32 accumulator fragment; swapped, (64 headdim, kBlockM) in Sᵀ's 40 registers, free
    // once Pᵀ is packed: a fresh block beside dV's in-flight pa and dsa leaves ptxas too few contiguous registers,
    // and it serializes every WGMMA of the kernel (ptxas C7512). The first k-slice ignores the old values.
    // Headdim ≤ 128: the dQ GEMM here is m_block i − 1's (i's comes in the next iteration, the last one's after the loop).
    float dq_own[Cfg::kDqSwapped ? 1 : Cfg::kDqFrag];
    float(&dq)[Cfg::kDqFrag] = *reinterpret_cast<float(*)[Cfg::kDqFrag]>(Cfg::kDqSwapped ? s : dq_own);
    if constexpr (Cfg::kDqLag == 1) {
      issue_dq(dq, i - 1);
      gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dk, dsa, sQ_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
      wgmma_commit();
      wgmma_wait<1>();  // dV and dQ are done; dK runs under 7
      mbarrier_arrive(&bar_do_empty[stage]);  // dO_i (dV's B) and D_i (read in 4) for the last time: dO_i+2 may land
      fence_regs(dv);
      fence_regs_u32(pa);
      fence_regs(dq);
      mbarrier_arrive(&bar_ds_empty[(i - 1) & 1]);
      if (i > 0) store_dq(dq);  // 7
    } else {
      wgmma_wait<0>();
      fence_regs(dv);
      fence_regs(dk);
      fence_regs_u32(pa);
      fence_regs_u32(dsa);
      mbarrier_arrive(&bar_q_empty[stage]);  // Q_i, dO_i read for the last time: Q_i+1 lands under the dQ GEMM
      issue_dq(dq, i);
      wgmma_wait<0>();
      fence_regs(dq);
      mbarrier_arrive(&bar_ds_empty[i % 2]);
      store_dq(dq);  // 7
    }

    // 8. this warp is done with stage `stage` once dK (the last reader of Q_i) is (headdim 256: in 6)
    if constexpr (Cfg::kDqLag == 1) {
      wgmma_wait<0>();
      fence_regs(dk);
      fence_regs_u32(dsa);
      mbarrier_arrive(&bar_q_empty[stage]);  // every consumer thread: its own L_i reads (ld.shared) are released
    }
    FA3_TRACE_STAMP(tr, kBwdIterEnd, m_block);
  }
  if constexpr (Cfg::kDqLag == 1) {  // 9. the last m_block's dQ
    if (num_iters > 0) {
      float dq[Cfg::kDqFrag];
      issue_dq(dq, total - 1);
      wgmma_wait<0>();
      fence_regs(dq);
      store_dq(dq);
    }
  }

  // 10. epilogue: dK·α and dV of this warpgroup's (64 keys, kDKVCols) → global (keys < seqlen_k)
  const bool slices = !kGroup && p.nheads != p.nheads_kv;  // GQA, one query head per CTA: summed afterwards
  if (!slices) {  // 16 bits through shared memory, one TMA store per 64-column atom
    named_barrier_sync(kBarRingDone, Cfg::kConsumerThreads);
    T* s_dk = reinterpret_cast<T*>(smem + Cfg::kOffDKV + 2 * cwg * Cfg::kDKVTileBytes);
    T* s_dv = reinterpret_cast<T*>(smem + Cfg::kOffDKV + (2 * cwg + 1) * Cfg::kDKVTileBytes);
    const float scale_dk[2] = {p.softmax_scale, p.softmax_scale}, one[2] = {1.f, 1.f};
    write_o_smem<Traits, Cfg::kDKVCols>(dk, scale_dk, smem_u32(s_dk));
    write_o_smem<Traits, Cfg::kDKVCols>(dv, one, smem_u32(s_dv));
    fence_proxy_async();  // the stmatrix writes before the TMA store (async proxy) reads them
    named_barrier_sync(kBarEpi + cwg, kThreadsPerWarpgroup);
    if (threadIdx.x % kThreadsPerWarpgroup == 0) {
#pragma unroll
      for (int a = 0; a < Cfg::kDKVCols / kAtomCols16; ++a) {
        const int col = col_part * Cfg::kDKVCols + a * kAtomCols16, atom = a * kRowsPerWarpgroup * kAtomCols16;
        tma_store_4d(&tmap_dk, s_dk + atom, col, key0, h_kv, b);
        tma_store_4d(&tmap_dv, s_dv + atom, col, key0, h_kv, b);
      }
      bulk_commit();
      bulk_wait_read<0>();  // the shared memory stays until the stores have read it
    }
  } else {  // (batch, seqlen_k, nheads, headdim) fp32, one slice per query head
#pragma unroll
    for (int e = 0; e < Cfg::kDKVCols / 2; e += 2) {
      const int key = key0 + frag_row(e), col = col_part * Cfg::kDKVCols + frag_col(e);
      if (key >= p.seqlen_k) continue;
      const int64_t idx = ((static_cast<int64_t>(b) * p.seqlen_k + key) * p.nheads + h0) * kHeadDim + col;
      *reinterpret_cast<float2*>(p.dk_accum + idx) = make_float2(dk[e] * p.softmax_scale, dk[e + 1] * p.softmax_scale);
      *reinterpret_cast<float2*>(p.dv_accum + idx) = make_float2(dv[e], dv[e + 1]);
    }
  }
  FA3_TRACE_STAMP(tr, kBwdEpilogueEnd, 0);
  FA3_TRACE_FINISH(tr);
}

// ---------------------------------------------------------------- postprocess
// dQ = dq_accum·α → input dtype, (batch, seqlen_q, nheads, headdim) contiguous; one CTA per (b, h, m_block) tile.
// At headdim ≤ 128, float4 number 128·(kDqFrag/4)·cwg + 128·j + t of a tile is consumer cwg's thread t's dQ
// elements 4j..4j+3 (the store of 7): fragment rows fr and fr + 8, columns fc, fc + 1 (frag_row/frag_col) —
// queries × headdim, or headdim × queries where dQ is swapped (headdim 128); at headdim 256 (atomics) dq_accum is
// row-major. The tile goes through shared memory as (query, headdim), rows padded by kPad floats: a warp's stores
// land in distinct banks (non-swapped: 8 consecutive floats of rows fr..fr+3 per half-warp, a row 72 floats apart;
// swapped: queries 2·(t%4) apart, a row 132 floats apart).
template <typename T, int kHeadDim>
struct PostCfg {
  using Cfg = Config<T, kHeadDim>;
  static constexpr int kPad = Cfg::kDqSwapped ? 4 : 8;
  static constexpr int kLd = kHeadDim + kPad;                              // floats per smem row
  static constexpr int kSmemBytes = Cfg::kBlockM * kLd * 4;  // dynamic: 66 KB at headdim 256
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) postprocess_dq_kernel(const BwdParams p) {
  using Cfg = Config<T, kHeadDim>;
  using PC = PostCfg<T, kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kTile4 = kBlockM * kHeadDim / 4;  // float4 per tile
  constexpr int kChunks = kBlockM * kHeadDim / 8;                         // 16-byte output chunks per tile
  constexpr int kThreads = 256;                                            // the launch's block size
  static_assert(kTile4 % kThreads == 0, "whole float4 loads per thread");
  const int tiles_per_head = p.seqlen_q_rounded / kBlockM;
  const int m_block = blockIdx.x % tiles_per_head, bh = blockIdx.x / tiles_per_head;
  const int h = bh % p.nheads, b = bh / p.nheads;
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum) + static_cast<int64_t>(blockIdx.x) * kTile4;
  const int64_t row_stride = static_cast<int64_t>(p.nheads) * kHeadDim;
  T* dq0 = reinterpret_cast<T*>(p.dq) + (static_cast<int64_t>(b) * p.seqlen_q + m_block * kBlockM) * row_stride +
           h * kHeadDim;
  const int rows = min(kBlockM, p.seqlen_q - m_block * kBlockM);  // queries of this tile that exist
  auto store8 = [&](int r, int c, float4 x, float4 y) {  // 8 consecutive headdim values of query row r
    const float a = p.softmax_scale;
    st_global_16(dq0 + r * row_stride + c, ElemTraits<T>::pack(x.x * a, x.y * a), ElemTraits<T>::pack(x.z * a, x.w * a),
                 ElemTraits<T>::pack(y.x * a, y.y * a), ElemTraits<T>::pack(y.z * a, y.w * a));
  };
  extern __shared__ __align__(16) float tile[];
  constexpr int kPerWarpgroup = Cfg::kDqFrag * kThreadsPerWarpgroup / 4;  // float4 of one consumer's part
  float4 a_all[kTile4 / kThreads];  // every load in flight before the first shared store
#pragma unroll
  for (int k = 0; k < kTile4 / kThreads; ++k) a_all[k] = src[threadIdx.x + k * kThreads];
#pragma unroll
  for (int k = 0; k < kTile4 / kThreads; ++k) {
    const int i = threadIdx.x + k * kThreads;
    const float4 a = a_all[k];
    const int cwg = i / kPerWarpgroup, rem = i % kPerWarpgroup;
    const int j = rem / kThreadsPerWarpgroup, t = rem % kThreadsPerWarpgroup;
    const int fr = 16 * (t / 32) + (t % 32) / 4, fc = 8 * j + 2 * (t % 4);  // the fragment's row, column
    if constexpr (Cfg::kDqSwapped) {  // fragment (headdim, query): a.x (c, q), a.y (c, q + 1), a.z, a.w at c + 8
      const int c = Cfg::kDqCols * cwg + fr, q = fc;
      tile[q * PC::kLd + c] = a.x, tile[(q + 1) * PC::kLd + c] = a.y;
      tile[q * PC::kLd + c + 8] = a.z, tile[(q + 1) * PC::kLd + c + 8] = a.w;
    } else {  // fragment (query, headdim): a.x, a.y at (r, c), (r, c + 1); a.z, a.w at row r + 8
      const int r = kRowsPerWarpgroup * (cwg % Cfg::kDqRowSplit) + fr, c = Cfg::kDqCols * (cwg / Cfg::kDqRowSplit) + fc;
      *reinterpret_cast<float2*>(&tile[r * PC::kLd + c]) = make_float2(a.x, a.y);
      *reinterpret_cast<float2*>(&tile[(r + 8) * PC::kLd + c]) = make_float2(a.z, a.w);
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = threadIdx.x; i < kChunks; i += kThreads) {
    const int r = i / (kHeadDim / 8), c = 8 * (i % (kHeadDim / 8));
    if (r < rows) {
      const float4* row = reinterpret_cast<const float4*>(&tile[r * PC::kLd + c]);
      store8(r, c, row[0], row[1]);
    }
  }
}

// ---------------------------------------------------------------- host
template <typename T, int kHeadDim, bool kCausal>
void run(const BwdParams& p, cudaStream_t stream) {
  using Cfg = Config<T, kHeadDim>;
  constexpr int kRowsPerCta = 256 / (kHeadDim / 8);  // of the preprocess
  preprocess_kernel<T, kHeadDim><<<dim3(p.seqlen_q_rounded / kRowsPerCta, p.nheads, p.batch), 256, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "step28 preprocess launch");

  const CUtensorMap tq = make_tmap_bshd(p.q, p.dtype, p.headdim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                                        p.q_head_stride, p.q_batch_stride, kAtomCols16, Cfg::kBlockM);
  const CUtensorMap tdo = make_tmap_bshd(p.dout, p.dtype, p.headdim, p.seqlen_q, p.nheads, p.batch, p.do_row_stride,
                                         p.do_head_stride, p.do_batch_stride, kAtomCols16, Cfg::kBlockM);
  const CUtensorMap tk = make_tmap_bshd(p.k, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.k_row_stride,
                                        p.k_head_stride, p.k_batch_stride, kAtomCols16, Cfg::kBlockN);
  const CUtensorMap tv = make_tmap_bshd(p.v, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.v_row_stride,
                                        p.v_head_stride, p.v_batch_stride, kAtomCols16, Cfg::kBlockN);
  const int64_t dkv_row = int64_t(p.nheads_kv) * p.headdim;  // dk, dv: contiguous (b, seqlen_k, nheads_kv, headdim)
  const CUtensorMap tdk = make_tmap_bshd(p.dk, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, dkv_row,
                                         p.headdim, dkv_row * p.seqlen_k, kAtomCols16, kRowsPerWarpgroup);
  const CUtensorMap tdv = make_tmap_bshd(p.dv, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, dkv_row,
                                         p.headdim, dkv_row * p.seqlen_k, kAtomCols16, kRowsPerWarpgroup);
  const int heads_per_cta = heads_per_cta_of(p, block_n_of(p.headdim));
  auto kernel = heads_per_cta > 1 ? bwd_kernel<T, kHeadDim, kCausal, true> : bwd_kernel<T, kHeadDim, kCausal, false>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
             "cudaFuncSetAttribute(step28)");
  if (heads_per_cta < p.nheads / p.nheads_kv && p.dk_accum == nullptr)
    throw std::runtime_error("step28: GQA with one query head per CTA needs dk_accum, dv_accum");
  // Causal: heads per group, a power of two whose Q, dO (16-bit) and dq_accum (fp32) fit in 40 MB of L2 (FA3's
  // SingleTileBwdLPTScheduler); the group's tiles run longest first. A "head" here is a CTA's heads_per_cta.
  const int64_t head_bytes = int64_t(p.seqlen_q) * p.headdim * (2 * 2 + 4) * heads_per_cta;
  int heads_per_group = 1;
  while (2 * heads_per_group * head_bytes <= (int64_t(40) << 20)) heads_per_group *= 2;
  const int64_t tiles = int64_t(ceil_div_host(p.seqlen_k, Cfg::kBlockN)) * (p.nheads / heads_per_cta) * p.batch;
  if (tiles > 0x7fffffff) throw std::runtime_error("step28: more than 2^31 - 1 CTAs (batch * nheads * n_blocks)");
  kernel<<<static_cast<unsigned>(tiles), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tq, tk, tv, tdo, tdk, tdv, p,
                                                                                   heads_per_group, heads_per_cta);
  check_cuda(cudaGetLastError(), "step28 launch");

  const int64_t dq_tiles = int64_t(p.batch) * p.nheads * (p.seqlen_q_rounded / Cfg::kBlockM);
  if (dq_tiles > 0x7fffffff) throw std::runtime_error("step28: more than 2^31 - 1 dQ tiles (batch * nheads * m_blocks)");
  using PC = PostCfg<T, kHeadDim>;
  check_cuda(cudaFuncSetAttribute(postprocess_dq_kernel<T, kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  PC::kSmemBytes), "cudaFuncSetAttribute(step28 postprocess)");
  postprocess_dq_kernel<T, kHeadDim><<<static_cast<unsigned>(dq_tiles), 256, PC::kSmemBytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "step28 postprocess (dQ) launch");
  if (heads_per_cta < p.nheads / p.nheads_kv) {
    postprocess_dkv_kernel<T><<<grid_stride_blocks(int64_t(p.batch) * p.seqlen_k * p.nheads_kv * p.headdim / 2), 256,
                                0, stream>>>(p);
    check_cuda(cudaGetLastError(), "step28 postprocess (dK, dV) launch");
  }
}

}  // namespace step28

// The m_block size of step 17 at this headdim (the binding sizes the semaphores with it).
int bwd_step28_block_m(int headdim) { return headdim == 64 ? 128 : headdim == 128 ? 80 : 64; }

// Whether the binding must give this call fp32 dK/dV slices per query head (GQA with one query head per CTA).
bool bwd_step28_needs_dkv_accum(const BwdParams& p) {
  return p.nheads != p.nheads_kv &&
         heads_per_cta_of(p, step28::block_n_of(p.headdim)) < p.nheads / p.nheads_kv;
}

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_bwd_step28(const BwdParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (p.headdim) {
      case 64: return p.causal ? step28::run<T, 64, true>(p, stream) : step28::run<T, 64, false>(p, stream);
      case 128: return p.causal ? step28::run<T, 128, true>(p, stream) : step28::run<T, 128, false>(p, stream);
      case 256: return p.causal ? step28::run<T, 256, true>(p, stream) : step28::run<T, 256, false>(p, stream);
      default: throw std::runtime_error("step28: headdim must be 64, 128 or 256");
    }
  };
  if (p.dtype == Dtype::kFloat16) by_dim(__half{});
  else if (p.dtype == Dtype::kBFloat16) by_dim(__nv_bfloat16{});
  else throw std::runtime_error("step28: dtype must be fp16 or bf16");
}

}  // namespace fa3
