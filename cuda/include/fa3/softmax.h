// fa3/softmax.h — masking and the online softmax on a WGMMA accumulator fragment.
//
// Fragment layout of a 64 × N fp32 accumulator (PTX §9.7.15.5.1, "wgmma D fragment"): thread t of
// the warpgroup (warp w = t/32, lane l = t%32) holds N/2 floats. Element e = 4·c + i of chunk c
// (N/8 chunks of 8 columns) sits at
//     row = 16·w + l/4 + 8·(i >= 2),     col = 8·c + 2·(l % 4) + (i & 1).
// So each thread owns two rows (r0 and r0 + 8) and the four threads of a quad (l/4 equal) share
// them: row reductions are a per-thread loop plus two __shfl_xor_sync within the quad.
//
// Numerics (paper §3.1, Alg. 1 lines 10–12; as FA3's softmax): base 2 with the scale folded in,
//     P = exp2(S·scale_log2 − m·scale_log2)     one FFMA + one MUFU.EX2 per element,
// with scale_log2 = softmax_scale · log2(e). m is the running row max in raw S units. A row that has
// seen only masked keys has m = −inf; subtracting it would give (−inf) − (−inf) = NaN, so such a
// row uses 0 as its offset (every P is exp2(−inf) = 0 and O, ℓ stay 0).
#pragma once
#include <cmath>
#include <cstdint>

namespace fa3 {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Row (within the 64-row warpgroup tile) and column (within the N-wide tile) of fragment element e.
__device__ __forceinline__ int frag_row(int e) { return 16 * ((threadIdx.x % 128) / 32) + (threadIdx.x % 32) / 4 + 8 * ((e % 4) >= 2); }
__device__ __forceinline__ int frag_col(int e) { return 8 * (e / 4) + 2 * (threadIdx.x % 4) + (e & 1); }

// Set S to −inf where key col is past seqlen_k or (causal) past row + causal_offset, with
// causal_offset = seqlen_k − seqlen_q (bottom-right alignment). row0/col0: the tile's first query row
// of this warpgroup and first key column, in sequence coordinates.
template <int kN, bool kCausal>
__device__ __forceinline__ void apply_mask(float (&s)[kN / 2], int row0, int col0, int seqlen_k, int causal_offset) {
  const int r0 = row0 + frag_row(0);
  const int c0 = col0 + 2 * (threadIdx.x % 4);
#pragma unroll
  for (int e = 0; e < kN / 2; ++e) {
    const int row = r0 + 8 * ((e % 4) >= 2);
    const int col = c0 + 8 * (e / 4) + (e & 1);
    bool masked = col >= seqlen_k;
    if constexpr (kCausal) masked |= col > row + causal_offset;
    if (masked) s[e] = kNegInf;
  }
}

// max(m[r], S of row r over this thread's columns), r = 0, 1 (before the quad reduction).
template <int kN>
__device__ __forceinline__ void thread_row_max(const float (&s)[kN / 2], float (&m)[2]) {
#pragma unroll
  for (int c = 0; c < kN / 8; ++c) {
    m[0] = fmaxf(m[0], fmaxf(s[4 * c + 0], s[4 * c + 1]));
    m[1] = fmaxf(m[1], fmaxf(s[4 * c + 2], s[4 * c + 3]));
  }
}

// S → P = exp2(S·scale_log2 − offset[row]) in place (one FFMA + MUFU.EX2 per element); this thread's row
// sums of P into sum.
template <int kN>
__device__ __forceinline__ void exp2_rows(float (&s)[kN / 2], float scale_log2, const float (&offset)[2],
                                          float (&sum)[2]) {
#pragma unroll
  for (int c = 0; c < kN / 8; ++c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = i >> 1;
      s[4 * c + i] = fast_exp2(fmaf(s[4 * c + i], scale_log2, -offset[r]));
      sum[r] += s[4 * c + i];
    }
  }
}

// Running statistics of the two rows this thread holds. row_sum is this thread's partial sum (its
// N/8·2 columns); the quad's partials are added once, in finalize().
struct OnlineSoftmax {
  float row_max[2];
  float row_sum[2];

  __device__ __forceinline__ void init() {
    row_max[0] = row_max[1] = kNegInf;
    row_sum[0] = row_sum[1] = 0.f;
  }

  // S → P in place (fp32, unnormalized); returns corr = exp2((m_old − m_new)·scale_log2) per row,
  // the factor O and ℓ must be rescaled by (paper Alg. 1 line 11).
  template <int kN>
  __device__ __forceinline__ void update(float (&s)[kN / 2], float scale_log2, float (&corr)[2]) {
    float m_new[2] = {row_max[0], row_max[1]};
    thread_row_max<kN>(s, m_new);
    float offset[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_new[r] = quad_max(m_new[r]);
      offset[r] = (m_new[r] == kNegInf) ? 0.f : m_new[r] * scale_log2;  // guard −inf − (−inf)
      corr[r] = fast_exp2(row_max[r] * scale_log2 - offset[r]);         // 0 while row_max = −inf
      row_max[r] = m_new[r];
    }
    float sum[2] = {0.f, 0.f};
    exp2_rows<kN>(s, scale_log2, offset, sum);
    row_sum[0] = row_sum[0] * corr[0] + sum[0];
    row_sum[1] = row_sum[1] * corr[1] + sum[1];
  }

  // update() with a lazily moved max (conditional rescaling, as FlashAttention-4 does on Blackwell): the
  // running max m only moves when the tile's max exceeds it by more than kThreshold in log2 units, so
  // after the first tiles O and ℓ almost never need the rescale. Until it moves, P = exp2(S·scale − m)
  // can reach 2^kThreshold (256 at 8): exact in fp32, the same relative rounding in 16 bits, and O/ℓ
  // and lse = m + log2 ℓ are unchanged (the max is only a shift). Returns whether any row of this
  // warp moved its max (warp-uniform): the caller multiplies O by corr only then; corr is 1 for rows
  // that did not move.
  template <int kN, int kThreshold = 8>
  __device__ __forceinline__ bool update_lazy(float (&s)[kN / 2], float scale_log2, float (&corr)[2]) {
    float m_new[2] = {row_max[0], row_max[1]};
    thread_row_max<kN>(s, m_new);
    float offset[2];
    bool moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_new[r] = quad_max(m_new[r]);
      // row_max = −inf (no key yet) and a finite tile max: the difference is +inf, so the max moves; both
      // −inf: NaN, so it stays −inf (and the row's P stay 0).
      const bool grow = (m_new[r] - row_max[r]) * scale_log2 > static_cast<float>(kThreshold);
      corr[r] = grow ? fast_exp2((row_max[r] - m_new[r]) * scale_log2) : 1.f;  // 0 while row_max = −inf
      if (grow) row_max[r] = m_new[r];
      moved |= grow;
      offset[r] = (row_max[r] == kNegInf) ? 0.f : row_max[r] * scale_log2;
    }
    float sum[2] = {0.f, 0.f};
    exp2_rows<kN>(s, scale_log2, offset, sum);
    row_sum[0] = row_sum[0] * corr[0] + sum[0];
    row_sum[1] = row_sum[1] * corr[1] + sum[1];
    return __any_sync(0xffffffffu, moved);
  }

  // Quad-reduce ℓ; return 1/ℓ (0 for a row that saw no key) and write the natural-log lse
  // (+inf for such a row, as FlashAttention).
  __device__ __forceinline__ void finalize(float scale_log2, float (&inv_sum)[2], float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[r]);
      const bool empty = (l == 0.f) || (l != l);
      inv_sum[r] = empty ? 0.f : 1.f / l;
      lse[r] = empty ? INFINITY : (row_max[r] * scale_log2 + __log2f(l)) * kLn2;
    }
  }
};

// Online softmax whose scale changes from tile to tile (FP8: S is descaled by sq_i·sk_j per tile), so
// the running max is kept in scaled log2 units: m = max(m, rowmax(S)·scale_log2) (scale > 0, so the
// max of the raw scores suffices), P = exp2(S·scale_log2 − m + bias) — still one FFMA + MUFU.EX2.
// bias = kPLog2Scale (8) makes P ≤ 2^8, using e4m3's relative precision; it cancels in O/ℓ and is
// taken out of lse. Same contract as reference.fp8.fp8_attention, steps 4 and 6.
struct OnlineSoftmaxScaled {
  float row_max[2];  // scaled log2 units
  float row_sum[2];
  __device__ __forceinline__ void init() {
    row_max[0] = row_max[1] = kNegInf;
    row_sum[0] = row_sum[1] = 0.f;
  }
  template <int kN>
  __device__ __forceinline__ void update(float (&s)[kN / 2], float scale_log2, float bias, float (&corr)[2]) {
    float m_tile[2] = {kNegInf, kNegInf};
    thread_row_max<kN>(s, m_tile);
    float offset[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mt = quad_max(m_tile[r]);
      const float m_new = fmaxf(row_max[r], mt == kNegInf ? kNegInf : mt * scale_log2);
      offset[r] = (m_new == kNegInf) ? 0.f : m_new;         // guard −inf − (−inf)
      corr[r] = fast_exp2(row_max[r] - offset[r]);            // 0 while row_max = −inf
      row_max[r] = m_new;
      offset[r] -= bias;
    }
    float sum[2] = {0.f, 0.f};
    exp2_rows<kN>(s, scale_log2, offset, sum);
    row_sum[0] = row_sum[0] * corr[0] + sum[0];
    row_sum[1] = row_sum[1] * corr[1] + sum[1];
  }
  __device__ __forceinline__ void finalize(float bias, float (&inv_sum)[2], float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[r]);
      const bool empty = (l == 0.f) || (l != l);
      inv_sum[r] = empty ? 0.f : 1.f / l;
      lse[r] = empty ? INFINITY : (row_max[r] - bias + __log2f(l)) * kLn2;
    }
  }
};

// Two fp32 → two e4m3 bytes (saturating, like reference.fp8.to_e4m3): lo byte = lo.
__device__ __forceinline__ uint32_t pack_e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// P (fp32 accumulator fragment, 64 × kN) → e4m3 A fragments of m64k32 WGMMAs. The 8-bit A layout wants
// 4 consecutive k per register (k = 4·(lane%4) + j, and +16), but the accumulator gives each thread
// columns 2·(lane%4) + {0,1} of every 8-wide chunk. Instead of shuffling P across lanes, the k index is
// reinterpreted: register byte j of a0 holds S column 8·(j/2) + 2·(lane%4) + j%2, and V's keys are
// permuted the same way when it is laid out for the kernel (fa3_lab.fp8.kernel_v_layout, PERM), so
// Σ_k P[:, k]·V[k, :] is unchanged.
template <int kN>
__device__ __forceinline__ void pack_p_e4m3(const float (&p)[kN / 2], uint32_t (&a)[kN / 32][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 32; ++kk) {
    const float* c0 = p + 16 * kk;  // chunks 4kk .. 4kk+3, 4 floats each
    a[kk][0] = pack_e4m3x2(c0[0], c0[1]) | (pack_e4m3x2(c0[4], c0[5]) << 16);      // row g
    a[kk][1] = pack_e4m3x2(c0[2], c0[3]) | (pack_e4m3x2(c0[6], c0[7]) << 16);      // row g + 8
    a[kk][2] = pack_e4m3x2(c0[8], c0[9]) | (pack_e4m3x2(c0[12], c0[13]) << 16);    // row g, k + 16
    a[kk][3] = pack_e4m3x2(c0[10], c0[11]) | (pack_e4m3x2(c0[14], c0[15]) << 16);  // row g + 8, k + 16
  }
}

// O (64 × kN fragment) *= per-row factor.
template <int kN>
__device__ __forceinline__ void rescale_rows(float (&o)[kN / 2], const float (&f)[2]) {
#pragma unroll
  for (int e = 0; e < kN / 2; ++e) o[e] *= f[(e % 4) >= 2];
}

// The accumulator layout of S (columns = keys) is exactly the A-operand register layout of the next
// m64nNk16 WGMMA for 16-bit types: k-slice kk (16 keys) = chunks 2kk and 2kk+1, packed in pairs.
template <typename Traits, int kN>
__device__ __forceinline__ void pack_p(const float (&p)[kN / 2], uint32_t (&a)[kN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    a[kk][0] = Traits::pack(p[8 * kk + 0], p[8 * kk + 1]);  // row r0,     keys 16kk + 2q, +1
    a[kk][1] = Traits::pack(p[8 * kk + 2], p[8 * kk + 3]);  // row r0 + 8
    a[kk][2] = Traits::pack(p[8 * kk + 4], p[8 * kk + 5]);  // row r0,     keys 16kk + 8 + 2q, +1
    a[kk][3] = Traits::pack(p[8 * kk + 6], p[8 * kk + 7]);  // row r0 + 8
  }
}

}  // namespace fa3
