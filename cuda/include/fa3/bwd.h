// fa3/bwd.h — device code the backward series (cuda/steps/bwd/) shares (its parameters: bwd_params.h): the
// 1-D bulk copy of the lse/D rows, the dSᵀ store into a swizzled tile, the dQ accumulation and the GEMM forms.
#pragma once
#include <cstdint>

#include "bwd_params.h"
#include "ptx.h"
#include "wgmma.h"
#include "wgmma_bwd.h"

namespace fa3 {

// ---------------------------------------------------------------- 1-D bulk copy (PTX §9.7.9.25.4.1)
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory, counted on `bar`.
__device__ __forceinline__ void bulk_load_1d(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_u32(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(gmem_src)), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

// ---------------------------------------------------------------- 1-D bulk reduction (PTX §9.7.9.25.4.2)
// global[dst..] += smem[src..], `bytes` of fp32 (a multiple of 16, both 16-byte aligned), each element added
// atomically in L2; tracked in the issuing thread's bulk async-group (bulk_commit, bulk_wait_read / bulk_wait).
__device__ __forceinline__ void bulk_reduce_add_f32(float* gmem_dst, const float* smem_src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(
                   reinterpret_cast<uint64_t>(gmem_dst)),
               "r"(smem_u32(smem_src)), "r"(bytes)
               : "memory");
}
// Order this thread's async-proxy global accesses (a completed bulk reduction) before its later generic ones.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// ---------------------------------------------------------------- acquire/release on a global int
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// ---------------------------------------------------------------- GEMM forms of the backward
// D(64 × kN) (+)= A(64 × kK) · B(kK × kN), both from smem MN-major (A stored as Aᵀ: kK rows of 64 contiguous
// M-elements; B stored kK rows × kN contiguous, in 64-column atoms kRowsB·128 bytes apart).
template <typename T, int kN, int kK, int kRowsA, int kRowsB>
__device__ __forceinline__ void gemm_ss_tt(float (&acc)[kN / 2], uint32_t a_base, uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    WgmmaSSTT<kN, typename ElemTraits<T>::Tag>::run(acc, desc_mnmajor<kRowsA>(a_base, kk), desc_mnmajor<kRowsB>(b_base, kk),
                                                    kk > 0 ? 1 : 0);
}

// D(64 × kN) (+)= A(64 × kK) · B(kK × kN): A from smem MN-major (stored as Aᵀ: kK rows of 64 contiguous
// M-elements, kRowsA rows per atom), B from smem K-major (kN rows of kK contiguous elements in 64-column atoms
// of kRowsB rows) — step 16's dQᵀ = Kᵀ·dSᵀ: A = K_j as stored, B = dS as stored by store_frag_transposed.
template <typename T, int kN, int kK, int kRowsA, int kRowsB>
__device__ __forceinline__ void gemm_ss_ta(float (&acc)[kN / 2], uint32_t a_base, uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    WgmmaSSTA<kN, typename ElemTraits<T>::Tag>::run(acc, desc_mnmajor<kRowsA>(a_base, kk), desc_kmajor<kRowsB>(b_base, 0, kk),
                                                    kk > 0 ? 1 : 0);
}

// Byte offset of 16-bit element (row, col) in a tile of kRows rows stored as 64-column, 128-byte-swizzled
// atoms (the TMA layout of wgmma.h): atom col/64, row r at r·128, 16-byte chunk (col%64)/8 XOR r%8.
template <int kRows>
__device__ __forceinline__ uint32_t swizzled_offset(int row, int col) {
  const int chunk = ((col % kAtomCols16) / 8) ^ (row % 8);
  return (col / kAtomCols16) * (kRows * kSwizzleBytes) + row * kSwizzleBytes + chunk * 16 + (col % 8) * 2;
}

// A 64 × kN accumulator fragment, already packed to 16-bit A-operand registers (pack_p's layout:
// a[kk][0] = row r0, cols 16kk + 2q, +1; [1] row r0 + 8; [2] row r0, cols +8; [3] row r0 + 8, cols +8),
// stored as rows row0 + (0..63) of a (kRows × kN) swizzled smem tile: one 32-bit store per register.
template <int kRows, int kN>
__device__ __forceinline__ void store_frag_swizzled(const uint32_t (&a)[kN / 16][4], uint32_t tile_base, int row0) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const int r0 = row0 + 16 * warp + lane / 4, c0 = 2 * (lane % 4);
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = r0 + 8 * (j & 1), col = 16 * kk + 8 * (j >> 1) + c0;
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(tile_base + swizzled_offset<kRows>(row, col)), "r"(a[kk][j])
                   : "memory");
    }
}

// The same store by stmatrix: one instruction per k-slice instead of four 32-bit stores (lane 8·m + i addresses row
// row0 + 16·warp + 8·(m % 2) + i, columns col0 + 16kk + 8·(m / 2) .. + 7: register m of a[kk] is matrix m).
template <int kRows, int kN>
__device__ __forceinline__ void store_frag_stmatrix(const uint32_t (&a)[kN / 16][4], uint32_t tile_base, int row0,
                                                    int col0 = 0) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32, mat = lane / 8;
  const int row = row0 + 16 * warp + lane % 8 + 8 * (mat % 2);
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
    stmatrix_x4(tile_base + swizzled_offset<kRows>(row, col0 + 16 * kk + 8 * (mat / 2)), a[kk][0], a[kk][1], a[kk][2],
                a[kk][3]);
}

// The inverse: the A fragments (rows row0 + (0..63) × kK columns, pack_p's layout) of a K-major (kRows × kK) swizzled
// tile, by ldmatrix — the backward's K_j rows of this warpgroup, loaded once per CTA (step 22).
template <int kRows, int kK>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[kK / 16][4], uint32_t tile_base, int row0) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const int row = row0 + 16 * warp + lane % 8 + 8 * ((lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) ldmatrix_x4(tile_base + swizzled_offset<kRows>(row, 16 * kk + 8 * (lane / 16)), a[kk]);
}

// The same fragment (64 rows × kN columns: this warpgroup's keys × the m_block's queries) stored TRANSPOSED into
// a (kRows queries × keys) swizzled tile, the keys at columns col0 + (0..63): element (key r, query c) at row c,
// column col0 + r. One stmatrix .trans per k-slice: lane 8·m + i addresses query 16kk + 8·(m / 2) + i, keys
// col0 + 16·warp + 8·(m % 2) .. + 7 (register m of a[kk] is matrix m: keys + 8·(m % 2), queries + 8·(m / 2)).
template <int kRows, int kN>
__device__ __forceinline__ void store_frag_transposed(const uint32_t (&a)[kN / 16][4], uint32_t tile_base, int col0) {
  const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32, mat = lane / 8;
  const int col = col0 + 16 * warp + 8 * (mat % 2);
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    const int row = 16 * kk + 8 * (mat / 2) + lane % 8;
    stmatrix_x4_trans(tile_base + swizzled_offset<kRows>(row, col), a[kk][0], a[kk][1], a[kk][2], a[kk][3]);
  }
}

}  // namespace fa3
