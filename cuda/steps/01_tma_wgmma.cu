// ============================================================================================
// fa3-lab — FlashAttention-3 forward, built up in steps (cuda/steps/; the table: fa3_lab/registry.py):
//   01_tma_wgmma               TMA loads + WGMMA GEMMs, two consumer warpgroups, no specialization   <- this file
//   02_warp_specialized        + producer warpgroup, s-stage K/V ring (full/empty mbarriers), setmaxnreg
//   03_pingpong                + named-barrier pingpong of the two consumer warpgroups
//   04_intra_warpgroup_overlap + softmax of tile j under the P·V GEMM of tile j−1 (paper Alg. 2)
//   05_fp8                     + (on 04) e4m3 operands, per-block descales, V k-major (paper §3.3)
//   06_persistent              + (on 04) persistent grid: CTAs stride over the work tiles
//   07_causal_scheduler        + causal: dynamic tile scheduler, longest tiles first
//   08_tma_store_epilogue      + O through shared memory: stmatrix, then one TMA store
//   09_three_warpgroups        + headdim 64: three consumer warpgroups on 192-row tiles
//   10_kv_multicast            + clusters of two CTAs share each K/V tile by TMA multicast
//   bwd/11_…                   the backward (paper App. B.1), a series of its own
// ============================================================================================
//
// Step 01: FlashAttention-2's algorithm rewritten for Hopper's asynchronous units (the paper's
// "WGMMA/TMA rewrite", §4.2 Table 2's first row, 570 TFLOPs on an H100 SXM5). No warp specialization:
// every warpgroup computes, and one thread also issues the TMA copies.
//
// CTA = kBlockM (128) query rows of one (batch, head) = 2 warpgroups × 64 rows. Its main loop:
//   0. prologue: thread 0 TMA-loads Q (once) and the first kStages K/V tiles, each on its mbarrier
//   1. wait K_j's barrier;   S = Q·K_jᵀ          WGMMA SS (both operands in smem), fp32 registers
//   2. mask (only the tiles that cross seqlen_k or the causal diagonal)
//   3. online softmax in registers: m, P = exp2(S·scale_log2 − m·scale_log2), ℓ; rescale O
//   4. P → 16-bit, already in the A-operand register layout
//   5. wait V_j's barrier;   O += P·V_j          WGMMA RS (P from registers, V from smem)
//   6. __syncthreads (both warpgroups are done with the stage); thread 0 TMA-loads tile j+kStages into it
//   7. epilogue: O / ℓ → 16-bit → global; lse = m·α + ln ℓ
// K/V tiles are visited from the last to the first, so the masked tiles come first.
//
// Measured (NVIDIA H200, commit fc86c39, 2026-12-04; fa3_lab/results/nvidia-h200/ablation.json): Table 2
//   shape (4, 8448, 16, 128): bf16 524, fp16 505 TFLOPs/s; bf16 peers in the same run: FA3 678, cuDNN 607.
// Known limits: the two GEMMs and the softmax of a warpgroup run back to back (nothing overlaps
// within a CTA except what the other warpgroup does); the __syncthreads per tile couples both
// warpgroups; the epilogue stores straight from registers (4-byte stores).
// Twin: reference/flash_forward.py::flash_attention_forward (same names: Tc, row_max, row_sum).
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fa3/block_info.h"
#include "fa3/epilogue.h"
#include "fa3/host.h"
#include "fa3/launch.h"
#include "fa3/params.h"
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/trace.h"
#include "fa3/wgmma.h"

namespace fa3 {
namespace step01 {

template <typename T, int kHeadDim>
struct Config {
  static constexpr int kBlockM = 128;                          // Br: query rows per CTA
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;   // Bc: keys per K/V tile
  static constexpr int kNumWarpgroups = kBlockM / 64;
  static constexpr int kThreads = 128 * kNumWarpgroups;
  static constexpr int kStages = 2;
  static constexpr int kAtoms = kHeadDim / kAtomCols16;        // 64-column swizzle atoms per row
  static constexpr int kQBytes = kBlockM * kHeadDim * sizeof(T);
  static constexpr int kKVBytes = kBlockN * kHeadDim * sizeof(T);
  static constexpr int kBarrierBytes = 8 * (1 + 2 * kStages);
  static constexpr int kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
};

template <typename T, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(Config<T, kHeadDim>::kThreads, 1)
    fwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_v, const FwdParams p) {
  using Cfg = Config<T, kHeadDim>;
  using Traits = ElemTraits<T>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sQ = reinterpret_cast<T*>(smem);                              // (kBlockM, kHeadDim) smem, 128B swizzle, kAtoms atoms
  T* sK = reinterpret_cast<T*>(smem + Cfg::kQBytes);               // (kStages, kBlockN, kHeadDim), same layout
  T* sV = reinterpret_cast<T*>(smem + Cfg::kQBytes + kStages * Cfg::kKVBytes);
  uint64_t* bar_q = reinterpret_cast<uint64_t*>(smem + Cfg::kQBytes + 2 * kStages * Cfg::kKVBytes);
  uint64_t* bar_k = bar_q + 1;                                     // (kStages) "K tile j has landed"
  uint64_t* bar_v = bar_k + kStages;                               // (kStages) "V tile j has landed"

  const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (p.nheads / p.nheads_kv);    // GQA/MQA by index arithmetic
  const int wg = threadIdx.x / 128;
  const int row0 = m_block * kBlockM + wg * 64;     // this warpgroup's first query row
  const BlockInfo<kBlockM, kBlockN, kCausal> blocks(m_block, p.seqlen_q, p.seqlen_k);

  T* o_base = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  float* lse_base = p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q;

  const int n_block_max = blocks.n_block_max;
  if (n_block_max <= 0) {
    store_empty_rows<T, kHeadDim>(o_base, p.o_row_stride, lse_base, m_block * kBlockM, (m_block + 1) * kBlockM,
                                  p.seqlen_q);
    return;
  }
  const int num_tiles = n_block_max;

  FA3_TRACE_DECL(tr_tma);  // row 0: TMA issue (thread 0)
  FA3_TRACE_INIT(tr_tma, p, 0, threadIdx.x == 0);
  FA3_TRACE_DECL(tr);      // rows 2, 3: the two warpgroups
  FA3_TRACE_INIT(tr, p, 2 + wg, threadIdx.x % 128 == 0);
  auto load_kv = [&](int stage, int n_block) {
    FA3_TRACE_STAMP(tr_tma, kTmaIssueK, n_block_max - 1 - n_block);
    mbarrier_arrive_expect_tx(&bar_k[stage], Cfg::kKVBytes);
#pragma unroll
    for (int a = 0; a < Cfg::kAtoms; ++a)
      tma_load_4d(sK + stage * (Cfg::kKVBytes / sizeof(T)) + a * kBlockN * kAtomCols16, &tmap_k, &bar_k[stage],
                  a * kAtomCols16, n_block * kBlockN, h_kv, b);
    mbarrier_arrive_expect_tx(&bar_v[stage], Cfg::kKVBytes);
#pragma unroll
    for (int a = 0; a < Cfg::kAtoms; ++a)
      tma_load_4d(sV + stage * (Cfg::kKVBytes / sizeof(T)) + a * kBlockN * kAtomCols16, &tmap_v, &bar_v[stage],
                  a * kAtomCols16, n_block * kBlockN, h_kv, b);
  };

  // 0. prologue
  if (threadIdx.x == 0) {
    mbarrier_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&bar_k[s], 1);
      mbarrier_init(&bar_v[s], 1);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(bar_q, Cfg::kQBytes);
#pragma unroll
    for (int a = 0; a < Cfg::kAtoms; ++a)
      tma_load_4d(sQ + a * kBlockM * kAtomCols16, &tmap_q, bar_q, a * kAtomCols16, m_block * kBlockM, h, b);
    for (int i = 0; i < kStages && i < num_tiles; ++i) load_kv(i, n_block_max - 1 - i);
  }

  OnlineSoftmax softmax;
  softmax.init();
  float o[kHeadDim / 2];  // (64, kHeadDim) fp32 accumulator fragment, registers
#pragma unroll
  for (int e = 0; e < kHeadDim / 2; ++e) o[e] = 0.f;
  const uint32_t sQ_addr = smem_u32(sQ);
  mbarrier_wait(bar_q, 0);

  for (int i = 0; i < num_tiles; ++i) {
    const int n_block = n_block_max - 1 - i;
    const int stage = i % kStages;
    const uint32_t phase = (i / kStages) & 1;

    // 1. S = Q·K_jᵀ
    float s[kBlockN / 2];  // (64, kBlockN) fp32 accumulator fragment, registers
    mbarrier_wait(&bar_k[stage], phase);
    FA3_TRACE_STAMP(tr, kGemm0Issue, i);
    wgmma_fence();
    gemm_ss<T, kBlockN, kHeadDim, kBlockM, kBlockN>(s, sQ_addr, wg * 64,
                                                    smem_u32(sK + stage * (Cfg::kKVBytes / sizeof(T))), false);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);
    FA3_TRACE_STAMP(tr, kGemm0Done, i);
    FA3_TRACE_STAMP(tr, kSoftmaxBegin, i);

    // 2. mask the tiles that cross seqlen_k or the diagonal
    if (blocks.needs_mask(n_block))
      apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);

    // 3. online softmax; rescale O
    float corr[2];
    softmax.update<kBlockN>(s, p.scale_log2, corr);
    rescale_rows<kHeadDim>(o, corr);

    // 4. P → 16-bit A fragments
    uint32_t pa[kBlockN / 16][4];
    pack_p<Traits, kBlockN>(s, pa);
    FA3_TRACE_STAMP(tr, kSoftmaxEnd, i);

    // 5. O += P·V_j
    mbarrier_wait(&bar_v[stage], phase);
    FA3_TRACE_STAMP(tr, kGemm1Issue, i);
    wgmma_fence();
    gemm_rs<T, kHeadDim, kBlockN, kBlockN>(o, pa, smem_u32(sV + stage * (Cfg::kKVBytes / sizeof(T))));
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
    FA3_TRACE_STAMP(tr, kGemm1Done, i);

    // 6. the stage is free: refill it with tile i + kStages
    __syncthreads();
    if (threadIdx.x == 0 && i + kStages < num_tiles) load_kv(stage, n_block - kStages);
  }

  FA3_TRACE_FINISH(tr);
  FA3_TRACE_FINISH(tr_tma);
  // 7. epilogue
  float inv_sum[2], lse[2];
  softmax.finalize(p.scale_log2, inv_sum, lse);
  store_o_lse<Traits, T, kHeadDim>(o, inv_sum, lse, o_base, p.o_row_stride, lse_base, row0, p.seqlen_q);
}

template <typename T, int kHeadDim, bool kCausal>
struct Launch {
  static void run(const FwdParams& p, cudaStream_t stream) {
    launch_fwd<Config<T, kHeadDim>>(fwd_kernel<T, kHeadDim, kCausal>, p, stream, "step01");
  }
};

}  // namespace step01

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_fwd_step01(const FwdParams& p, cudaStream_t stream) { dispatch_fwd<step01::Launch>(p, stream, "step01"); }

}  // namespace fa3
