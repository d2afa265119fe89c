// fa3/bwd_passes.h — the passes and helpers backward steps 19–25 (cuda/steps/bwd/) share unchanged: the preprocess,
// the CTA order of the main kernel's 1-D grid and the dQ turn, the GQA dK/dV reduction, the host's grid size and
// its GQA choice (heads per CTA, steps 22 on).
// Steps 17 and 18, which introduce them, keep their own copies (the lesson of their diffs).
#pragma once
#include <cstdint>

#include "bwd_params.h"
#include "host.h"     // ceil_div_host
#include "launch.h"   // sm_count
#include "softmax.h"  // kLog2e
#include "wgmma.h"    // ElemTraits

namespace fa3 {

// ---------------------------------------------------------------- preprocess
// Step 17's preprocess (torch builds with __CUDA_NO_HALF_CONVERSIONS__: 16-bit → float by ElemTraits::unpack).
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
// Step 18's tile order, with step 21's heads_per_cta (steps 18–20 keep step 18's tile_of, one query head per CTA).
// The (n_block, h, b) of CTA t of the 1-D grid. Non-causal: step 17's order (n_block fastest, one head's CTAs side
// by side). Causal: groups of heads_per_group (b, h) heads, and inside a group n_block by n_block — n_block 0 (the
// most m_blocks) of every head of the group, then n_block 1, ...: longest first. Deterministic causal: shortest first,
// the order in which the n_blocks add to dq_accum (dq_turn). A CTA walks heads_per_cta consecutive query heads (one
// KV head's, step 21's GQA group; 1 without it): the (b, h) slots are nheads / heads_per_cta per batch.
struct Tile {
  int n_block, h, b;
};
template <bool kCausal>
__device__ __forceinline__ Tile tile_of(int t, const BwdParams& p, int num_n_blocks, int heads_per_group,
                                        int heads_per_cta) {
  const int slots = p.nheads / heads_per_cta;  // a CTA's query heads: heads_per_cta consecutive ones, one KV head's
  int n_block, bh;
  if constexpr (kCausal) {
    const int group = t / (heads_per_group * num_n_blocks), r = t % (heads_per_group * num_n_blocks);
    const int heads = min(heads_per_group, p.batch * slots - group * heads_per_group);  // the last group: the rest
    n_block = r / heads, bh = group * heads_per_group + r % heads;
    if (p.deterministic) n_block = num_n_blocks - 1 - n_block;
  } else {
    n_block = t % num_n_blocks, bh = t / num_n_blocks;
  }
  return {n_block, bh % slots * heads_per_cta, bh / slots};  // h: the CTA's first query head
}

// Step 18's dq_turn: this n_block's turn to add to m_block's dq_accum rows in deterministic mode (its semaphore
// counts the adds done). Non-causal: n_block order. Causal: the reverse — the last n_block that sees m_block goes
// first; it reaches m_block first (its first m_block is m_block or just below), and each lower n_block one diagonal
// tile later: no waiting.
template <bool kCausal, int kBlockM, int kBlockN>
__device__ __forceinline__ int dq_turn(int n_block, int m_block, int num_n_blocks, int causal_offset) {
  if constexpr (!kCausal) return n_block;
  const int last = min(num_n_blocks - 1, ((m_block + 1) * kBlockM - 1 + causal_offset) / kBlockN);
  return last - n_block;
}

// ---------------------------------------------------------------- postprocess
// Step 11's postprocess of dK, dV under GQA: dK, dV (batch, seqlen_k, nheads_kv, headdim) = Σ over the group's query
// heads of the fp32 slices (a fixed order: deterministic), → input dtype. 2 elements per thread.
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
// Step 11's grid of the grid-stride passes: 256-thread blocks for `items` threads' work, at most 65536.
inline int grid_stride_blocks(int64_t items) {
  const int64_t blocks = (items + 255) / 256;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// Step 21's GQA choice (steps 22 on): how many query heads a CTA walks — the whole group of its KV head (dK, dV
// summed in registers, stored in 16 bits: no fp32 slices, no reduction pass) when that still gives every SM two CTAs
// of block_n keys; else one (n_blocks × batch × nheads_kv CTAs would leave SMs idle), and the fp32 slices are summed
// by postprocess_dkv_kernel.
inline int heads_per_cta_of(const BwdParams& p, int block_n) {
  const int group = p.nheads / p.nheads_kv;
  const int64_t kv_tiles = int64_t(ceil_div_host(p.seqlen_k, block_n)) * p.nheads_kv * p.batch;
  return group > 1 && kv_tiles >= 2 * sm_count() ? group : 1;
}

}  // namespace fa3
