// fa3/epilogue.h — write O = O_acc / ℓ (16-bit) and lse (fp32) for one warpgroup's 64 rows.
#pragma once
#include <cstdint>

#include "ptx.h"
#include "softmax.h"

namespace fa3 {

// o_base points at (batch b, row 0, head h, col 0); row0 is this warpgroup's first query row.
// Each thread stores its 2 rows × kHeadDim/8 pairs of adjacent columns (4-byte stores); rows past
// seqlen_q are skipped. lse_base points at lse[b, h, 0].
template <typename Traits, typename T, int kHeadDim>
__device__ __forceinline__ void store_o_lse(const float (&o)[kHeadDim / 2], const float (&inv_sum)[2],
                                            const float (&lse)[2], T* o_base, int64_t o_row_stride,
                                            float* lse_base, int row0, int seqlen_q) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + frag_row(2 * r);
    if (row >= seqlen_q) continue;
    T* dst = o_base + row * o_row_stride + 2 * (lane % 4);
#pragma unroll
    for (int c = 0; c < kHeadDim / 8; ++c) {
      const uint32_t v = Traits::pack(o[4 * c + 2 * r] * inv_sum[r], o[4 * c + 2 * r + 1] * inv_sum[r]);
      *reinterpret_cast<uint32_t*>(dst + 8 * c) = v;
    }
    if (lane % 4 == 0) lse_base[row] = lse[r];
  }
}

// The TMA-store epilogue (as FA3's): O / ℓ in 16 bits into this warpgroup's smem tile `s_o` (64 rows ×
// kHeadDim, kHeadDim/64 atoms of 64 × 64 elements, each 8 KB with the 128-byte swizzle TMA expects: the 16-byte
// chunk k of row r sits at chunk k ^ (r % 8)), by stmatrix — kHeadDim/16 instructions per thread where
// store_o_lse issues kHeadDim/4 global stores of 4 bytes, each touching 8 rows. The caller then fences,
// syncs the warpgroup and one thread stores the atoms with tma_store_4d.
template <typename Traits, int kHeadDim>
__device__ __forceinline__ void write_o_smem(const float (&o)[kHeadDim / 2], const float (&inv_sum)[2], uint32_t s_o) {
  const int lane = threadIdx.x % 32, mat = lane / 8;
  const int row = 16 * ((threadIdx.x % 128) / 32) + lane % 8 + 8 * (mat & 1);  // the row this lane addresses
#pragma unroll
  for (int j = 0; j < kHeadDim / 16; ++j) {  // 8-column chunks 2j, 2j + 1; rows r0 (i < 2) and r0 + 8
    const int chunk = 2 * j + (mat >> 1);
    const uint32_t addr = s_o + (chunk / 8) * 8192 + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
    stmatrix_x4(addr, Traits::pack(o[8 * j + 0] * inv_sum[0], o[8 * j + 1] * inv_sum[0]),
                Traits::pack(o[8 * j + 2] * inv_sum[1], o[8 * j + 3] * inv_sum[1]),
                Traits::pack(o[8 * j + 4] * inv_sum[0], o[8 * j + 5] * inv_sum[0]),
                Traits::pack(o[8 * j + 6] * inv_sum[1], o[8 * j + 7] * inv_sum[1]));
  }
}

// lse only (the TMA-store epilogue writes O separately; store_o_lse writes it beside O, in the same row loop).
__device__ __forceinline__ void store_lse(const float (&lse)[2], float* lse_base, int row0, int seqlen_q) {
  if (threadIdx.x % 4 != 0) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + frag_row(2 * r);
    if (row < seqlen_q) lse_base[row] = lse[r];
  }
}

// A CTA whose query rows see no key at all (causal, seqlen_q > seqlen_k): O = 0, lse = +inf.
// By default the whole CTA writes rows [row_begin, row_end); tid/nthreads let one warpgroup do its own.
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_empty_rows(T* o_base, int64_t o_row_stride, float* lse_base, int row_begin,
                                                 int row_end, int seqlen_q, int tid = threadIdx.x,
                                                 int nthreads = blockDim.x) {
  row_end = min(row_end, seqlen_q);
  for (int idx = tid; idx < (row_end - row_begin) * (kHeadDim / 2); idx += nthreads) {
    const int row = row_begin + idx / (kHeadDim / 2), col = 2 * (idx % (kHeadDim / 2));
    *reinterpret_cast<uint32_t*>(o_base + row * o_row_stride + col) = 0u;
  }
  for (int row = row_begin + tid; row < row_end; row += nthreads) lse_base[row] = INFINITY;
}

}  // namespace fa3
