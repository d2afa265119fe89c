// fa3/wgmma.h — shared-memory matrix descriptors and typed WGMMA entry points.
//
// Tiles live in shared memory in TMA's 128-byte-swizzle layout: a tile of R rows × D columns of
// 16-bit elements is stored as D/64 "atoms" of (R, 64) elements, each row 128 bytes, the 16-byte
// chunks of row r XOR-permuted by (r % 8). Atoms are 1024-byte aligned.
//
// Descriptor (PTX §9.7.15.5.1, "matrix descriptor"), 64 bits:
//   [0,14)  start address >> 4       [16,30) leading-dimension byte offset >> 4 (LBO)
//   [32,46) stride-dimension byte offset >> 4 (SBO)      [62,64) swizzle mode (1 = 128B)
// K-major operand (Q, K: contraction dim contiguous): 8-row groups are SBO = 1024 bytes apart; LBO is
//   unused; step k (16 elements = 32 bytes) moves the start address by 32 bytes inside the atom and
//   to the next atom every 64 elements.
// MN-major operand (V as stored, keys × headdim, used as B of P·V with tnspB = 1): 64 contiguous
//   elements along N per atom, atoms LBO = R·128 bytes apart; along K (keys) 8-row groups are
//   SBO = 1024 bytes apart; step k (16 keys) moves the start address by 16 rows = 2048 bytes.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ptx.h"
#include "wgmma_ops.h"

namespace fa3 {

constexpr int kSwizzleBytes = 128;         // TMA/WGMMA swizzle width
constexpr int kAtomCols16 = 64;            // 16-bit elements per 128-byte row of an atom
constexpr int kCoreGroupBytes = 8 * 128;   // 8 rows of 128 bytes: one swizzle period (SBO)
constexpr uint64_t kDescSwizzle128 = 1ull << 62;

__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo_bytes & 0x3FFFF) >> 4) << 32) | kDescSwizzle128;
}

// Element type → WGMMA type tag, 16-bit pack and unpack (two packed values back to fp32, exact).
template <typename T> struct ElemTraits;
template <> struct ElemTraits<__half> {
  using Tag = wg_f16;
  __device__ static inline uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x = lo is the lower 16 bits
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static inline float2 unpack(uint32_t x) { return __half22float2(*reinterpret_cast<__half2*>(&x)); }
};
template <> struct ElemTraits<__nv_bfloat16> {
  using Tag = wg_bf16;
  __device__ static inline uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static inline float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
};

// The descriptor of an address `bytes` further on: the start address sits in the low 14 bits as
// address >> 4, and shared-memory addresses stay below 2^18, so the offset is a 32-bit add on the low
// word that never carries into the LBO field. Each k-slice's descriptor is therefore the tile's first
// descriptor plus a compile-time constant — one add (uniform datapath when the base is warp-uniform)
// instead of re-deriving the whole descriptor from the address for every WGMMA.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4), hi = static_cast<uint32_t>(desc >> 32);
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// A K-major tile (rows × kCols, 16-bit) at smem address `base`: descriptor of its 16-wide k-slice kk,
// starting at row `row0` (a multiple of 8).
template <int kRows>
__device__ __forceinline__ uint64_t desc_kmajor(uint32_t base, int row0, int kk) {
  const uint32_t atom = kk / 4, within = kk % 4;  // 4 k-slices of 16 per 64-column atom
  return desc_advance(make_desc(base + row0 * kSwizzleBytes, 16, kCoreGroupBytes),
                      atom * (kRows * kSwizzleBytes) + within * 32);
}

// An MN-major tile (kRows keys × headdim, 16-bit) used as B with tnspB = 1: k-slice kk of 16 keys.
template <int kRows>
__device__ __forceinline__ uint64_t desc_mnmajor(uint32_t base, int kk) {
  return desc_advance(make_desc(base, kRows * kSwizzleBytes, kCoreGroupBytes), kk * 16 * kSwizzleBytes);
}

// ---- FP8 (e4m3, one byte per element): K = 32 per instruction, both smem operands K-major.
// A row of kSw bytes (kSw = 128, or 64 for headdim 64) is one swizzle atom; a k-slice is 32 bytes.
constexpr uint64_t kDescSwizzle64 = 2ull << 62;
template <int kRows, int kSw>
__device__ __forceinline__ uint64_t desc_kmajor_u8(uint32_t base, int row0, int kk) {
  constexpr int kSlicesPerAtom = kSw / 32;
  const uint32_t atom = kk / kSlicesPerAtom, within = kk % kSlicesPerAtom;
  const uint32_t addr = base + row0 * kSw;
  const uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
                     (static_cast<uint64_t>((8 * kSw) >> 4) << 32);
  return desc_advance(d | (kSw == 64 ? kDescSwizzle64 : kDescSwizzle128), atom * (kRows * kSw) + within * 32);
}

// S(64 × kN) = Q(64 × kK) · K(kN × kK)ᵀ, e4m3 from smem, fp32 accumulators.
template <int kN, int kK, int kRowsA, int kRowsB, int kSw>
__device__ __forceinline__ void gemm_ss_e4m3(float (&acc)[kN / 2], uint32_t a_base, int a_row0, uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < kK / 32; ++kk)
    WgmmaSSe4m3<kN>::run(acc, desc_kmajor_u8<kRowsA, kSw>(a_base, a_row0, kk), desc_kmajor_u8<kRowsB, kSw>(b_base, 0, kk),
                         kk > 0 ? 1 : 0);
}

// O(64 × kN) += P(64 × kK, e4m3 registers) · Vᵀ(kN × kK, smem, K-major 128-byte rows).
template <int kN, int kK>
__device__ __forceinline__ void gemm_rs_e4m3(float (&acc)[kN / 2], const uint32_t (&a)[kK / 32][4], uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < kK / 32; ++kk)
    WgmmaRSe4m3<kN>::run(acc, a[kk], desc_kmajor_u8<kN, 128>(b_base, 0, kk), 1);
}

// S(64 × kN) = A(64 × kK, smem) · B(kN × kK, smem)ᵀ — all k-slices, one commit group.
template <typename T, int kN, int kK, int kRowsA, int kRowsB>
__device__ __forceinline__ void gemm_ss(float (&acc)[kN / 2], uint32_t a_base, int a_row0, uint32_t b_base,
                                        bool accumulate) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    WgmmaSS<kN, typename ElemTraits<T>::Tag>::run(acc, desc_kmajor<kRowsA>(a_base, a_row0, kk),
                                                  desc_kmajor<kRowsB>(b_base, 0, kk),
                                                  (accumulate || kk > 0) ? 1 : 0);
  }
}

// O(64 × kN) += P(64 × kK, registers) · V(kK × kN, smem MN-major).
template <typename T, int kN, int kK, int kRowsB>
__device__ __forceinline__ void gemm_rs(float (&acc)[kN / 2], const uint32_t (&a)[kK / 16][4], uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    WgmmaRS<kN, typename ElemTraits<T>::Tag, 1>::run(acc, a[kk], desc_mnmajor<kRowsB>(b_base, kk), 1);
  }
}

// S(64 × kN) = A(64 × kK, registers) · B(kN × kK, smem K-major)ᵀ — the backward's Sᵀ = K_j·Q_iᵀ with K_j's rows
// in registers (load_a_frag), Q_i as stored (kRowsB rows per 64-column atom).
template <typename T, int kN, int kK, int kRowsB>
__device__ __forceinline__ void gemm_rs_kmajor(float (&acc)[kN / 2], const uint32_t (&a)[kK / 16][4], uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    WgmmaRS<kN, typename ElemTraits<T>::Tag, 0>::run(acc, a[kk], desc_kmajor<kRowsB>(b_base, 0, kk), kk > 0 ? 1 : 0);
}

}  // namespace fa3
