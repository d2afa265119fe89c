// fa3/block_info.h — which K/V tiles a CTA visits, and which of them need a mask.
//
// Causal masks are bottom-right aligned: query row i sees key j iff j <= i + (seqlen_k − seqlen_q).
// A CTA of rows [m_block·kBlockM, (m_block+1)·kBlockM) therefore needs keys below
// (m_block+1)·kBlockM + seqlen_k − seqlen_q; tiles past that are skipped entirely (paper §3, FA2 §3.1).
// Tiles are visited from n_block_max − 1 down to 0, so the ones that need a mask come first.
#pragma once

namespace fa3 {

template <int kBlockM, int kBlockN, bool kCausal>
struct BlockInfo {
  int n_block_max;    // tiles [0, n_block_max) are visited
  int m_block;
  int causal_offset;  // seqlen_k − seqlen_q
  int seqlen_k;

  __device__ __forceinline__ BlockInfo(int m_block_, int seqlen_q, int seqlen_k_)
      : m_block(m_block_), causal_offset(seqlen_k_ - seqlen_q), seqlen_k(seqlen_k_) {
    n_block_max = (seqlen_k + kBlockN - 1) / kBlockN;
    if constexpr (kCausal) {
      const int end = (m_block + 1) * kBlockM + causal_offset;  // first key no row of this CTA sees
      n_block_max = min(n_block_max, end <= 0 ? 0 : (end + kBlockN - 1) / kBlockN);
    }
  }
  // Does tile n_block contain a key past seqlen_k, or a key past the diagonal for some row?
  __device__ __forceinline__ bool needs_mask(int n_block) const {
    const bool crosses_end = (n_block + 1) * kBlockN > seqlen_k;
    const bool crosses_diag = kCausal && (n_block + 1) * kBlockN - 1 > m_block * kBlockM + causal_offset;
    return crosses_end || crosses_diag;
  }
};

}  // namespace fa3
