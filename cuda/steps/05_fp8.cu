// ============================================================================================
// fa3-lab — FlashAttention-3 forward, built up in steps (cuda/steps/; the table: fa3_lab/registry.py):
//   01_tma_wgmma               TMA loads + WGMMA GEMMs, two consumer warpgroups, no specialization
//   02_warp_specialized        + producer warpgroup, s-stage K/V ring (full/empty mbarriers), setmaxnreg
//   03_pingpong                + named-barrier pingpong of the two consumer warpgroups
//   04_intra_warpgroup_overlap + softmax of tile j under the P·V GEMM of tile j−1 (paper Alg. 2)
//   05_fp8                     + (on 04) e4m3 operands, per-block descales, V k-major (paper §3.3)   <- this file
//   06_persistent              + (on 04) persistent grid: CTAs stride over the work tiles
//   07_causal_scheduler        + causal: dynamic tile scheduler, longest tiles first
//   08_tma_store_epilogue      + O through shared memory: stmatrix, then one TMA store
//   09_three_warpgroups        + headdim 64: three consumer warpgroups on 192-row tiles
//   10_kv_multicast            + clusters of two CTAs share each K/V tile by TMA multicast
//   bwd/11_…                   the backward (paper App. B.1), a series of its own
// ============================================================================================
//
// Step 05 extends 04 by FP8 e4m3 operands (paper §3.3); it computes reference.fp8.fp8_attention exactly
// (block_m = block_n = 128):
//   1. Q, K, V in e4m3, quantized before the call (fa3_lab.fp8: block quantization, incoherent processing);
//      descales per block: q_descale[b, h, m_block], k/v_descale[b, h_kv, n_block] (Bc = Br = 128);
//   2. WGMMA e4m3 reads only K-major smem operands, K = 32 per instruction. Q·Kᵀ: both K-major as stored.
//      P·V: V must be K-major, Vᵀ (headdim × keys), written so by the quantize kernel with the keys of every
//      32-group permuted so that each thread's fp32 S accumulator is already its e4m3 A fragment
//      (pack_p_e4m3) — no register shuffle of P; the producer loads Vᵀ boxes (producer_fp8.h);
//   3. the softmax works in scaled log2 units (scale_log2 = α·log2(e)·sq·sk_j) and keeps P·2^8;
//   4. O is kept in units of the current V block's scale: O *= corr_j · sv_{j−1}/sv_j after each P·V,
//      and the epilogue multiplies by sv_last / ℓ; lse = (m − 8)·ln2 + ln ℓ. Output bf16.
// Main loop: step 04's stages 1–7 with e4m3 GEMMs (QGMMA in SASS) and the O rescale every tile (stage 5).
// Twin: reference/fp8.py::fp8_attention (same blocks, P·2^8, descales).
// Measured (NVIDIA H200, commit fc86c39, 2026-12-04; fa3_lab/results/nvidia-h200/bench_fp8.json): the kernel
//   alone, non-causal, seqlen 16k: headdim 128 831 TFLOPs/s (0.93× FA3 e4m3); headdim 256 1173 TFLOPs/s
//   (1.03× FA3 e4m3).
// Known limits: Bc is pinned to 128 by the quantization block (FA3 uses a wider one at hd128); V is
// transposed by the quantize kernel, not in shared memory with ldmatrix/stmatrix as the paper does, so
// callers with e4m3 V in BSHD pay one copy (fa3_lab.fp8.kernel_v_layout).
// Tried (docs/performance.md): persistent grid at hd64/128 non-causal: within noise (session 3; dropped
//   here so that 05 is 04 plus FP8 only); 4 K/V stages at hd128: 796/808/830 vs 788/810/815 (noise);
//   K_{j+1} before V_j: +1–5 % at hd128 (f6c9bb6, kept).
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "fa3/block_info.h"
#include "fa3/epilogue.h"
#include "fa3/host.h"
#include "fa3/launch.h"
#include "fa3/params.h"
#include "fa3/producer.h"
#include "fa3/producer_fp8.h"
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/trace.h"
#include "fa3/wgmma.h"

namespace fa3 {
namespace step05 {

constexpr float kPLog2Scale = 8.f;  // P·2^8 before e4m3 rounding (reference.fp8.K_P_LOG2_SCALE)

template <int kHeadDim>
struct Config {
  static constexpr int kNumConsumers = 2;
  static constexpr int kBlockM = kRowsPerWarpgroup * kNumConsumers;       // = the quantization block of Q
  static constexpr int kBlockN = 128;                                     // = the quantization block of K, V
  static constexpr int kThreads = kThreadsPerWarpgroup * (1 + kNumConsumers);
  static constexpr int kStages = 2;  // (4 at headdim 128: noise, docs/performance.md)
  static constexpr bool kKFirst = true;      // producer order K_{j+1} before V_j (producer.h, for_each_kv)
  static constexpr int kTurnBarrier = 1;     // named barriers 1, 2 (0 is __syncthreads)
  static constexpr int kSw = kHeadDim == 64 ? 64 : 128;  // swizzle width of Q/K rows (bytes)
  static constexpr int kAtoms = kHeadDim / kSw;           // Q/K atoms per row
  static constexpr int kQBytes = kBlockM * kHeadDim;       // e4m3: one byte per element
  static constexpr int kKBytes = kBlockN * kHeadDim;
  static constexpr int kVBytes = kHeadDim * kBlockN;       // Vᵀ tile: (kHeadDim, kBlockN), one 128-byte atom per row
  static constexpr int kProducerRegs = 24;   // 24·128 + 240·256 = 64512 ≤ 65536 registers per SM
  static constexpr int kConsumerRegs = 240;
  static constexpr int kBarrierBytes = 8 * (1 + 4 * kStages);
  static constexpr int kSmemBytes = 1024 + kQBytes + kStages * (kKBytes + kVBytes) + kBarrierBytes;
};

// TIn: the input element type (__nv_fp8_e4m3), named like the other steps' T so tools find the kernel.
template <typename TIn, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(Config<kHeadDim>::kThreads, 1)
    fwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_vt, const FwdParams p) {
  using Cfg = Config<kHeadDim>;
  static_assert(sizeof(TIn) == 1, "step05 reads e4m3 inputs");
  using T = __nv_bfloat16;  // output
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages, kSw = Cfg::kSw;
  constexpr int kTurnBarrier = Cfg::kTurnBarrier;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sQ = smem;                                   // (kBlockM, kHeadDim) e4m3, kSw-byte swizzle
  uint8_t* sK = sQ + Cfg::kQBytes;                      // (kStages, kBlockN, kHeadDim) e4m3 ring
  uint8_t* sVt = sK + kStages * Cfg::kKBytes;           // (kStages, kHeadDim, kBlockN) e4m3 ring, 128B swizzle
  uint64_t* full_q = reinterpret_cast<uint64_t*>(sVt + kStages * Cfg::kVBytes);
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
    produce_q_kv_fp8<Cfg>(&tmap_q, &tmap_k, &tmap_vt, sQ, sK, sVt, full_q, full_k, full_v, empty_k, empty_v, m_block,
                          h, h_kv, b, n_block_max);
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
    const int n_mblocks = (p.seqlen_q + p.descale_block_m - 1) / p.descale_block_m;
    const int n_nblocks = (p.seqlen_k + p.descale_block_n - 1) / p.descale_block_n;
    auto consume_tile = [&]() {  // the consumer's work on this CTA's tile
      const int row0 = m_block * kBlockM + c * kRowsPerWarpgroup;  // this warpgroup's first query row
      const float sq = p.q_descale[(static_cast<int64_t>(b) * p.nheads + h) * n_mblocks + m_block];
      const float* sk_row = p.k_descale + (static_cast<int64_t>(b) * p.nheads_kv + h_kv) * n_nblocks;
      const float* sv_row = p.v_descale + (static_cast<int64_t>(b) * p.nheads_kv + h_kv) * n_nblocks;
      const float qk_scale_log2 = p.scale_log2 * sq;  // × sk_j per tile
      OnlineSoftmaxScaled softmax;
      softmax.init();
      float o[kHeadDim / 2];  // (kRowsPerWarpgroup, kHeadDim) fp32 accumulator fragment, in units of sv_prev
#pragma unroll
      for (int e = 0; e < kHeadDim / 2; ++e) o[e] = 0.f;
      float sv_prev = sv_row[n_block_max - 1];
      mbarrier_wait(full_q, 0);
      if (c == 1) named_barrier_arrive(kTurnBarrier + 0, 2 * kThreadsPerWarpgroup);  // consumer 0 goes first
      auto stage_of = [&](int i) { return i % kStages; };  // K/V tile i: ring slot and pass parity
      auto phase_of = [&](int i) { return static_cast<uint32_t>((i / kStages) & 1); };
      float s[kBlockN / 2];           // (kRowsPerWarpgroup, kBlockN) fp32 fragment: S, then P·2^8, registers
      uint32_t pa[kBlockN / 32][4];   // P_{j−1} as e4m3 A fragments (m64k32), registers
      float corr[2];
      // prologue, tile 0: S = Q8·K8_0ᵀ
      mbarrier_wait(&full_k[0], 0);
      wait_turn();
      FA3_TRACE_STAMP(tr, kGemm0Issue, 0);
      wgmma_fence();
      gemm_ss_e4m3<kBlockN, kHeadDim, kBlockM, kBlockN, kSw>(s, sQ_addr, c * kRowsPerWarpgroup, smem_u32(sK));
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
        softmax.update<kBlockN>(s, qk_scale_log2 * sk_row[n_block], kPLog2Scale, corr);  // O is still 0
        pack_p_e4m3<kBlockN>(s, pa);
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
        const float sk = sk_row[n_block], sv = sv_row[n_block];  // issued early, used after the GEMMs
        // 1. operands ready; my turn
        mbarrier_wait(&full_k[stage], phase_of(i));
        wait_turn();
        // 2. S_next = Q8·K8_jᵀ (group 1);  O += P8_{j−1}·V8_{j−1} (group 2);  hand over
        FA3_TRACE_STAMP(tr, kGemm0Issue, i);
        wgmma_fence();
        gemm_ss_e4m3<kBlockN, kHeadDim, kBlockM, kBlockN, kSw>(s, sQ_addr, c * kRowsPerWarpgroup, smem_u32(sK + stage * Cfg::kKBytes));
        wgmma_commit();
        mbarrier_wait(&full_v[prev], phase_of(i - 1));  // V_{j−1}: waited for after Q·K_jᵀ is issued
        FA3_TRACE_STAMP(tr, kGemm1Issue, i - 1);
        wgmma_fence();  // each GEMM its own fence: ptxas then tracks the two groups separately
        gemm_rs_e4m3<kHeadDim, kBlockN>(o, pa, smem_u32(sVt + prev * Cfg::kVBytes));
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
        softmax.update<kBlockN>(s, qk_scale_log2 * sk, kPLog2Scale, corr);
        // Pin P and corr before the wait, so the exponentials cannot sink below it.
        fence_regs(s);
        fence_regs(corr);
        FA3_TRACE_STAMP(tr, kSoftmaxEnd, i);
        // 5. P·V done; release V_{j−1}'s slot; O into units of sv_j
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs_u32(pa);
        FA3_TRACE_STAMP(tr, kGemm1Done, i - 1);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_v[prev]);  // V_{j−1} read
        const float ratio = __fdividef(sv_prev, sv);  // MUFU.RCP + FMUL: no slow-path branch (it would end the
                                                      // overlapped block and pull wait_group 0 above the EX2s)
        corr[0] *= ratio;
        corr[1] *= ratio;
        rescale_rows<kHeadDim>(o, corr);
        sv_prev = sv;
        // 6. P_j → e4m3
        pack_p_e4m3<kBlockN>(s, pa);
      };
      int i = 1;
      for (; i < n_block_max && blocks.needs_mask(n_block_max - 1 - i); ++i) tile(i, std::true_type{});
      for (; i < n_block_max; ++i) tile(i, std::false_type{});
      // epilogue turn: O += P8_last·V8_last
      {
        const int last = (n_block_max - 1) % kStages;
        mbarrier_wait(&full_v[last], ((n_block_max - 1) / kStages) & 1);
        wait_turn();
        FA3_TRACE_STAMP(tr, kGemm1Issue, n_block_max - 1);
        wgmma_fence();
        gemm_rs_e4m3<kHeadDim, kBlockN>(o, pa, smem_u32(sVt + last * Cfg::kVBytes));
        wgmma_commit();
        if (c == 0) pass_turn();
        wgmma_wait<0>();
        fence_regs(o);
        FA3_TRACE_STAMP(tr, kGemm1Done, n_block_max - 1);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_v[last]);
      }
      // 7. epilogue: O·sv_last/ℓ
      float inv_sum[2], lse[2];
      softmax.finalize(kPLog2Scale, inv_sum, lse);
      inv_sum[0] *= sv_prev;
      inv_sum[1] *= sv_prev;
      store_o_lse<ElemTraits<T>, T, kHeadDim>(o, inv_sum, lse, o_base, p.o_row_stride, lse_base, row0, p.seqlen_q);
    };
    consume_tile();
    FA3_TRACE_FINISH(tr);
  }
}

template <int kHeadDim, bool kCausal>
void launch(const FwdParams& p, cudaStream_t stream) {
  using Cfg = Config<kHeadDim>;
  const CUtensorMap tq = make_tmap_bshd(p.q, Dtype::kE4M3, kHeadDim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                                        p.q_head_stride, p.q_batch_stride, Cfg::kSw, Cfg::kBlockM, Cfg::kSw);
  const CUtensorMap tk = make_tmap_bshd(p.k, Dtype::kE4M3, kHeadDim, p.seqlen_k, p.nheads_kv, p.batch,
                                        p.k_row_stride, p.k_head_stride, p.k_batch_stride, Cfg::kSw, Cfg::kBlockN,
                                        Cfg::kSw);
  // Vᵀ (batch, nheads_kv, headdim, vt_seqlen_pad): innermost the keys, then headdim rows
  const CUtensorMap tvt = make_tmap_bshd(p.v, Dtype::kE4M3, p.vt_seqlen_pad, kHeadDim, p.nheads_kv, p.batch,
                                         p.v_row_stride, p.v_head_stride, p.v_batch_stride, Cfg::kBlockN, kHeadDim);
  auto kernel = fwd_kernel<__nv_fp8_e4m3, kHeadDim, kCausal>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
             "cudaFuncSetAttribute(step05)");
  dim3 grid(ceil_div_host(p.seqlen_q, Cfg::kBlockM), p.nheads, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tq, tk, tvt, p);
  check_cuda(cudaGetLastError(), "step05 launch");
}

}  // namespace step05

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_fwd_step05(const FwdParams& p, cudaStream_t stream) {
  if (p.descale_block_m != step05::Config<128>::kBlockM || p.descale_block_n != step05::Config<128>::kBlockN)
    throw std::runtime_error("step05: descale blocks must be 128 × 128 (the kernel's tiles)");
  switch (p.headdim) {
    case 64: return p.causal ? step05::launch<64, true>(p, stream) : step05::launch<64, false>(p, stream);
    case 128: return p.causal ? step05::launch<128, true>(p, stream) : step05::launch<128, false>(p, stream);
    case 256: return p.causal ? step05::launch<256, true>(p, stream) : step05::launch<256, false>(p, stream);
    default: throw std::runtime_error("step05: headdim must be 64, 128 or 256");
  }
}

}  // namespace fa3
