// fa3/epilogue.h — write O = O_acc / ℓ (16-bit) and lse (fp32) for one warpgroup's 64 rows.
#pragma once
#include <cstdint>

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
