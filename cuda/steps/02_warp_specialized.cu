// ============================================================================================
// fa3-lab — FlashAttention-3 forward, built up in steps (cuda/steps/; the table: fa3_lab/registry.py):
//   01_tma_wgmma               TMA loads + WGMMA GEMMs, two consumer warpgroups, no specialization
//   02_warp_specialized        + producer warpgroup, s-stage K/V ring (full/empty mbarriers), setmaxnreg   <- this file
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
// Step 02 extends 01 with warp specialization (paper §3.1, Algorithm 1): the CTA has THREE warpgroups. Warpgroup 0
// is the producer: one elected thread issues every TMA copy, the rest idle, and the warpgroup gives its registers
// back (setmaxnreg.dec to kProducerRegs). Warpgroups 1 and 2 are consumers (64 query rows each) and take those
// registers (setmaxnreg.inc to kConsumerRegs). K and V flow through a kStages-deep circular buffer in shared memory
// guarded by mbarriers (the producer runs up to kStages tiles ahead; no __syncthreads in the loop):
//   full_k[s], full_v[s]    "tile in stage s has landed"     producer arrive.expect_tx, TMA completes
//   empty_k[s], empty_v[s]  "both consumers are done with it" one arrival per consumer warp (8)
//
// Producer (Alg. 1 lines 3–8):                 Consumer (Alg. 1 lines 9–17), per tile j:
//   0. load Q once (full_q)                     1. wait full_k[s]; S = Q·K_jᵀ (WGMMA SS)
//   for each tile j, stage s = j % kStages:      2. mask (boundary/diagonal tiles only)
//     wait empty_k[s] (parity flipped: the ring  3. online softmax, rescale O; release K_j
//       starts empty); TMA K_j on full_k[s]       4. P → 16-bit A fragments
//     wait empty_v[s]; TMA V_j on full_v[s]       5. wait full_v[s]; O += P·V_j (WGMMA RS)
//                                                6. release V_j (arrive empty_v[s])
//                                               7. epilogue: O / ℓ, lse
// K/V tiles are visited from the last to the first, so the masked tiles come first.
//
// Measured (NVIDIA H200, commit fc86c39, 2026-12-04; fa3_lab/results/nvidia-h200/ablation.json): Table 2
//   shape (4, 8448, 16, 128): bf16 568, fp16 551 TFLOPs/s (1.08× step 01).
// Known limits: the consumers take the tensor cores and MUFU in no order (03), the softmax waits for GEMMs (04).
// Twin: reference/fa3_pipeline.py::warp_specialized_forward.
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fa3/block_info.h"
#include "fa3/epilogue.h"
#include "fa3/host.h"
#include "fa3/launch.h"
#include "fa3/params.h"
#include "fa3/producer.h"
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/trace.h"
#include "fa3/wgmma.h"

namespace fa3 {
namespace step02 {

template <typename T, int kHeadDim, bool kCausal>
struct Config {
  static constexpr int kNumConsumers = 2;
  static constexpr int kBlockM = kRowsPerWarpgroup * kNumConsumers;       // Br = consumers × 64 rows
  static constexpr int kBlockN = kHeadDim == 64 ? 128 : kHeadDim == 128 ? (kCausal ? 128 : 176) : 80;  // Bc
  static constexpr int kThreads = kThreadsPerWarpgroup * (1 + kNumConsumers);
  static constexpr int kStages = kHeadDim == 64 ? 4 : 2;
  static constexpr int kAtoms = kHeadDim / kAtomCols16;        // 64-column swizzle atoms per row
  static constexpr int kQBytes = kBlockM * kHeadDim * sizeof(T);
  static constexpr int kKVBytes = kBlockN * kHeadDim * sizeof(T);
  static constexpr int kProducerRegs = 24;   // 24·128 + 240·256 = 64512 ≤ 65536 registers per SM
  static constexpr int kConsumerRegs = 240;
  static constexpr int kBarrierBytes = 8 * (1 + 4 * kStages);
  static constexpr int kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
};

template <typename T, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(Config<T, kHeadDim, kCausal>::kThreads, 1)
    fwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_v, const FwdParams p) {
  using Cfg = Config<T, kHeadDim, kCausal>;
  using Traits = ElemTraits<T>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kTileElems = Cfg::kKVBytes / sizeof(T);

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sQ = reinterpret_cast<T*>(smem);                              // (kBlockM, kHeadDim) smem, 128B swizzle, kAtoms atoms
  T* sK = reinterpret_cast<T*>(smem + Cfg::kQBytes);               // (kStages, kBlockN, kHeadDim) ring
  T* sV = sK + kStages * kTileElems;                               // (kStages, kBlockN, kHeadDim) ring
  uint64_t* full_q = reinterpret_cast<uint64_t*>(smem + Cfg::kQBytes + 2 * kStages * Cfg::kKVBytes);
  uint64_t* full_k = full_q + 1;       // (kStages)
  uint64_t* full_v = full_k + kStages;  // (kStages)
  uint64_t* empty_k = full_v + kStages;  // (kStages)
  uint64_t* empty_v = empty_k + kStages;  // (kStages)

  const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (p.nheads / p.nheads_kv);    // GQA/MQA by index arithmetic
  const int wg = warpgroup_id();
  const BlockInfo<kBlockM, kBlockN, kCausal> blocks(m_block, p.seqlen_q, p.seqlen_k);
  const int n_block_max = blocks.n_block_max;

  T* o_base = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  float* lse_base = p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q;
  if (n_block_max <= 0) {
    store_empty_rows<T, kHeadDim>(o_base, p.o_row_stride, lse_base, m_block * kBlockM, (m_block + 1) * kBlockM,
                                  p.seqlen_q);
    return;
  }

  if (threadIdx.x == 0) init_ring_barriers<kStages>(full_q, full_k, full_v, empty_k, empty_v, kWarpsPerWarpgroup * Cfg::kNumConsumers);
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer warpgroup
    setmaxnreg_dec<Cfg::kProducerRegs>();
    produce_q_kv<T, Cfg>(&tmap_q, &tmap_k, &tmap_v, sQ, sK, sV, full_q, full_k, full_v, empty_k, empty_v, m_block, h,
                         h_kv, b, n_block_max, p);
  } else {
    // ------------------------------------------------------------------ consumer warpgroups
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    FA3_TRACE_DECL(tr);
    FA3_TRACE_INIT(tr, p, 1 + wg, threadIdx.x % kThreadsPerWarpgroup == 0);
    const uint32_t sQ_addr = smem_u32(sQ);
    auto consume_tile = [&]() {  // the consumer's work on this CTA's tile (steps 06+ run it for many tiles)
      const int row0 = m_block * kBlockM + (wg - 1) * kRowsPerWarpgroup;  // this warpgroup's first query row
      OnlineSoftmax softmax;
      softmax.init();
      float o[kHeadDim / 2];  // (kRowsPerWarpgroup, kHeadDim) fp32 accumulator fragment, registers
#pragma unroll
      for (int e = 0; e < kHeadDim / 2; ++e) o[e] = 0.f;
      mbarrier_wait(full_q, 0);

      for (int i = 0; i < n_block_max; ++i) {
        const int n_block = n_block_max - 1 - i;
        const int stage = i % kStages;
        const uint32_t phase = (i / kStages) & 1;

        // 1. S = Q·K_jᵀ
        float s[kBlockN / 2];  // (kRowsPerWarpgroup, kBlockN) fp32 fragment, registers
        mbarrier_wait(&full_k[stage], phase);
        FA3_TRACE_STAMP(tr, kGemm0Issue, i);
        wgmma_fence();
        gemm_ss<T, kBlockN, kHeadDim, kBlockM, kBlockN>(s, sQ_addr, (wg - 1) * kRowsPerWarpgroup,
                                                        smem_u32(sK + stage * kTileElems), false);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
        FA3_TRACE_STAMP(tr, kGemm0Done, i);
        FA3_TRACE_STAMP(tr, kSoftmaxBegin, i);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_k[stage]);  // K_j read: release its slot
        // 2. mask
        if (blocks.needs_mask(n_block))
          apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);
        // 3. online softmax, rescale O
        float corr[2];
        softmax.update<kBlockN>(s, p.scale_log2, corr);
        rescale_rows<kHeadDim>(o, corr);
        // 4. P → 16-bit
        uint32_t pa[kBlockN / 16][4];
        pack_p<Traits, kBlockN>(s, pa);
        FA3_TRACE_STAMP(tr, kSoftmaxEnd, i);
        // 5. O += P·V_j
        mbarrier_wait(&full_v[stage], phase);
        FA3_TRACE_STAMP(tr, kGemm1Issue, i);
        wgmma_fence();
        gemm_rs<T, kHeadDim, kBlockN, kBlockN>(o, pa, smem_u32(sV + stage * kTileElems));
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
        FA3_TRACE_STAMP(tr, kGemm1Done, i);
        // 6. release V_j's slot (one arrival per warp)
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_v[stage]);
      }
      // 7. epilogue
      float inv_sum[2], lse[2];
      softmax.finalize(p.scale_log2, inv_sum, lse);
      store_o_lse<Traits, T, kHeadDim>(o, inv_sum, lse, o_base, p.o_row_stride, lse_base, row0, p.seqlen_q);
    };
    consume_tile();
    FA3_TRACE_FINISH(tr);
  }
}

template <typename T, int kHeadDim, bool kCausal>
struct Launch {
  static void run(const FwdParams& p, cudaStream_t stream) {
    launch_fwd<Config<T, kHeadDim, kCausal>>(fwd_kernel<T, kHeadDim, kCausal>, p, stream, "step02");
  }
};

}  // namespace step02

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_fwd_step02(const FwdParams& p, cudaStream_t stream) { dispatch_fwd<step02::Launch>(p, stream, "step02"); }

}  // namespace fa3
