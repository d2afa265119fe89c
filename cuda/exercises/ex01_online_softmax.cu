// ============================================================================================
// fa3-lab — CUDA exercise 01: the online softmax of a Hopper attention kernel
//   (a self-contained copy of cuda/steps/01_tma_wgmma.cu, namespace fa3::exercise01, entry
//    fa3::run_fwd_exercise01; built on its own by fa3_lab.grading.build_exercise)
// ============================================================================================
//
// The kernel is step 01 (TMA loads + WGMMA, two consumer warpgroups of 64 query rows; see that file
// for the whole story; its FA3_TRACE stamps are left out here). One region of its main loop is
// yours: stage 3, the online softmax of the S tile in registers and the rescale of O (paper §3.1,
// Algorithm 1 lines 10–12; notebook 01's online_update and notebook 02's tile_step are its NumPy
// twins; notebook 06 shows the fragment).
//
// Write stage 3 of the main loop below (in the student copy: replace the stub call there). You
// have, per thread of a warpgroup:
//   s[kBlockN / 2]   fp32 scores S = Q·K_jᵀ of two rows (fragment element e is in row r = (e % 4) >= 2
//                    of this thread's two rows, see fa3/softmax.h), masked entries are −inf
//   o[kHeadDim / 2]  fp32 unnormalized O of the same two rows (same row rule)
//   softmax.row_max[2], softmax.row_sum[2]   running m_i (raw S units) and this thread's part of ℓ_i
//   p.scale_log2     softmax_scale · log2(e);  helpers quad_max(x), fast_exp2(x), fmaf, kNegInf
// Requirements:
//   1. m_new = max(m_old, this tile's row max) over the whole row: the 4 threads of a quad
//      (lanes 4q…4q+3) share each row, so reduce across them (quad_max).
//   2. P = exp2(S·scale_log2 − m_new·scale_log2) in place in s[], one FFMA + one exp2 per element;
//      a row with m_new = −inf must use 0 as its offset (never −inf − (−inf) = NaN).
//   3. corr = exp2((m_old − m_new)·scale_log2); ℓ = ℓ·corr + Σ P (per thread; finalize() adds the
//      quad's parts); O *= corr, row by row.
//   4. Do not call OnlineSoftmax::update or rescale_rows: they are the answer.
// Roughly 20 lines. Grade on an H100/H200:
//   pytest tests/test_grading.py -k cuda_exercise  (FA3_EXERCISE=path/to/your/copy.cu to pick a file)
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fa3/block_info.h"
#include "fa3/epilogue.h"
#include "fa3/host.h"
#include "fa3/params.h"
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/wgmma.h"

namespace fa3 {
namespace exercise01 {

// The student copy's stand-in for stage 3 (fa3_lab.student puts a call to it in place of the
// solution): it poisons O with NaN, so an unfinished exercise compiles, runs, and fails loudly.
template <int kSize>
__device__ __forceinline__ void exercise01_stub(float (&o)[kSize]) {
#pragma unroll
  for (int e = 0; e < kSize; ++e) o[e] = __int_as_float(0x7fc00000);  // quiet NaN
}

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
  static constexpr int kSmemBytes = 1024 /*alignment slack*/ + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
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

  auto load_kv = [&](int stage, int n_block) {
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
    wgmma_fence();
    gemm_ss<T, kBlockN, kHeadDim, kBlockM, kBlockN>(s, sQ_addr, wg * 64,
                                                    smem_u32(sK + stage * (Cfg::kKVBytes / sizeof(T))), false);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);

    // 2. mask the tiles that cross seqlen_k or the diagonal
    if (blocks.needs_mask(n_block))
      apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);

    // 3. online softmax; rescale O  (the exercise: Algorithm 1 lines 10–12, see the header)
    // ### BEGIN SOLUTION
    // stub: exercise01_stub(o);  // fills O with NaN so the test fails clearly: delete this line
    float m_new[2] = {softmax.row_max[0], softmax.row_max[1]};
#pragma unroll
    for (int e = 0; e < kBlockN / 2; ++e) m_new[(e % 4) >= 2] = fmaxf(m_new[(e % 4) >= 2], s[e]);
    float offset[2], corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_new[r] = quad_max(m_new[r]);                                     // the quad shares the row
      offset[r] = (m_new[r] == kNegInf) ? 0.f : m_new[r] * p.scale_log2;  // guard −inf − (−inf)
      corr[r] = fast_exp2(softmax.row_max[r] * p.scale_log2 - offset[r]);  // 0 while m_old = −inf
      softmax.row_max[r] = m_new[r];
      softmax.row_sum[r] *= corr[r];
    }
#pragma unroll
    for (int e = 0; e < kBlockN / 2; ++e) {
      const int r = (e % 4) >= 2;
      s[e] = fast_exp2(fmaf(s[e], p.scale_log2, -offset[r]));            // one FFMA + one MUFU.EX2
      softmax.row_sum[r] += s[e];
    }
#pragma unroll
    for (int e = 0; e < kHeadDim / 2; ++e) o[e] *= corr[(e % 4) >= 2];   // O_i ← diag(corr)·O_i
    // ### END SOLUTION

    // 4. P → 16-bit A fragments
    uint32_t pa[kBlockN / 16][4];
    pack_p<Traits, kBlockN>(s, pa);

    // 5. O += P·V_j
    mbarrier_wait(&bar_v[stage], phase);
    wgmma_fence();
    gemm_rs<T, kHeadDim, kBlockN, kBlockN>(o, pa, smem_u32(sV + stage * (Cfg::kKVBytes / sizeof(T))));
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);

    // 6. the stage is free: refill it with tile i + kStages
    __syncthreads();
    if (threadIdx.x == 0 && i + kStages < num_tiles) load_kv(stage, n_block - kStages);
  }

  // 7. epilogue
  float inv_sum[2], lse[2];
  softmax.finalize(p.scale_log2, inv_sum, lse);
  store_o_lse<Traits, T, kHeadDim>(o, inv_sum, lse, o_base, p.o_row_stride, lse_base, row0, p.seqlen_q);
}

template <typename T, int kHeadDim, bool kCausal>
void launch(const FwdParams& p, cudaStream_t stream) {
  using Cfg = Config<T, kHeadDim>;
  const Dtype dt = p.dtype;
  CUtensorMap tq = make_tmap_bshd(p.q, dt, kHeadDim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride, p.q_head_stride,
                                  p.q_batch_stride, kAtomCols16, Cfg::kBlockM);
  CUtensorMap tk = make_tmap_bshd(p.k, dt, kHeadDim, p.seqlen_k, p.nheads_kv, p.batch, p.k_row_stride,
                                  p.k_head_stride, p.k_batch_stride, kAtomCols16, Cfg::kBlockN);
  CUtensorMap tv = make_tmap_bshd(p.v, dt, kHeadDim, p.seqlen_k, p.nheads_kv, p.batch, p.v_row_stride,
                                  p.v_head_stride, p.v_batch_stride, kAtomCols16, Cfg::kBlockN);
  auto kernel = fwd_kernel<T, kHeadDim, kCausal>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
             "cudaFuncSetAttribute(exercise01)");
  dim3 grid(ceil_div_host(p.seqlen_q, Cfg::kBlockM), p.nheads, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tq, tk, tv, p);
  check_cuda(cudaGetLastError(), "exercise01 launch");
}

}  // namespace exercise01

// Entry point used by exercise_binding.cpp: dispatch on dtype × headdim × causal.
void run_fwd_exercise01(const FwdParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (p.headdim) {
      case 64: return p.causal ? exercise01::launch<T, 64, true>(p, stream) : exercise01::launch<T, 64, false>(p, stream);
      case 128: return p.causal ? exercise01::launch<T, 128, true>(p, stream) : exercise01::launch<T, 128, false>(p, stream);
      case 256: return p.causal ? exercise01::launch<T, 256, true>(p, stream) : exercise01::launch<T, 256, false>(p, stream);
      default: throw std::runtime_error("exercise01: headdim must be 64, 128 or 256");
    }
  };
  if (p.dtype == Dtype::kFloat16) by_dim(__half{});
  else if (p.dtype == Dtype::kBFloat16) by_dim(__nv_bfloat16{});
  else throw std::runtime_error("exercise01: dtype must be fp16 or bf16");
}

}  // namespace fa3
