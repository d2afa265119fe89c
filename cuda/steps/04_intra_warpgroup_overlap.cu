// ============================================================================================
// fa3-lab — FlashAttention-3 forward, built up in steps (cuda/steps/; the table: fa3_lab/registry.py):
//   01_tma_wgmma               TMA loads + WGMMA GEMMs, two consumer warpgroups, no specialization
//   02_warp_specialized        + producer warpgroup, s-stage K/V ring (full/empty mbarriers), setmaxnreg
//   03_pingpong                + named-barrier pingpong of the two consumer warpgroups
//   04_intra_warpgroup_overlap + softmax of tile j under the P·V GEMM of tile j−1 (paper Alg. 2)   <- this file
//   05_fp8                     + (on 04) e4m3 operands, per-block descales, V k-major (paper §3.3)
//   06_persistent              + (on 04) persistent grid: CTAs stride over the work tiles
//   07_causal_scheduler        + causal: dynamic tile scheduler, longest tiles first
//   08_tma_store_epilogue      + O through shared memory: stmatrix, then one TMA store
//   09_three_warpgroups        + headdim 64: three consumer warpgroups on 192-row tiles
//   10_kv_multicast            + clusters of two CTAs share each K/V tile by TMA multicast
//   bwd/11_…                   the backward (paper App. B.1), a series of its own
// ============================================================================================
//
// Step 04 extends 03 by the intra-warpgroup pipeline of the paper's Algorithm 2 (§3.2):
//   1. a turn issues S_next = Q·K_jᵀ first and P_{j−1}·V_{j−1} second, as two commit groups, and waits only
//      for the first (wait_group 1): the softmax of tile j runs while the tensor cores compute P_{j−1}·V_{j−1};
//   2. masked tiles (crossing seqlen_k or the diagonal, visited first) get a loop of their own (kMask), so the
//      overlapped region of the unmasked loop has no branch for ptxas to put the wait_group 0 at;
//   3. O is rescaled only when some row's max moved (lazy rescale), after P_j is packed;
//   4. the producer loads K_{j+1} before V_j (kKFirst), the order the turns use them in.
// The price is registers: S_next (fp32) and P_{j−1} (16-bit, read by the RS WGMMA until step 5) live at once.
// Main loop (step 04's), per K/V tile j, last to first, in a turn of the pingpong:
//   1. wait full_k[s_j]; wait for the turn
//   2. S_next = Q·K_jᵀ (group 1); wait full_v[s_{j−1}]; O += P_{j−1}·V_{j−1} (group 2); hand the turn over
//   3. wgmma.wait_group 1: S_next ready, P·V still running; release K_j               (Alg. 2 line 9)
//   4. mask; online softmax of S_next → P_j, corr_j, under the P·V GEMM              (Alg. 2 lines 10–11)
//   5. wgmma.wait_group 0: P·V done; release V_{j−1}                                 (Alg. 2 line 12)
//   6. P_j → 16-bit A fragments; O *= corr_j if some row's max moved (lazy rescale)
// then a last turn O += P_last·V_last and 7. the epilogue: O / ℓ and lse.
// Twin: reference/fa3_pipeline.py::pipelined_forward (same stage numbers).
// Measured (NVIDIA H200, commit fc86c39, 2026-12-04; fa3_lab/results/nvidia-h200/ablation.json): Table 2
//   shape (4, 8448, 16, 128): bf16 653, fp16 638 TFLOPs/s (1.06× step 03).
// Known limits: ptxas places wgmma.wait_group 0 after 10–17 of the softmax's exponentials, not after all.
// Tried (docs/performance.md): wait_group 0 forced below every exponential: 0–9 % slower (kept ptxas's);
//   O's rescale between the two GEMM issues (as FA3): 0.98–1.03×, noise (not kept); lazy rescale: hd256 +1–6 %,
//   0.99–1.07× (mean 1.027) with P packed first (kept); K_{j+1} before V_j, V waited for inside the turn:
//   hd128 1.00–1.03×, mean 1.011 with P packed first (57b2741, kept).
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

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
namespace step04 {

template <typename T, int kHeadDim, bool kCausal>
struct Config {
  static constexpr int kNumConsumers = 2;
  static constexpr int kBlockM = kRowsPerWarpgroup * kNumConsumers;       // Br = consumers × 64 rows
  static constexpr int kBlockN = kHeadDim == 64 ? 128 : kHeadDim == 128 ? (kCausal ? 128 : 176) : 80;  // Bc
  static constexpr int kThreads = kThreadsPerWarpgroup * (1 + kNumConsumers);
  static constexpr int kStages = kHeadDim == 64 ? 4 : 2;
  static constexpr bool kKFirst = true;      // producer order K_{j+1} before V_j (producer.h, for_each_kv)
  static constexpr int kTurnBarrier = 1;     // named barriers 1, 2 (0 is __syncthreads)
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
  constexpr int kTurnBarrier = Cfg::kTurnBarrier;

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
    // Pingpong turn keeping: warpgroup c waits on turn[c] and hands over to turn[1 − c]. Consumer 0
    // goes first; consumer 1 skips its final hand-over so every arrival is matched by a wait.
    const int c = wg - 1;
    auto wait_turn = [&]() { named_barrier_sync(kTurnBarrier + c, 2 * kThreadsPerWarpgroup); };
    auto pass_turn = [&]() { named_barrier_arrive(kTurnBarrier + (1 - c), 2 * kThreadsPerWarpgroup); };
    const uint32_t sQ_addr = smem_u32(sQ);
    auto consume_tile = [&]() {  // the consumer's work on this CTA's tile (steps 06+ run it for many tiles)
      const int row0 = m_block * kBlockM + c * kRowsPerWarpgroup;  // this warpgroup's first query row
      OnlineSoftmax softmax;
      softmax.init();
      float o[kHeadDim / 2];  // (kRowsPerWarpgroup, kHeadDim) fp32 accumulator fragment, registers
#pragma unroll
      for (int e = 0; e < kHeadDim / 2; ++e) o[e] = 0.f;
      mbarrier_wait(full_q, 0);
      if (c == 1) named_barrier_arrive(kTurnBarrier + 0, 2 * kThreadsPerWarpgroup);  // consumer 0 goes first
      auto stage_of = [&](int i) { return i % kStages; };  // K/V tile i: ring slot and pass parity
      auto phase_of = [&](int i) { return static_cast<uint32_t>((i / kStages) & 1); };
      float s[kBlockN / 2];           // (kRowsPerWarpgroup, kBlockN) fp32 fragment: S, then P, registers
      uint32_t pa[kBlockN / 16][4];   // P_{j−1} as 16-bit A fragments, registers
      float corr[2];                  // corr_{j−1}: O's rescale, applied just before O += P_{j−1}·V_{j−1}
      // prologue, tile 0: S = Q·K_0ᵀ
      mbarrier_wait(&full_k[0], 0);
      wait_turn();
      FA3_TRACE_STAMP(tr, kGemm0Issue, 0);
      wgmma_fence();
      gemm_ss<T, kBlockN, kHeadDim, kBlockM, kBlockN>(s, sQ_addr, c * kRowsPerWarpgroup, smem_u32(sK), false);
      wgmma_commit();
      pass_turn();
      wgmma_wait<0>();
      fence_regs(s);
      FA3_TRACE_STAMP(tr, kGemm0Done, 0);
      FA3_TRACE_STAMP(tr, kSoftmaxBegin, 0);
      if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_k[0]);  // K_0 read: release its slot
      {
        const int n_block = n_block_max - 1;
        if (blocks.needs_mask(n_block))
          apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);
        softmax.update<kBlockN>(s, p.scale_log2, corr);  // corr = 0 and O = 0: the rescale is harmless
        pack_p<Traits, kBlockN>(s, pa);
      }
      FA3_TRACE_STAMP(tr, kSoftmaxEnd, 0);
      // One tile of the main loop. kMask is a compile-time flag: the tiles that cross seqlen_k or the
      // diagonal come first (we walk the tiles backwards) and get their own loop, so the overlapped region
      // of the unmasked loop has no branch — ptxas otherwise places wgmma.wait_group 0 at the branch's
      // join point, ahead of the exponentials, and the overlap is lost (SASS, docs/performance.md).
      auto tile = [&](int i, auto mask_tag) {
        constexpr bool kMask = decltype(mask_tag)::value;
        const int n_block = n_block_max - 1 - i;
        const int stage = stage_of(i), prev = stage_of(i - 1);
        // 1. operands ready; my turn
        mbarrier_wait(&full_k[stage], phase_of(i));
        wait_turn();
        // 2. S_next = Q·K_jᵀ (group 1);  O += P_{j−1}·V_{j−1} (group 2);  hand over
        FA3_TRACE_STAMP(tr, kGemm0Issue, i);
        wgmma_fence();
        gemm_ss<T, kBlockN, kHeadDim, kBlockM, kBlockN>(s, sQ_addr, c * kRowsPerWarpgroup, smem_u32(sK + stage * kTileElems), false);
        wgmma_commit();
        mbarrier_wait(&full_v[prev], phase_of(i - 1));  // V_{j−1}: waited for after Q·K_jᵀ is issued
        FA3_TRACE_STAMP(tr, kGemm1Issue, i - 1);
        wgmma_fence();  // each GEMM its own fence: ptxas then tracks the two groups separately
        gemm_rs<T, kHeadDim, kBlockN, kBlockN>(o, pa, smem_u32(sV + prev * kTileElems));
        wgmma_commit();
        pass_turn();
        // 3. S_next ready; P·V still in flight
        wgmma_wait<1>();
        fence_regs(s);
        FA3_TRACE_STAMP(tr, kGemm0Done, i);
        FA3_TRACE_STAMP(tr, kSoftmaxBegin, i);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_k[stage]);  // K_j read: release its slot
        // 4. mask, softmax of S_next (under the P·V GEMM)
        if constexpr (kMask) apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);
        const bool rescale = softmax.update_lazy<kBlockN>(s, p.scale_log2, corr);  // O *= corr only if a max moved
        // Pin P and corr before the wait, so the exponentials cannot sink below it.
        fence_regs(s);
        fence_regs(corr);
        FA3_TRACE_STAMP(tr, kSoftmaxEnd, i);
        // 5. P·V done; release V_{j−1}'s slot
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs_u32(pa);
        FA3_TRACE_STAMP(tr, kGemm1Done, i - 1);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_v[prev]);  // V_{j−1} read
        // 6. P_j → 16-bit, then O *= corr_j (lazy: only if a max moved). In this order the packing stays in
        // the basic block of the exponentials, so ptxas interleaves its F2FPs with the MUFU.EX2s; after the
        // rescale's branch it ran as a serial tail (ncu source view, docs/performance.md, session 5).
        pack_p<Traits, kBlockN>(s, pa);
        if (rescale) rescale_rows<kHeadDim>(o, corr);
        corr[0] = corr[1] = 1.f;
      };
      int i = 1;
      for (; i < n_block_max && blocks.needs_mask(n_block_max - 1 - i); ++i) tile(i, std::true_type{});
      for (; i < n_block_max; ++i) tile(i, std::false_type{});
      // epilogue turn: O += P_last·V_last
      {
        const int last = (n_block_max - 1) % kStages;
        mbarrier_wait(&full_v[last], ((n_block_max - 1) / kStages) & 1);
        wait_turn();
        rescale_rows<kHeadDim>(o, corr);
        FA3_TRACE_STAMP(tr, kGemm1Issue, n_block_max - 1);
        wgmma_fence();
        gemm_rs<T, kHeadDim, kBlockN, kBlockN>(o, pa, smem_u32(sV + last * kTileElems));
        wgmma_commit();
        if (c == 0) pass_turn();
        wgmma_wait<0>();
        fence_regs(o);
        FA3_TRACE_STAMP(tr, kGemm1Done, n_block_max - 1);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_v[last]);
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
    launch_fwd<Config<T, kHeadDim, kCausal>>(fwd_kernel<T, kHeadDim, kCausal>, p, stream, "step04");
  }
};

}  // namespace step04

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_fwd_step04(const FwdParams& p, cudaStream_t stream) { dispatch_fwd<step04::Launch>(p, stream, "step04"); }

}  // namespace fa3
