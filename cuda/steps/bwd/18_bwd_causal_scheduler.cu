// ============================================================================================
// fa3-lab — FlashAttention-3 BACKWARD, built up in steps (cuda/steps/bwd/):
//   11_bwd                  preprocess + K/V-stationary main kernel + postprocess, all GEMMs on WGMMA
//   12_bwd_warp_specialized + producer warpgroup, Q/dO ring with full/empty mbarriers, dSᵀ double-buffered
//   13_bwd_dq_writer        + dQ through smem, added by a bulk reduce of a dQ-writer warp
//   14_bwd_pipelined        + m_block i + 1's Sᵀ GEMM queued behind m_block i's dQ GEMM (headdim 128)
//   15_bwd_gemm_order       (from 13) + dQ's GEMM before dK's, dQ_i's store under the dK GEMM
//   16_bwd_tile_shape       + headdim 128: 80-query m_blocks, dQᵀ = Kᵀ·dSᵀ
//   17_bwd_fused_preprocess + D with 16-byte loads, dq_accum zeroed in the same pass
//   18_bwd_causal_scheduler + causal: longest n_blocks first in L2-sized head groups; deterministic: reverse   <- this file
//   19_bwd_tma_store_epilogue + dK, dV through shared memory, written by TMA stores
//   20_bwd_dq_one_behind    + m_block i's dQ GEMM in iteration i + 1: the consumers run out of step
//   21_bwd_gqa_group_in_cta + GQA: a CTA walks its KV head's query heads, dK and dV summed in registers
//   22_bwd_k_in_registers   + headdim 64: K_j's rows in registers (Sᵀ from registers), dSᵀ stored by stmatrix
//   23_bwd_dq_postprocess_tiles + the dQ postprocess: one CTA per m_block tile through shared memory, 16-byte stores
//   24_bwd_hd256_dq_writer  + headdim 256: dQ added by the dQ writer's bulk reduction (not atomics), one Q/dO stage
//   25_bwd_hd256_split_s    + headdim 256: Sᵀ, dPᵀ split by queries between the consumers, Pᵀ and dSᵀ through smem
//   26_bwd_do_released_early + dO_i's half of the ring freed once dV has read it: dO_i+2 lands under dK
//   27_bwd_shared_window    + L_i, D_i and the dQ tile through a __shared__ pointer (LDS/STS), L_i read under Sᵀ
//   28_bwd_lse_first        + L_i's LDS issued before the Sᵀ, dPᵀ GEMMs, not queued behind their operand reads
// (The forward series is cuda/steps/01..10; fa3_lab/registry.py is the one list of ids.)
// ============================================================================================
//
// Step 18 extends 17 with the order of the CTAs, and only for causal attention. One CTA owns one n_block (K_j, V_j)
// and runs over the m_blocks that see it: under the causal mask n_block 0 runs all of them and the last n_block
// one or two, so causal CTAs differ up to 13× in length (headdim 128, seqlen 2k: 26 m_blocks down to 2).
//   • Step 17 launched them head by head (n_block fastest). The last wave then holds long CTAs that start late and
//     run alone. Greedy list scheduling on 132 SMs, in launch order, puts that tail at 5–7 % of the backward at
//     seqlen 2k–8k (headdim 128: 7.2 % at 2k, 5.7 % at 8k; headdim 64: 3.5 %; headdim 256: 7.0 %), and measured,
//     step 16 causal at 2k is 0.92× cuDNN where non-causal is 0.97× (164c757/ablation_backward.json).
//     Now the CTAs of a group of heads launch n_block by n_block: the longest first, so the short ones fill the
//     tail (the same model: 0.0–1.8 %). The group is as many heads (a power of two) as have Q, dO and dq_accum
//     in 40 MB of L2, so the Q_i and dO_i tiles a CTA streams are mostly read from L2 by the group's other n_blocks.
//   • Deterministic mode adds dQ in a fixed order, n_block by n_block. Causal, n_block j starts at the diagonal
//     and so reaches a given m_block before n_block j − 1 does: every n_block waited for the one below it, and
//     step 16 deterministic causal took 1.67× the time of the atomic one (1.59 against 0.95 ms at 2k). Now the
//     order is the reverse — the highest n_block that sees an m_block adds first (dq_turn) — and those CTAs launch
//     first (shortest first): each n_block reaches an m_block after the one above it, as its turn comes.
// Non-causal attention and the kernel's loop body are step 17's. FA3 orders its causal backward the same way
// (SingleTileBwdLPTScheduler; shortest first when deterministic).
// Twin: reference/backward.py — tile_order (tile_of), dq_turn, and launch_makespan, the model above
//   (tests/test_reference_bwd_scheduler.py); the arithmetic is step 11's.
// Tried (docs/performance.md): persistent CTAs taking tiles from a counter, next K/V under the epilogue:
//   0.96–1.02× this step, deterministic 1.2–4.6× slower (ff45b7f, reverted).
// Measured (NVIDIA H200, commit fc86c39, 2026-12-04; fa3_lab/results/nvidia-h200/ablation_backward.json): the
//   backward alone (FLOPs 2.5 × forward), bf16, headdim 128, seqlen 8k (batch 2, 16 heads): non-causal 523
//   TFLOPs/s (0.98× step 17, 0.99× cuDNN, 1.70× FA2); causal 497 TFLOPs/s (1.04× step 17, 1.03× cuDNN, 1.70×
//   FA2).
// Known limits: headdim 256 computes Sᵀ and dPᵀ twice and adds dQ by atomics.
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "fa3/bwd.h"
#include "fa3/host.h"
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/trace.h"  // FA3_TRACE builds: tools/experiments/bwd_trace.py
#include "fa3/wgmma.h"

namespace fa3 {
namespace step18 {

constexpr int kThreadsPerWarpgroup = 128;
constexpr int kRowsPerWarpgroup = 64;  // M of every WGMMA
constexpr int kBarDqEmpty = 3, kBarDqFull = 4;  // named barriers of the dQ tile (1: dSᵀ, 2: atomics' turn)

template <typename T, int kHeadDim>
struct Config {
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : kHeadDim == 128 ? 80 : 64;  // queries per m_block (Q_i, dO_i rows)
  static constexpr int kBlockN = kHeadDim == 256 ? 64 : 128;   // keys per CTA (K_j, V_j rows)
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
  static constexpr int kStages = 2;
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
  static constexpr int kOffLse = kOffDS + 2 * kDSBytes;
  static constexpr int kOffD = kOffLse + kStages * kRowBytes;
  static constexpr bool kDqInSmem = kHeadDim <= 128;               // else step 12's atomics (see the header)
  static constexpr bool kDqUnderDk = kHeadDim <= 128;  // else 13's order: at headdim 256 this one's leaves ptxas
                                                       // too few registers and it serializes every WGMMA (C7512)
  static constexpr int kDqBytes = kBlockM * kHeadDim * sizeof(float);  // the fp32 dQ_i(partial) tile
  static constexpr int kOffDQ = kOffD + kStages * kRowBytes;
  static constexpr int kOffBar = kOffDQ + (kDqInSmem ? kDqBytes : 0);
  static constexpr int kSmemBytes = 1024 /*alignment slack*/ + kOffBar + 8 * (1 + 2 * kStages);
  static_assert(kSmemBytes <= 227 * 1024, "smem");
  static_assert(kOffDQ % 16 == 0 && kDqBytes % 16 == 0, "bulk reduce: 16-byte aligned");
  static_assert(kDKVCols % kAtomCols16 == 0 && kDqCols % kAtomCols16 == 0, "column splits on atom boundaries");
};

// ---------------------------------------------------------------- preprocess
// (torch builds with __CUDA_NO_HALF_CONVERSIONS__: 16-bit → float by ElemTraits::unpack)
// kHeadDim/8 threads per padded query row (b, h, row), 8 elements each: D = Σ_d dO·O in fp32 (16-byte loads,
// shuffles within the row's threads), L·log2(e), and the row of dq_accum zeroed; the padding gets D = 0, L = +inf
// (so P = 0 there). seqlen_q_rounded is a multiple of kBlockM and so of the rows per CTA: no thread leaves early.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) preprocess_kernel(const BwdParams p) {
  constexpr int kThreadsPerRow = kHeadDim / 8, kRowsPerCta = 256 / kThreadsPerRow;
  const int t = threadIdx.x % kThreadsPerRow;
  const int row = blockIdx.x * kRowsPerCta + threadIdx.x / kThreadsPerRow, h = blockIdx.y, b = blockIdx.z;
  const int64_t out_idx = (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q_rounded + row;
  float4* dq_row = reinterpret_cast<float4*>(p.dq_accum + out_idx * kHeadDim) + 2 * t;
  dq_row[0] = dq_row[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  float acc = 0.f;
  if (row < p.seqlen_q) {
    const T* o = reinterpret_cast<const T*>(p.o) + b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
    const T* d = reinterpret_cast<const T*>(p.dout) + b * p.do_batch_stride + row * p.do_row_stride + h * p.do_head_stride;
    const uint4 o8 = *reinterpret_cast<const uint4*>(o + 8 * t), d8 = *reinterpret_cast<const uint4*>(d + 8 * t);
    const uint32_t ow[4] = {o8.x, o8.y, o8.z, o8.w}, dw[4] = {d8.x, d8.y, d8.z, d8.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 of = ElemTraits<T>::unpack(ow[j]), df = ElemTraits<T>::unpack(dw[j]);
      acc = fmaf(of.x, df.x, fmaf(of.y, df.y, acc));
    }
  }
#pragma unroll
  for (int off = kThreadsPerRow / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (t == 0) {
    const float lse = row < p.seqlen_q ? p.lse[(static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q + row] : INFINITY;
    p.dpsum[out_idx] = acc;  // 0 in the padding
    p.lse_log2[out_idx] = lse == INFINITY ? INFINITY : lse * kLog2e;  // +inf: the row saw no key, or padding
  }
}

// ---------------------------------------------------------------- tile order
// The (n_block, h, b) of CTA t of the 1-D grid. Non-causal: step 17's order (n_block fastest, one head's CTAs side
// by side). Causal: groups of heads_per_group (b, h) heads, and inside a group n_block by n_block — n_block 0 (the
// most m_blocks) of every head of the group, then n_block 1, ...: longest first. Deterministic causal: shortest first,
// the order in which the n_blocks add to dq_accum (dq_turn).
struct Tile {
  int n_block, h, b;
};
template <bool kCausal>
__device__ __forceinline__ Tile tile_of(int t, const BwdParams& p, int num_n_blocks, int heads_per_group) {
  int n_block, bh;
  if constexpr (kCausal) {
    const int group = t / (heads_per_group * num_n_blocks), r = t % (heads_per_group * num_n_blocks);
    const int heads = min(heads_per_group, p.batch * p.nheads - group * heads_per_group);  // the last group: the rest
    n_block = r / heads, bh = group * heads_per_group + r % heads;
    if (p.deterministic) n_block = num_n_blocks - 1 - n_block;
  } else {
    n_block = t % num_n_blocks, bh = t / num_n_blocks;
  }
  return {n_block, bh % p.nheads, bh / p.nheads};
}

// This n_block's turn to add to m_block's dq_accum rows in deterministic mode (its semaphore counts the adds done).
// Non-causal: n_block order. Causal: the reverse — the last n_block that sees m_block goes first; it reaches m_block
// first (its first m_block is m_block or just below), and each lower n_block one diagonal tile later: no waiting.
template <bool kCausal, int kBlockM, int kBlockN>
__device__ __forceinline__ int dq_turn(int n_block, int m_block, int num_n_blocks, int causal_offset) {
  if constexpr (!kCausal) return n_block;
  const int last = min(num_n_blocks - 1, ((m_block + 1) * kBlockM - 1 + causal_offset) / kBlockN);
  return last - n_block;
}

// ---------------------------------------------------------------- main kernel
template <typename T, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(Config<T, kHeadDim>::kThreads, 1)
    bwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_v, const __grid_constant__ CUtensorMap tmap_do,
               const BwdParams p, const int heads_per_group) {
  using Cfg = Config<T, kHeadDim>;
  using Traits = ElemTraits<T>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kAtomBytesQ = kBlockM * kSwizzleBytes;   // one 64-column atom of a Q_i / dO_i tile
  constexpr int kAtomBytesKV = kBlockN * kSwizzleBytes;  // ... of K_j / V_j, and of the dSᵀ tile

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sK = reinterpret_cast<T*>(smem + Cfg::kOffK);           // (kBlockN, kHeadDim) smem, 128B swizzle, kAtoms atoms
  T* sV = reinterpret_cast<T*>(smem + Cfg::kOffV);           // (kBlockN, kHeadDim), same layout
  T* sQ = reinterpret_cast<T*>(smem + Cfg::kOffQ);           // (kStages, kBlockM, kHeadDim), same layout
  T* sdO = reinterpret_cast<T*>(smem + Cfg::kOffDO);         // (kStages, kBlockM, kHeadDim)
  const uint32_t sdS_addr = smem_u32(smem + Cfg::kOffDS);    // (2, kBlockN keys, kBlockM queries) dSᵀ, 16-bit, swizzled
  float* sLse = reinterpret_cast<float*>(smem + Cfg::kOffLse);  // (kStages, kBlockM) L_i·log2 e
  float* sD = reinterpret_cast<float*>(smem + Cfg::kOffD);      // (kStages, kBlockM) D_i
  uint64_t* bar_kv = reinterpret_cast<uint64_t*>(smem + Cfg::kOffBar);  // "K_j, V_j have landed"
  uint64_t* bar_q = bar_kv + 1;           // (kStages) full: "Q_i, dO_i, L_i, D_i have landed"
  uint64_t* bar_q_empty = bar_q + kStages;  // (kStages) empty: "both consumers are done with the stage"

  const int num_n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const Tile tile = tile_of<kCausal>(blockIdx.x, p, num_n_blocks, heads_per_group);
  const int n_block = tile.n_block, h = tile.h, b = tile.b;
  const int h_kv = h / (p.nheads / p.nheads_kv);  // GQA/MQA by index arithmetic
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
  const int64_t row_base = (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q_rounded;  // of lse_log2, dpsum, dq_accum

  if (threadIdx.x == 0) {
    mbarrier_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) mbarrier_init(&bar_q[s], 1), mbarrier_init(&bar_q_empty[s], Cfg::kConsumerThreads);
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer warpgroup
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
    const int m_block_min = first_m_block(num_m_blocks), num_iters = num_m_blocks - m_block_min;
    if constexpr (Cfg::kDqInSmem) {
      if (threadIdx.x / 32 == 1 && num_iters > 0) {  // the dQ writer
        const float* sdq = reinterpret_cast<const float*>(smem + Cfg::kOffDQ);
        FA3_TRACE_DECL(tr);
        FA3_TRACE_INIT(tr, p, 1, threadIdx.x % 32 == 0);
        named_barrier_arrive(kBarDqEmpty, Cfg::kConsumerThreads + 32);  // the tile starts empty
        for (int i = 0; i < num_iters; ++i) {
          const int m_block = m_block_min + i;
          named_barrier_sync(kBarDqFull, Cfg::kConsumerThreads + 32);
          FA3_TRACE_STAMP(tr, kBwdDqFull, m_block);
          if (threadIdx.x % 32 == 0) {
            int* sem = p.dq_semaphore + (static_cast<int64_t>(b) * p.nheads + h) * num_m_blocks + m_block;
            if (p.deterministic)  // n_blocks add in turn (dq_turn)
              while (ld_acquire_gpu(sem) != dq_turn<kCausal, kBlockM, kBlockN>(n_block, m_block, num_n_blocks,
                                                                                causal_offset)) {
              }
            bulk_reduce_add_f32(p.dq_accum + (row_base + m_block * kBlockM) * kHeadDim, sdq, Cfg::kDqBytes);
            bulk_commit();
            if (p.deterministic) {
              bulk_wait<0>();  // the adds are done: pass the turn
              fence_proxy_async_global();
              __threadfence();
              atomicAdd(sem, 1);
            } else {
              bulk_wait_read<0>();
            }
            FA3_TRACE_STAMP(tr, kBwdDqAdded, m_block);
          }
          __syncwarp();
          if (i + 1 < num_iters) named_barrier_arrive(kBarDqEmpty, Cfg::kConsumerThreads + 32);
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
    for (int i = 0; i < num_iters; ++i) {
      const int stage = i % kStages, m_block = m_block_min + i;
      if (i >= kStages) mbarrier_wait(&bar_q_empty[stage], ((i / kStages) - 1) & 1);
      mbarrier_arrive_expect_tx(&bar_q[stage], 2 * Cfg::kQBytes + 2 * Cfg::kRowBytes);
#pragma unroll
      for (int a = 0; a < Cfg::kAtoms; ++a) {
        tma_load_4d(reinterpret_cast<uint8_t*>(sQ) + stage * Cfg::kQBytes + a * kAtomBytesQ, &tmap_q, &bar_q[stage],
                    a * kAtomCols16, m_block * kBlockM, h, b);
        tma_load_4d(reinterpret_cast<uint8_t*>(sdO) + stage * Cfg::kQBytes + a * kAtomBytesQ, &tmap_do, &bar_q[stage],
                    a * kAtomCols16, m_block * kBlockM, h, b);
      }
      bulk_load_1d(sLse + stage * kBlockM, p.lse_log2 + row_base + m_block * kBlockM, Cfg::kRowBytes, &bar_q[stage]);
      bulk_load_1d(sD + stage * kBlockM, p.dpsum + row_base + m_block * kBlockM, Cfg::kRowBytes, &bar_q[stage]);
      FA3_TRACE_STAMP(tr, kBwdIssueQ, m_block);
    }
    FA3_TRACE_FINISH(tr);
    return;
  }
  // -------------------------------------------------------------------- consumer warpgroups
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  FA3_TRACE_DECL(tr);
  FA3_TRACE_INIT(tr, p, 2 + cwg, threadIdx.x % kThreadsPerWarpgroup == 0);
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int m_block_min = first_m_block(num_m_blocks), num_iters = num_m_blocks - m_block_min;
  float dv[Cfg::kDKVCols / 2];  // (64 keys, kDKVCols) fp32 accumulator fragment, registers
  float dk[Cfg::kDKVCols / 2];
#pragma unroll
  for (int e = 0; e < Cfg::kDKVCols / 2; ++e) dv[e] = dk[e] = 0.f;

  const uint32_t sK_addr = smem_u32(sK), sV_addr = smem_u32(sV);
  const int lane = threadIdx.x % 32;
  const int key0 = n_block * kBlockN + key_group * kRowsPerWarpgroup;  // this warpgroup's first key
  if (num_iters > 0) mbarrier_wait(bar_kv, 0);
  FA3_TRACE_STAMP(tr, kBwdKVReady, 0);

  for (int i = 0; i < num_iters; ++i) {
    const int m_block = m_block_min + i;
    const int stage = i % kStages;
    const uint32_t phase = (i / kStages) & 1;
    const uint32_t sQ_addr = smem_u32(sQ) + stage * Cfg::kQBytes;
    const uint32_t sdO_addr = smem_u32(sdO) + stage * Cfg::kQBytes;
    const uint32_t sdS_i = sdS_addr + (i % 2) * Cfg::kDSBytes;  // dSᵀ double-buffered: one barrier per m_block

    // 1. Sᵀ = K_j·Q_iᵀ and dPᵀ = V_j·dO_iᵀ, rows = this warpgroup's 64 keys, columns = kBlockM queries
    float s[kBlockM / 2];   // (64 keys, kBlockM queries) fp32 accumulator fragment
    float dp[kBlockM / 2];  // same
    mbarrier_wait(&bar_q[stage], phase);
    FA3_TRACE_STAMP(tr, kBwdIterBegin, m_block);
    wgmma_fence();
    gemm_ss<T, kBlockM, kHeadDim, kBlockN, kBlockM>(s, sK_addr, key_group * kRowsPerWarpgroup, sQ_addr, false);
    wgmma_commit();
    gemm_ss<T, kBlockM, kHeadDim, kBlockN, kBlockM>(dp, sV_addr, key_group * kRowsPerWarpgroup, sdO_addr, false);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(s);

    // 2. mask: keys past seqlen_k; causal: key > query + seqlen_k − seqlen_q
    const int q0 = m_block * kBlockM;
    const bool crosses_end = key0 + kRowsPerWarpgroup > p.seqlen_k;
    const bool crosses_diag = kCausal && key0 + kRowsPerWarpgroup - 1 > q0 + causal_offset;
    if (crosses_end || crosses_diag) {
#pragma unroll
      for (int e = 0; e < kBlockM / 2; ++e) {
        const int key = key0 + frag_row(e), query = q0 + frag_col(e);
        bool masked = key >= p.seqlen_k;
        if constexpr (kCausal) masked |= key > query + causal_offset;
        if (masked) s[e] = kNegInf;
      }
    }

    // 3. Pᵀ = exp2(Sᵀ·scale_log2 − L·log2 e), L per column (query); padding rows have L = +inf → 0
    const float* lse_s = sLse + stage * kBlockM;
    const float* d_s = sD + stage * kBlockM;
#pragma unroll
    for (int c = 0; c < kBlockM / 8; ++c) {
      const float2 l2 = *reinterpret_cast<const float2*>(lse_s + 8 * c + 2 * (lane % 4));
#pragma unroll
      for (int j = 0; j < 4; ++j) s[4 * c + j] = fast_exp2(fmaf(s[4 * c + j], p.scale_log2, -((j & 1) ? l2.y : l2.x)));
    }

    // 4. dSᵀ = Pᵀ ∘ (dPᵀ − D), D per column
    wgmma_wait<0>();
    fence_regs(dp);
#pragma unroll
    for (int c = 0; c < kBlockM / 8; ++c) {
      const float2 d2 = *reinterpret_cast<const float2*>(d_s + 8 * c + 2 * (lane % 4));
#pragma unroll
      for (int j = 0; j < 4; ++j) dp[4 * c + j] = s[4 * c + j] * (dp[4 * c + j] - ((j & 1) ? d2.y : d2.x));
    }

    // 5. dV_j += Pᵀ·dO_i (this warpgroup's kDKVCols columns), then dSᵀ → smem under it (one copy: at headdim
    //    256 both warpgroups hold the same keys)
    uint32_t pa[kBlockM / 16][4];   // Pᵀ, 16-bit A fragments (64 keys × kBlockM queries)
    uint32_t dsa[kBlockM / 16][4];  // dSᵀ, same
    pack_p<Traits, kBlockM>(s, pa);
    pack_p<Traits, kBlockM>(dp, dsa);
    wgmma_fence();
    gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dv, pa, sdO_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
    if constexpr (!Cfg::kDqUnderDk)
      gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dk, dsa, sQ_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
    wgmma_commit();
    if (col_part == 0) {
      if constexpr (Cfg::kDqSwapped)  // as dS: (kBlockM queries × kBlockN keys), keys contiguous
        store_frag_transposed<kBlockM, kBlockM>(dsa, sdS_i, key_group * kRowsPerWarpgroup);
      else
        store_frag_swizzled<kBlockN, kBlockM>(dsa, sdS_i, key_group * kRowsPerWarpgroup);
    }
    fence_proxy_async();  // the generic-proxy stores before the WGMMA (async proxy) reads of 6
    if constexpr (!Cfg::kDqUnderDk) {
      wgmma_wait<0>();
      fence_regs(dv);
      fence_regs(dk);
      fence_regs_u32(pa);
      fence_regs_u32(dsa);
    }
    named_barrier_sync(1, Cfg::kConsumerThreads);  // the whole dSᵀ tile is in smem (dV runs meanwhile)

    // 6. dQ_i(partial) = dS·K_j: rows 64·dq_row_part.., columns kDqCols·dq_col_part.., K = kBlockN keys; then
    //    dK_j += dSᵀ·Q_i behind it. Each wait_group 1 waits for the GEMM before the one just issued.
    // (64 queries, kDqCols) fp32 accumulator fragment; swapped, (64 headdim, kBlockM) in Sᵀ's 40 registers, free
    // once Pᵀ is packed: a fresh block beside dV's in-flight pa and dsa leaves ptxas too few contiguous registers,
    // and it serializes every WGMMA of the kernel (ptxas C7512). The first k-slice ignores the old values.
    float dq_own[Cfg::kDqSwapped ? 1 : Cfg::kDqFrag];
    float(&dq)[Cfg::kDqFrag] = *reinterpret_cast<float(*)[Cfg::kDqFrag]>(Cfg::kDqSwapped ? s : dq_own);
    if constexpr (Cfg::kDqSwapped)  // dQᵀ: rows = headdim kDqCols·dq_col_part.., columns = the kBlockM queries
      gemm_ss_ta<T, kBlockM, kBlockN, kBlockN, kBlockM>(dq, sK_addr + dq_col_part * kAtomBytesKV, sdS_i);
    else
      gemm_ss_tt<T, Cfg::kDqCols, kBlockN, kBlockN, kBlockN>(
          dq, sdS_i + dq_row_part * kAtomBytesKV, sK_addr + dq_col_part * (Cfg::kDqCols / kAtomCols16) * kAtomBytesKV);
    wgmma_commit();
    if constexpr (Cfg::kDqUnderDk) {
      wgmma_wait<1>();  // dV is done
      fence_regs(dv);
      fence_regs_u32(pa);
      gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dk, dsa, sQ_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
      wgmma_commit();
      wgmma_wait<1>();  // dQ is done; dK runs under 7
    } else {
      wgmma_wait<0>();
    }
    fence_regs(dq);

    // 7. dQ_i(partial) → the smem tile, once the writer has read the last one; the writer adds it to dq_accum
    if constexpr (Cfg::kDqInSmem) {
      float4* sdq = reinterpret_cast<float4*>(smem + Cfg::kOffDQ) + cwg * (Cfg::kDqFrag / 4) * kThreadsPerWarpgroup;
      named_barrier_sync(kBarDqEmpty, Cfg::kConsumerThreads + 32);
#pragma unroll
      for (int j = 0; j < Cfg::kDqFrag / 4; ++j)
        sdq[j * kThreadsPerWarpgroup + threadIdx.x % kThreadsPerWarpgroup] =
            make_float4(dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3]);
      fence_proxy_async();  // the generic-proxy stores before the bulk reduce (async proxy) reads them
      named_barrier_arrive(kBarDqFull, Cfg::kConsumerThreads + 32);
    } else {  // headdim 256: fp32 atomics from registers (rows are padded: no bounds check), as step 12
      if (p.deterministic) {  // n_blocks add in turn (dq_turn)
        int* sem = p.dq_semaphore + (static_cast<int64_t>(b) * p.nheads + h) * num_m_blocks + m_block;
        if (threadIdx.x == kThreadsPerWarpgroup)
          while (ld_acquire_gpu(sem) != dq_turn<kCausal, kBlockM, kBlockN>(n_block, m_block, num_n_blocks, causal_offset)) {
          }
        named_barrier_sync(2, Cfg::kConsumerThreads);
      }
      {
        float* dq_rows = p.dq_accum + (row_base + q0 + dq_row_part * kRowsPerWarpgroup) * kHeadDim + dq_col_part * Cfg::kDqCols;
#pragma unroll
        for (int e = 0; e < Cfg::kDqCols / 2; e += 2)
          atomicAdd(reinterpret_cast<float2*>(dq_rows + frag_row(e) * kHeadDim + frag_col(e)), make_float2(dq[e], dq[e + 1]));
      }
      if (p.deterministic) {
        __threadfence();
        named_barrier_sync(2, Cfg::kConsumerThreads);
        if (threadIdx.x == kThreadsPerWarpgroup)
          atomicAdd(p.dq_semaphore + (static_cast<int64_t>(b) * p.nheads + h) * num_m_blocks + m_block, 1);
      }
    }

    // 8. this warp is done with stage `stage` once dK (the last reader of Q_i) is
    wgmma_wait<0>();
    fence_regs(dk);
    fence_regs_u32(dsa);
    mbarrier_arrive(&bar_q_empty[stage]);  // every consumer thread: its own L_i, D_i reads (ld.shared) are released
    FA3_TRACE_STAMP(tr, kBwdIterEnd, m_block);
  }

  // 10. epilogue: dK·α and dV of this warpgroup's (64 keys, kDKVCols) → global (keys < seqlen_k)
  const bool gqa = p.dk_accum != nullptr;
#pragma unroll
  for (int e = 0; e < Cfg::kDKVCols / 2; e += 2) {
    const int key = key0 + frag_row(e), col = col_part * Cfg::kDKVCols + frag_col(e);
    if (key >= p.seqlen_k) continue;
    const float k0 = dk[e] * p.softmax_scale, k1 = dk[e + 1] * p.softmax_scale;
    if (gqa) {  // (batch, seqlen_k, nheads, headdim) fp32, one slice per query head
      const int64_t idx = ((static_cast<int64_t>(b) * p.seqlen_k + key) * p.nheads + h) * kHeadDim + col;
      *reinterpret_cast<float2*>(p.dk_accum + idx) = make_float2(k0, k1);
      *reinterpret_cast<float2*>(p.dv_accum + idx) = make_float2(dv[e], dv[e + 1]);
    } else {    // (batch, seqlen_k, nheads_kv, headdim), input dtype
      const int64_t idx = ((static_cast<int64_t>(b) * p.seqlen_k + key) * p.nheads_kv + h_kv) * kHeadDim + col;
      *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dk) + idx) = Traits::pack(k0, k1);
      *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dv) + idx) = Traits::pack(dv[e], dv[e + 1]);
    }
  }
  FA3_TRACE_STAMP(tr, kBwdEpilogueEnd, 0);
  FA3_TRACE_FINISH(tr);
}

// ---------------------------------------------------------------- postprocess
// dQ = dq_accum·α → input dtype, (batch, seqlen_q, nheads, headdim) contiguous; one thread per float4 of
// dq_accum (coalesced reads). At headdim ≤ 128, float4 number 128·(kDqFrag/4)·cwg + 128·j + t of an m_block tile
// is consumer cwg's thread t's dQ elements 4j..4j+3 (the store of 7): fragment rows r0 and r0 + 8, columns c, c + 1
// (frag_row/frag_col) — queries × headdim, or headdim × queries where dQ is swapped (headdim 128); at headdim
// 256 (atomics, row-major) it is four consecutive columns of one row.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) postprocess_dq_kernel(const BwdParams p) {
  using Cfg = Config<T, kHeadDim>;
  constexpr int kTile = Cfg::kBlockM * kHeadDim;  // floats of one m_block tile
  const int tiles_per_head = p.seqlen_q_rounded / Cfg::kBlockM;
  const int64_t total = static_cast<int64_t>(p.batch) * p.nheads * p.seqlen_q_rounded * kHeadDim / 4;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tile = 4 * i / kTile;  // (b·nheads + h)·tiles_per_head + m_block
    const int off = static_cast<int>(4 * i % kTile);
    const int m_block = static_cast<int>(tile % tiles_per_head);
    const int h = static_cast<int>(tile / tiles_per_head % p.nheads), b = static_cast<int>(tile / tiles_per_head / p.nheads);
    const float4 a = *reinterpret_cast<const float4*>(p.dq_accum + 4 * i);
    int r = off / kHeadDim, c = off % kHeadDim;  // headdim 256: row-major
    if constexpr (Cfg::kDqInSmem) {
      constexpr int kPerWarpgroup = Cfg::kDqFrag * kThreadsPerWarpgroup;
      const int cwg = off / kPerWarpgroup, rem = off % kPerWarpgroup;
      const int j = rem / (4 * kThreadsPerWarpgroup), t = rem % (4 * kThreadsPerWarpgroup) / 4;
      const int fr = 16 * (t / 32) + (t % 32) / 4, fc = 8 * j + 2 * (t % 4);  // the fragment's row, column
      if constexpr (Cfg::kDqSwapped) {
        r = fc, c = Cfg::kDqCols * cwg + fr;
      } else {
        r = kRowsPerWarpgroup * (cwg % Cfg::kDqRowSplit) + fr, c = Cfg::kDqCols * (cwg / Cfg::kDqRowSplit) + fc;
      }
    }
    const int s = m_block * Cfg::kBlockM + r;
    const int64_t row_stride = static_cast<int64_t>(p.nheads) * kHeadDim;
    T* dq = reinterpret_cast<T*>(p.dq) + (static_cast<int64_t>(b) * p.seqlen_q + s) * row_stride + h * kHeadDim + c;
    const uint32_t lo = ElemTraits<T>::pack(a.x * p.softmax_scale, a.y * p.softmax_scale);
    const uint32_t hi = ElemTraits<T>::pack(a.z * p.softmax_scale, a.w * p.softmax_scale);
    if constexpr (Cfg::kDqSwapped) {  // lo = (query s, headdim c), (s + 1, c); hi = the same at c + 8
      uint16_t* d16 = reinterpret_cast<uint16_t*>(dq);
      if (s < p.seqlen_q) d16[0] = lo & 0xffff, d16[8] = hi & 0xffff;
      if (s + 1 < p.seqlen_q) d16[row_stride] = lo >> 16, d16[row_stride + 8] = hi >> 16;
    } else if (Cfg::kDqInSmem) {
      if (s < p.seqlen_q) *reinterpret_cast<uint32_t*>(dq) = lo;
      if (s + 8 < p.seqlen_q) *reinterpret_cast<uint32_t*>(dq + 8 * row_stride) = hi;
    } else if (s < p.seqlen_q) {
      *reinterpret_cast<uint2*>(dq) = make_uint2(lo, hi);
    }
  }
}

// GQA: dK, dV (batch, seqlen_k, nheads_kv, headdim) = Σ over the group's query heads of the fp32 slices
// (a fixed order: deterministic), → input dtype. 2 elements per thread.
template <typename T>
__global__ void __launch_bounds__(256) postprocess_dkv_kernel(const BwdParams p) {
  const int group = p.nheads / p.nheads_kv;
  const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen_k * p.nheads_kv * p.headdim / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = 2 * i;  // element index in dk (b, s, h_kv, c)
    const int c = static_cast<int>(e % p.headdim);
    const int64_t bs_hkv = e / p.headdim;  // (b·seqlen_k + s)·nheads_kv + h_kv
    const int64_t src0 = (bs_hkv * group) * p.headdim + c;  // query head h_kv·group, same (b, s)
    float2 k = make_float2(0.f, 0.f), v = make_float2(0.f, 0.f);
    for (int g = 0; g < group; ++g) {
      const float2 kg = *reinterpret_cast<const float2*>(p.dk_accum + src0 + static_cast<int64_t>(g) * p.headdim);
      const float2 vg = *reinterpret_cast<const float2*>(p.dv_accum + src0 + static_cast<int64_t>(g) * p.headdim);
      k.x += kg.x, k.y += kg.y, v.x += vg.x, v.y += vg.y;
    }
    *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dk) + e) = ElemTraits<T>::pack(k.x, k.y);
    *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dv) + e) = ElemTraits<T>::pack(v.x, v.y);
  }
}

// ---------------------------------------------------------------- host
inline int grid_stride_blocks(int64_t items) {
  const int64_t blocks = (items + 255) / 256;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T, int kHeadDim, bool kCausal>
void run(const BwdParams& p, cudaStream_t stream) {
  using Cfg = Config<T, kHeadDim>;
  constexpr int kRowsPerCta = 256 / (kHeadDim / 8);  // of the preprocess
  preprocess_kernel<T, kHeadDim><<<dim3(p.seqlen_q_rounded / kRowsPerCta, p.nheads, p.batch), 256, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "step18 preprocess launch");

  const CUtensorMap tq = make_tmap_bshd(p.q, p.dtype, p.headdim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                                        p.q_head_stride, p.q_batch_stride, kAtomCols16, Cfg::kBlockM);
  const CUtensorMap tdo = make_tmap_bshd(p.dout, p.dtype, p.headdim, p.seqlen_q, p.nheads, p.batch, p.do_row_stride,
                                         p.do_head_stride, p.do_batch_stride, kAtomCols16, Cfg::kBlockM);
  const CUtensorMap tk = make_tmap_bshd(p.k, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.k_row_stride,
                                        p.k_head_stride, p.k_batch_stride, kAtomCols16, Cfg::kBlockN);
  const CUtensorMap tv = make_tmap_bshd(p.v, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.v_row_stride,
                                        p.v_head_stride, p.v_batch_stride, kAtomCols16, Cfg::kBlockN);
  auto kernel = bwd_kernel<T, kHeadDim, kCausal>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
             "cudaFuncSetAttribute(step18)");
  // Causal: heads per group, a power of two whose Q, dO (16-bit) and dq_accum (fp32) fit in 40 MB of L2 (FA3's
  // SingleTileBwdLPTScheduler); the group's tiles run longest first.
  const int64_t head_bytes = int64_t(p.seqlen_q) * p.headdim * (2 * 2 + 4);
  int heads_per_group = 1;
  while (2 * heads_per_group * head_bytes <= (int64_t(40) << 20)) heads_per_group *= 2;
  const int64_t tiles = int64_t(ceil_div_host(p.seqlen_k, Cfg::kBlockN)) * p.nheads * p.batch;
  if (tiles > 0x7fffffff) throw std::runtime_error("step18: more than 2^31 - 1 CTAs (batch * nheads * n_blocks)");
  kernel<<<static_cast<unsigned>(tiles), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tq, tk, tv, tdo, p,
                                                                                   heads_per_group);
  check_cuda(cudaGetLastError(), "step18 launch");

  postprocess_dq_kernel<T, kHeadDim>
      <<<grid_stride_blocks(int64_t(p.batch) * p.nheads * p.seqlen_q_rounded * kHeadDim / 4), 256, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "step18 postprocess (dQ) launch");
  if (p.dk_accum != nullptr) {
    postprocess_dkv_kernel<T><<<grid_stride_blocks(int64_t(p.batch) * p.seqlen_k * p.nheads_kv * p.headdim / 2), 256,
                                0, stream>>>(p);
    check_cuda(cudaGetLastError(), "step18 postprocess (dK, dV) launch");
  }
}

}  // namespace step18

// The m_block size of step 17 at this headdim (the binding sizes the semaphores with it).
int bwd_step18_block_m(int headdim) { return headdim == 64 ? 128 : headdim == 128 ? 80 : 64; }

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_bwd_step18(const BwdParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (p.headdim) {
      case 64: return p.causal ? step18::run<T, 64, true>(p, stream) : step18::run<T, 64, false>(p, stream);
      case 128: return p.causal ? step18::run<T, 128, true>(p, stream) : step18::run<T, 128, false>(p, stream);
      case 256: return p.causal ? step18::run<T, 256, true>(p, stream) : step18::run<T, 256, false>(p, stream);
      default: throw std::runtime_error("step18: headdim must be 64, 128 or 256");
    }
  };
  if (p.dtype == Dtype::kFloat16) by_dim(__half{});
  else if (p.dtype == Dtype::kBFloat16) by_dim(__nv_bfloat16{});
  else throw std::runtime_error("step18: dtype must be fp16 or bf16");
}

}  // namespace fa3
