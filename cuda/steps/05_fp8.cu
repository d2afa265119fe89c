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
// Step 05: the FP8 forward of paper §3.3, built on step 04: producer warpgroup with the K/V ring,
// pingpong of the two consumer warpgroups (03) and the softmax of tile j under the P·V GEMM of tile
// j−1 (04), now with e4m3 operands. It implements reference.fp8.fp8_attention exactly
// (block_m = block_n = 128):
//   - Q, K, V in e4m3 (incoherent processing and block quantization happen before, fa3_lab.fp8);
//     descales per block: q_descale[b, h, m_block], k/v_descale[b, h_kv, n_block].
//   - WGMMA e4m3 takes only K-major smem operands and K = 32 per instruction. Q·Kᵀ: both are K-major
//     as stored. P·V: V must be K-major, i.e. Vᵀ (headdim × keys): fa3_lab.fp8 writes it in that
//     layout once per call, with the keys of every 32-group permuted (PERM) so that each thread's fp32
//     S accumulator is already its e4m3 A fragment (see pack_p_e4m3) — no register shuffle of P.
//   - O is kept in units of the current V block's scale: when tile j's P·V is next, O is rescaled by
//     corr_j · sv_{j−1}/sv_j (one multiply per element, folded into step 04's rescale).
// Consumer, per tile j (last to first), as step 04:
//   1. wait full_k[s_j], full_v[s_{j−1}]; wait for the pingpong turn
//   2. S_next = Q8·K8_jᵀ (e4m3 SS, group 1); O += P8_{j−1}·V8_{j−1} (e4m3 RS, group 2); hand the turn over
//   3. wgmma.wait_group 1: S_next ready; release K_j
//   4. mask; online softmax with scale_log2 = α·log2(e)·sq_i·sk_j in scaled log2 units, P·2^8
//   5. wgmma.wait_group 0: release V_{j−1}; O *= corr_j · sv_{j−1}/sv_j
//   6. P_j → e4m3 A fragments for the next turn
//   7. epilogue: O · sv_last / ℓ → bf16; lse = (m − 8)·ln2 + ln ℓ
// Persistent grid (non-causal, headdim 64/128) as step 04: measured within noise of one CTA per tile
// (docs/performance.md, session 3), kept so that steps 04 and 05 share one structure.
// Measured (NVIDIA H100 80GB HBM3, commit 428551d, 2026-11-22, medians of 3 rotating rounds;
// fa3_lab/results/nvidia-h100-80gb-hbm3/bench_fp8.json), kernel alone, non-causal, seqlen 4k/8k/16k: hd128
// 832/836/842 TFLOPs/s (0.96/0.92/0.91× FA3 e4m3), hd256 1112/1157/1183 (0.99/1.01/1.00×; 1.54× our bf16
// step 04 at 16k). The producer loads K_{j+1} before V_j (as step 04; +1–5 % at hd128). On step 02's
// structure it was 0.86–0.91× FA3 (H200). Analysis: docs/performance.md ("Step 05", session 5).
// Twin: reference/fp8.py::fp8_attention (same block_m = block_n = 128, P·2^8, descales).
// Tried (docs/performance.md): 4 K/V stages at headdim 128: 796/808/830 vs 788/810/815 TFLOPs/s at 4k/8k/16k
//   (noise, kept 2); one CTA per tile instead of the persistent grid: within noise (session 3).
// Known limit (also: its diff from step 04 is over the 250-line rule; see docs/performance.md): V is laid out k-major by the fused quantize kernel (cuda/fp8_quantize.cu: the same pass
// that quantizes V writes it transposed and key-permuted, at no extra traffic), not transposed in shared
// memory with ldmatrix/stmatrix as the paper does; callers with e4m3 V in BSHD pay one copy
// (fa3_lab.fp8.kernel_v_layout).
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
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/wgmma.h"


namespace fa3 {
namespace step05 {

constexpr float kPLog2Scale = 8.f;  // P·2^8 before e4m3 rounding (reference.fp8.K_P_LOG2_SCALE)

template <int kHeadDim>
struct Config {
  static constexpr int kBlockM = 128;  // = the quantization block of Q (descale granularity)
  static constexpr int kBlockN = 128;  // = the quantization block of K and V
  static constexpr int kNumConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kNumConsumers);
  static constexpr int kStages = 2;  // K/V ring depth (4 at headdim 128: noise, docs/performance.md)
  static constexpr bool kKFirst = true;  // producer order K_{j+1} before V_j (producer.h, for_each_kv)
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kTurnBarrier = 1;  // named barriers 1, 2 (0 is __syncthreads)
  static constexpr int kSw = kHeadDim == 64 ? 64 : 128;  // swizzle width of Q/K rows (bytes)
  static constexpr int kAtoms = kHeadDim / kSw;           // Q/K atoms per row
  static constexpr int kQBytes = kBlockM * kHeadDim;       // e4m3: one byte per element
  static constexpr int kKBytes = kBlockN * kHeadDim;
  static constexpr int kVBytes = kHeadDim * kBlockN;       // Vᵀ tile: (kHeadDim, kBlockN), one 128-byte atom per row
  static constexpr int kBarrierBytes = 8 * (2 + 4 * kStages);
  static constexpr int kSmemBytes = 1024 + kQBytes + kStages * (kKBytes + kVBytes) + kBarrierBytes;
};

// Persistent grid (non-causal, headdim 64/128), as step 06: min(tiles, SMs) CTAs stride over the work
// tiles; the K/V ring, the pingpong turns and Q (own empty barrier) carry over from tile to tile.
template <int kHeadDim, bool kCausal>
constexpr bool kPersistent = kHeadDim <= 128 && !kCausal;

// TIn: the input element type (__nv_fp8_e4m3), named like steps 01–04's T so tools find the kernel.
template <typename TIn, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(Config<kHeadDim>::kThreads, 1)
    fwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_vt, const FwdParams p) {
  using Cfg = Config<kHeadDim>;
  static_assert(sizeof(TIn) == 1, "step05 reads e4m3 inputs");
  using T = __nv_bfloat16;  // output
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages, kSw = Cfg::kSw;
  constexpr bool kPersist = kPersistent<kHeadDim, kCausal>;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sQ = smem;                                   // (kBlockM, kHeadDim) e4m3, kSw-byte swizzle
  uint8_t* sK = sQ + Cfg::kQBytes;                      // (kStages, kBlockN, kHeadDim) e4m3
  uint8_t* sVt = sK + kStages * Cfg::kKBytes;           // (kStages, kHeadDim, kBlockN) e4m3, 128B swizzle
  uint64_t* full_q = reinterpret_cast<uint64_t*>(sVt + kStages * Cfg::kVBytes);
  uint64_t* empty_q = full_q + 1;  // persistent: consumers done with Q, the next tile's Q may land
  uint64_t* full_k = empty_q + 1;
  uint64_t* full_v = full_k + kStages;
  uint64_t* empty_k = full_v + kStages;
  uint64_t* empty_v = empty_k + kStages;

  // Work tiles t = (b, h, m_block), m_block fastest, walked from the last down (as step 04).
  const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int num_tiles = num_m * p.nheads * p.batch;
  auto decode = [&](int t, int& m_block, int& h, int& b) {
    if constexpr (!kPersist) {
      m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    } else {
      m_block = num_m - 1 - t % num_m;
      h = (t / num_m) % p.nheads;
      b = t / (num_m * p.nheads);
    }
  };
  const int t_first = kPersist ? blockIdx.x : 0;
  const int t_end = kPersist ? num_tiles : 1;  // one CTA per tile: this CTA's one tile
  const int t_stride = kPersist ? gridDim.x : 1;
  const int wg = warpgroup_id();

  if constexpr (!kPersist) {  // causal, seqlen_q > seqlen_k: rows that see no key
    int m_block, h, b;
    decode(t_first, m_block, h, b);
    const BlockInfo<kBlockM, kBlockN, kCausal> blocks(m_block, p.seqlen_q, p.seqlen_k);
    if (blocks.n_block_max <= 0) {
      T* o_base = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
      float* lse_base = p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q;
      store_empty_rows<T, kHeadDim>(o_base, p.o_row_stride, lse_base, m_block * kBlockM, (m_block + 1) * kBlockM,
                                    p.seqlen_q);
      return;
    }
  }
  if (threadIdx.x == 0) {
    init_ring_barriers<kStages>(full_q, full_k, full_v, empty_k, empty_v, 4 * Cfg::kNumConsumers);
    mbarrier_init(empty_q, 4 * Cfg::kNumConsumers);
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer warpgroup
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x / 32 == 0 && elect_one()) {
      int kv = 0, q_iter = 0;  // K/V tiles and work tiles put through the ring so far
      for (int t = t_first; t < t_end; t += t_stride) {
        int m_block, h, b;
        decode(t, m_block, h, b);
        const int h_kv = h / (p.nheads / p.nheads_kv);
        const int n_block_max = BlockInfo<kBlockM, kBlockN, kCausal>(m_block, p.seqlen_q, p.seqlen_k).n_block_max;
        if (n_block_max <= 0) continue;
        mbarrier_wait(empty_q, (q_iter & 1) ^ 1);  // a fresh barrier reads as released
        mbarrier_arrive_expect_tx(full_q, Cfg::kQBytes);
#pragma unroll
        for (int a = 0; a < Cfg::kAtoms; ++a)
          tma_load_4d(sQ + a * kBlockM * kSw, &tmap_q, full_q, a * kSw, m_block * kBlockM, h, b);
        // K/V tile i of this work tile: ring slot (kv + i) % kStages (producer.h, ring_acquire). Order: producer.h's
        // for_each_kv (K_{i+1} before V_i with Cfg::kKFirst, as step 04).
        auto load_k = [&](int i) {
          ring_acquire<kStages>(kv + i, empty_k, [&](int stage) {
            mbarrier_arrive_expect_tx(&full_k[stage], Cfg::kKBytes);
#pragma unroll
            for (int a = 0; a < Cfg::kAtoms; ++a)
              tma_load_4d(sK + stage * Cfg::kKBytes + a * kBlockN * kSw, &tmap_k, &full_k[stage], a * kSw,
                          (n_block_max - 1 - i) * kBlockN, h_kv, b);
          });
        };
        auto load_v = [&](int i) {  // Vᵀ box: (kBlockN keys, kHeadDim rows) at key n_block·kBlockN
          ring_acquire<kStages>(kv + i, empty_v, [&](int stage) {
            mbarrier_arrive_expect_tx(&full_v[stage], Cfg::kVBytes);
            tma_load_4d(sVt + stage * Cfg::kVBytes, &tmap_vt, &full_v[stage], (n_block_max - 1 - i) * kBlockN, 0,
                        h_kv, b);
          });
        };
        for_each_kv<Cfg::kKFirst>(n_block_max, load_k, load_v);
        kv += n_block_max;
        ++q_iter;
      }
    }
  } else {
    // ------------------------------------------------------------------ consumer warpgroups
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int c = wg - 1;
    // Pingpong turn keeping as step 03/04: warpgroup c waits on turn[c] and hands over to turn[1 − c].
    auto wait_turn = [&]() { named_barrier_sync(Cfg::kTurnBarrier + c, 2 * 128); };
    auto pass_turn = [&]() { named_barrier_arrive(Cfg::kTurnBarrier + (1 - c), 2 * 128); };
    if (c == 1) named_barrier_arrive(Cfg::kTurnBarrier + 0, 2 * 128);
    const uint32_t sQ_addr = smem_u32(sQ);
    const int n_mblocks = (p.seqlen_q + p.descale_block_m - 1) / p.descale_block_m;
    const int n_nblocks = (p.seqlen_k + p.descale_block_n - 1) / p.descale_block_n;
    int kv = 0, q_iter = 0;  // as the producer's

    auto consume_tile = [&](int t) {
      int m_block, h, b;
      decode(t, m_block, h, b);
      const int h_kv = h / (p.nheads / p.nheads_kv);
      const BlockInfo<kBlockM, kBlockN, kCausal> blocks(m_block, p.seqlen_q, p.seqlen_k);
      const int n_block_max = blocks.n_block_max;
      const int row0 = m_block * kBlockM + c * 64;  // this warpgroup's first query row
      T* o_base = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
      float* lse_base = p.lse + (static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q;
      if (n_block_max <= 0) {  // persistent only (one CTA per tile returned above)
        store_empty_rows<T, kHeadDim>(o_base, p.o_row_stride, lse_base, row0, row0 + 64, p.seqlen_q,
                                      threadIdx.x % 128, 128);
        return;
      }
      const float sq = p.q_descale[(static_cast<int64_t>(b) * p.nheads + h) * n_mblocks + m_block];
      const float* sk_row = p.k_descale + (static_cast<int64_t>(b) * p.nheads_kv + h_kv) * n_nblocks;
      const float* sv_row = p.v_descale + (static_cast<int64_t>(b) * p.nheads_kv + h_kv) * n_nblocks;
      const float qk_scale_log2 = p.scale_log2 * sq;  // × sk_j per tile
      OnlineSoftmaxScaled softmax;
      softmax.init();
      float o[kHeadDim / 2];  // (64, kHeadDim) fp32 accumulator fragment, in units of sv_prev
#pragma unroll
      for (int e = 0; e < kHeadDim / 2; ++e) o[e] = 0.f;
      float sv_prev = sv_row[n_block_max - 1];
      mbarrier_wait(full_q, q_iter & 1);
      const int kv0 = kv;
      auto stage_of = [&](int i) { return (kv0 + i) % kStages; };
      auto phase_of = [&](int i) { return static_cast<uint32_t>(((kv0 + i) / kStages) & 1); };
      auto release_q_after = [&](int i) {  // the tile's last Q·Kᵀ is done: Q's slot may be refilled
        if constexpr (kPersist)
          if (threadIdx.x % 32 == 0 && i == n_block_max - 1) mbarrier_arrive(empty_q);
      };

      float s[kBlockN / 2];           // (64, kBlockN) fp32 fragment: S, then P·2^8, registers
      uint32_t pa[kBlockN / 32][4];   // P_{j−1} as e4m3 A fragments (m64k32), registers
      // prologue, tile 0: S = Q8·K8_0ᵀ
      {
        const int n_block = n_block_max - 1;
        const float sk = sk_row[n_block];
        mbarrier_wait(&full_k[stage_of(0)], phase_of(0));
        wait_turn();
        wgmma_fence();
        gemm_ss_e4m3<kBlockN, kHeadDim, kBlockM, kBlockN, kSw>(s, sQ_addr, c * 64,
                                                               smem_u32(sK + stage_of(0) * Cfg::kKBytes));
        wgmma_commit();
        pass_turn();
        wgmma_wait<0>();
        fence_regs(s);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_k[stage_of(0)]);
        release_q_after(0);
        if (blocks.needs_mask(n_block))
          apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);
        float corr[2];
        softmax.update<kBlockN>(s, qk_scale_log2 * sk, kPLog2Scale, corr);  // O is still 0
        pack_p_e4m3<kBlockN>(s, pa);
      }
      // One tile of the main loop; kMask as in step 04 (masked tiles first, their own loop).
      auto tile = [&](int i, auto mask_tag) {
        constexpr bool kMask = decltype(mask_tag)::value;
        const int n_block = n_block_max - 1 - i;
        const int stage = stage_of(i), prev = stage_of(i - 1);
        const float sk = sk_row[n_block], sv = sv_row[n_block];  // issued early, used after the GEMMs
        // 1. operands ready; my turn
        mbarrier_wait(&full_k[stage], phase_of(i));
        wait_turn();
        // 2. S_next = Q8·K8_jᵀ (group 1);  O += P8_{j−1}·V8_{j−1} (group 2);  hand over
        wgmma_fence();
        gemm_ss_e4m3<kBlockN, kHeadDim, kBlockM, kBlockN, kSw>(s, sQ_addr, c * 64, smem_u32(sK + stage * Cfg::kKBytes));
        wgmma_commit();
        mbarrier_wait(&full_v[prev], phase_of(i - 1));
        wgmma_fence();
        gemm_rs_e4m3<kHeadDim, kBlockN>(o, pa, smem_u32(sVt + prev * Cfg::kVBytes));
        wgmma_commit();
        pass_turn();
        // 3. S_next ready; P·V still in flight
        wgmma_wait<1>();
        fence_regs(s);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_k[stage]);
        release_q_after(i);
        // 4. mask, softmax of S_next (under the P·V GEMM)
        if constexpr (kMask) apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);
        float corr[2];
        softmax.update<kBlockN>(s, qk_scale_log2 * sk, kPLog2Scale, corr);
        fence_regs(s);
        fence_regs(corr);
        // 5. P·V done: release V_{j−1}; O into units of sv_j
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs_u32(pa);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_v[prev]);
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
        const int last = stage_of(n_block_max - 1);
        mbarrier_wait(&full_v[last], phase_of(n_block_max - 1));
        wait_turn();
        wgmma_fence();
        gemm_rs_e4m3<kHeadDim, kBlockN>(o, pa, smem_u32(sVt + last * Cfg::kVBytes));
        wgmma_commit();
        pass_turn();
        wgmma_wait<0>();
        fence_regs(o);
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty_v[last]);
      }
      kv += n_block_max;
      ++q_iter;
      // 7. epilogue: O·sv_last/ℓ
      float inv_sum[2], lse[2];
      softmax.finalize(kPLog2Scale, inv_sum, lse);
      inv_sum[0] *= sv_prev;
      inv_sum[1] *= sv_prev;
      store_o_lse<ElemTraits<T>, T, kHeadDim>(o, inv_sum, lse, o_base, p.o_row_stride, lse_base, row0, p.seqlen_q);
    };
    for (int t = t_first; t < t_end; t += t_stride) consume_tile(t);
    if (c == 0) wait_turn();  // matches consumer 1's last hand-over
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
  if constexpr (kPersistent<kHeadDim, kCausal>) grid = persistent_grid(grid);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tq, tk, tvt, p);
  check_cuda(cudaGetLastError(), "step05 launch");
}

}  // namespace step05

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
