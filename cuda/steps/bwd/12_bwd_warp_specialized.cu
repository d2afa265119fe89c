// ============================================================================================
// fa3-lab — FlashAttention-3 BACKWARD, built up in steps (cuda/steps/bwd/):
//   11_bwd                  preprocess + K/V-stationary main kernel + postprocess, all GEMMs on WGMMA
//   12_bwd_warp_specialized + producer warpgroup, Q/dO ring with full/empty mbarriers, dSᵀ double-buffered  <- this file
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
//   28_bwd_lse_first        + L_i's LDS issued before the Sᵀ, dPᵀ GEMMs, not queued behind their operand reads
// (The forward series is cuda/steps/01..10; fa3_lab/registry.py is the one list of ids.)
// ============================================================================================
//
// Step 12 extends 11 with warp specialization, as step 02 does for the forward (paper §3.1, and App. B.1's
// "the backward pass ... also uses warp-specialization"): the CTA has THREE warpgroups.
//
//   producer (warpgroup 0, setmaxnreg.dec 24): one elected thread loads K_j, V_j once, then Q_i, dO_i, L_i, D_i
//            of every m_block into the kStages ring, running ahead of the consumers:
//              bar_q[s]        full  "stage s has landed"                 arrive.expect_tx, TMA completes
//              bar_q_empty[s]  empty "both consumers are done with it"     one arrival per consumer warp (8)
//   consumers (warpgroups 1, 2, setmaxnreg.inc 240): stages 1–7 and 9 of step 11, without loading anything;
//            8. a warp releases stage s (bar_q_empty) once its dV/dK GEMMs (the last readers of Q_i, dO_i) are done.
//
// dSᵀ is double-buffered, so one consumer barrier per m_block (after 6) is enough: when both warpgroups pass
// m_block i's barrier, both have finished the dQ GEMM of i − 1, the last reader of buffer (i + 1) % 2.
// The arithmetic, the tiles, the preprocess and the postprocess are step 11's.
// Twin: none — the arithmetic is step 11's (reference/backward.py); the ring is the forward's (step 02).
// Measured (NVIDIA H200, commit fc86c39, 2026-12-04; fa3_lab/results/nvidia-h200/ablation_backward.json): the
//   backward alone (FLOPs 2.5 × forward), bf16, headdim 128, seqlen 8k (batch 2, 16 heads): non-causal 357
//   TFLOPs/s (1.09× step 11, 0.67× cuDNN, 1.16× FA2); causal 346 TFLOPs/s (1.08× step 11, 0.72× cuDNN, 1.19×
//   FA2).
// Known limits: dQ atomics straight from registers on the consumers' path (13); no overlap of one m_block's
// GEMMs with the next one's exponentials; headdim 256 computes Sᵀ and dPᵀ twice.
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "fa3/bwd.h"
#include "fa3/host.h"
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/wgmma.h"

namespace fa3 {
namespace step12 {

constexpr int kThreadsPerWarpgroup = 128;
constexpr int kRowsPerWarpgroup = 64;  // M of every WGMMA

template <typename T, int kHeadDim>
struct Config {
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : 64;    // queries per m_block (Q_i, dO_i rows)
  static constexpr int kBlockN = kHeadDim == 256 ? 64 : 128;   // keys per CTA (K_j, V_j rows)
  static constexpr int kNumWarpgroups = 2;                          // consumers (+ 1 producer warpgroup)
  static constexpr int kConsumerThreads = kThreadsPerWarpgroup * kNumWarpgroups;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;       // arrivals on an empty barrier
  static constexpr int kThreads = kConsumerThreads + kThreadsPerWarpgroup;
  static constexpr int kProducerRegs = 24;   // 24·128 + 240·256 = 64512 ≤ 65536 registers per SM
  static constexpr int kConsumerRegs = 240;
  static constexpr int kKeyGroups = kBlockN / kRowsPerWarpgroup;    // warpgroups along the keys
  static constexpr int kColSplit = kNumWarpgroups / kKeyGroups;     // ... along dK, dV's columns
  static constexpr int kDKVCols = kHeadDim / kColSplit;             // N of the dV, dK GEMMs
  static constexpr int kDqRowSplit = kBlockM / kRowsPerWarpgroup;   // warpgroups along dQ's rows
  static constexpr int kDqColSplit = kNumWarpgroups / kDqRowSplit;  // ... along dQ's columns
  static constexpr int kDqCols = kHeadDim / kDqColSplit;            // N of the dQ GEMM
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
  static constexpr int kOffBar = kOffD + kStages * kRowBytes;
  static constexpr int kSmemBytes = 1024 /*alignment slack*/ + kOffBar + 8 * (1 + 2 * kStages);
  static_assert(kSmemBytes <= 227 * 1024, "smem");
  static_assert(kDKVCols % kAtomCols16 == 0 && kDqCols % kAtomCols16 == 0, "column splits on atom boundaries");
};

// ---------------------------------------------------------------- preprocess
// (torch builds with __CUDA_NO_HALF_CONVERSIONS__: no implicit 16-bit → float)
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// One warp per padded query row (b, h, row): D = Σ_d dO·O in fp32, L·log2(e); the padding gets D = 0,
// L = +inf (so P = 0 there).
template <typename T>
__global__ void __launch_bounds__(256) preprocess_kernel(const BwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * 8 + warp, h = blockIdx.y, b = blockIdx.z;
  if (row >= p.seqlen_q_rounded) return;
  const int64_t out_idx = (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q_rounded + row;
  if (row >= p.seqlen_q) {
    if (lane == 0) p.dpsum[out_idx] = 0.f, p.lse_log2[out_idx] = INFINITY;
    return;
  }
  const T* o = reinterpret_cast<const T*>(p.o) + b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
  const T* d = reinterpret_cast<const T*>(p.dout) + b * p.do_batch_stride + row * p.do_row_stride + h * p.do_head_stride;
  float acc = 0.f;
  for (int c = 2 * lane; c < p.headdim; c += 64) {
    acc = fmaf(to_float(o[c]), to_float(d[c]), acc);
    acc = fmaf(to_float(o[c + 1]), to_float(d[c + 1]), acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const float lse = p.lse[(static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q + row];
    p.dpsum[out_idx] = acc;
    p.lse_log2[out_idx] = lse == INFINITY ? INFINITY : lse * kLog2e;  // +inf: the row saw no key
  }
}

// ---------------------------------------------------------------- main kernel
template <typename T, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(Config<T, kHeadDim>::kThreads, 1)
    bwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_v, const __grid_constant__ CUtensorMap tmap_do,
               const BwdParams p) {
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

  const int n_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (p.nheads / p.nheads_kv);  // GQA/MQA by index arithmetic
  const int wg = warpgroup_id();
  const int cwg = wg - 1;                          // consumer index (warpgroup 0 is the producer)
  const int key_group = cwg % Cfg::kKeyGroups, col_part = cwg / Cfg::kKeyGroups;   // this consumer's dK, dV
  const int dq_row_part = cwg % Cfg::kDqRowSplit, dq_col_part = cwg / Cfg::kDqRowSplit;  // ... and dQ slice
  const int causal_offset = p.seqlen_k - p.seqlen_q;
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;

  // The Q tiles that see any key of this K/V tile (reference.backward.m_block_range); computed after setmaxnreg
  // (a value live across it is spilled).
  auto first_m_block = [&]() {
    return kCausal ? min(max(0, n_block * kBlockN - causal_offset) / kBlockM, num_m_blocks) : 0;
  };
  const int64_t row_base = (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q_rounded;  // of lse_log2, dpsum, dq_accum

  if (threadIdx.x == 0) {
    mbarrier_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) mbarrier_init(&bar_q[s], 1), mbarrier_init(&bar_q_empty[s], Cfg::kConsumerWarps);
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer warpgroup
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int m_block_min = first_m_block(), num_iters = num_m_blocks - m_block_min;
    if (threadIdx.x / 32 != 0 || !elect_one() || num_iters == 0) return;
    // 0. K_j, V_j once
    mbarrier_arrive_expect_tx(bar_kv, 2 * Cfg::kKVBytes);
#pragma unroll
    for (int a = 0; a < Cfg::kAtoms; ++a) {
      tma_load_4d(reinterpret_cast<uint8_t*>(sK) + a * kAtomBytesKV, &tmap_k, bar_kv, a * kAtomCols16,
                  n_block * kBlockN, h_kv, b);
      tma_load_4d(reinterpret_cast<uint8_t*>(sV) + a * kAtomBytesKV, &tmap_v, bar_kv, a * kAtomCols16,
                  n_block * kBlockN, h_kv, b);
    }
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
    }
    return;
  }
  // -------------------------------------------------------------------- consumer warpgroups
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int m_block_min = first_m_block(), num_iters = num_m_blocks - m_block_min;
  float dv[Cfg::kDKVCols / 2];  // (64 keys, kDKVCols) fp32 accumulator fragment, registers
  float dk[Cfg::kDKVCols / 2];
#pragma unroll
  for (int e = 0; e < Cfg::kDKVCols / 2; ++e) dv[e] = dk[e] = 0.f;

  const uint32_t sK_addr = smem_u32(sK), sV_addr = smem_u32(sV);
  const int lane = threadIdx.x % 32;
  const int key0 = n_block * kBlockN + key_group * kRowsPerWarpgroup;  // this warpgroup's first key
  if (num_iters > 0) mbarrier_wait(bar_kv, 0);

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

    // 5. dV_j += Pᵀ·dO_i, dK_j += dSᵀ·Q_i (this warpgroup's kDKVCols columns)
    uint32_t pa[kBlockM / 16][4];   // Pᵀ, 16-bit A fragments (64 keys × kBlockM queries)
    uint32_t dsa[kBlockM / 16][4];  // dSᵀ, same
    pack_p<Traits, kBlockM>(s, pa);
    pack_p<Traits, kBlockM>(dp, dsa);
    wgmma_fence();
    gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dv, pa, sdO_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
    gemm_rs<T, Cfg::kDKVCols, kBlockM, kBlockM>(dk, dsa, sQ_addr + col_part * (Cfg::kDKVCols / kAtomCols16) * kAtomBytesQ);
    wgmma_commit();

    // 6. dSᵀ → smem (one copy: at headdim 256 both warpgroups hold the same keys), under the GEMMs of 5
    if (col_part == 0) store_frag_swizzled<kBlockN, kBlockM>(dsa, sdS_i, key_group * kRowsPerWarpgroup);
    fence_proxy_async();  // the generic-proxy stores before the WGMMA (async proxy) reads of 7
    wgmma_wait<0>();
    fence_regs(dv);
    fence_regs(dk);
    fence_regs_u32(pa);
    fence_regs_u32(dsa);
    __syncwarp();  // every lane's reads of stage `stage` (L_i, D_i by ld.shared) before lane 0 releases it
    if (lane == 0) mbarrier_arrive(&bar_q_empty[stage]);  // 8. this warp is done with stage `stage`
    named_barrier_sync(1, Cfg::kConsumerThreads);          // the whole dSᵀ tile is in smem

    // 7. dQ_i(partial) = dS·K_j: rows 64·dq_row_part.., columns kDqCols·dq_col_part.., K = kBlockN keys
    float dq[Cfg::kDqCols / 2];  // (64 queries, kDqCols) fp32 accumulator fragment
    wgmma_fence();
    gemm_ss_tt<T, Cfg::kDqCols, kBlockN, kBlockN, kBlockN>(
        dq, sdS_i + dq_row_part * kAtomBytesKV, sK_addr + dq_col_part * (Cfg::kDqCols / kAtomCols16) * kAtomBytesKV);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dq);

    // 9. dq_accum_i += dQ_i(partial), fp32 atomics (rows are padded: no bounds check)
    if (p.deterministic) {  // n_blocks add in order: this CTA is the (n_block)-th to touch m_block
      int* sem = p.dq_semaphore + (static_cast<int64_t>(b) * p.nheads + h) * num_m_blocks + m_block;
      if (threadIdx.x == kThreadsPerWarpgroup)
        while (ld_acquire_gpu(sem) != n_block) {
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
}

// ---------------------------------------------------------------- postprocess
// dQ = dq_accum·α → input dtype, (batch, seqlen_q, nheads, headdim) contiguous; 4 elements per thread.
template <typename T>
__global__ void __launch_bounds__(256) postprocess_dq_kernel(const BwdParams p) {
  const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.nheads * p.headdim / 4;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = 4 * i;  // element index in dq (b, s, h, c)
    const int c = static_cast<int>(e % p.headdim);
    const int64_t bsh = e / p.headdim;
    const int h = static_cast<int>(bsh % p.nheads);
    const int64_t bs = bsh / p.nheads;
    const int s = static_cast<int>(bs % p.seqlen_q), b = static_cast<int>(bs / p.seqlen_q);
    const float4 a = *reinterpret_cast<const float4*>(
        p.dq_accum + ((static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q_rounded + s) * p.headdim + c);
    uint2 out;
    out.x = ElemTraits<T>::pack(a.x * p.softmax_scale, a.y * p.softmax_scale);
    out.y = ElemTraits<T>::pack(a.z * p.softmax_scale, a.w * p.softmax_scale);
    *reinterpret_cast<uint2*>(reinterpret_cast<T*>(p.dq) + e) = out;
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
  preprocess_kernel<T><<<dim3(p.seqlen_q_rounded / 8, p.nheads, p.batch), 256, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "step12 preprocess launch");

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
             "cudaFuncSetAttribute(step12)");
  const dim3 grid(ceil_div_host(p.seqlen_k, Cfg::kBlockN), p.nheads, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tq, tk, tv, tdo, p);
  check_cuda(cudaGetLastError(), "step12 launch");

  postprocess_dq_kernel<T><<<grid_stride_blocks(int64_t(p.batch) * p.seqlen_q * p.nheads * p.headdim / 4), 256, 0,
                             stream>>>(p);
  check_cuda(cudaGetLastError(), "step12 postprocess (dQ) launch");
  if (p.dk_accum != nullptr) {
    postprocess_dkv_kernel<T><<<grid_stride_blocks(int64_t(p.batch) * p.seqlen_k * p.nheads_kv * p.headdim / 2), 256,
                                0, stream>>>(p);
    check_cuda(cudaGetLastError(), "step12 postprocess (dK, dV) launch");
  }
}

}  // namespace step12

// The m_block size of step 12 at this headdim (the binding sizes the semaphores with it).
int bwd_step12_block_m(int headdim) { return headdim == 64 ? 128 : 64; }

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_bwd_step12(const BwdParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (p.headdim) {
      case 64: return p.causal ? step12::run<T, 64, true>(p, stream) : step12::run<T, 64, false>(p, stream);
      case 128: return p.causal ? step12::run<T, 128, true>(p, stream) : step12::run<T, 128, false>(p, stream);
      case 256: return p.causal ? step12::run<T, 256, true>(p, stream) : step12::run<T, 256, false>(p, stream);
      default: throw std::runtime_error("step12: headdim must be 64, 128 or 256");
    }
  };
  if (p.dtype == Dtype::kFloat16) by_dim(__half{});
  else if (p.dtype == Dtype::kBFloat16) by_dim(__nv_bfloat16{});
  else throw std::runtime_error("step12: dtype must be fp16 or bf16");
}

}  // namespace fa3
