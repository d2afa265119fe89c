// ============================================================================================
// fa3-lab — FP8 inputs for step 05 (cuda/steps/05_fp8.cu) in one pass: rotate, block-quantize,
// lay V out. Not a step of the progression; it feeds the last one.
// ============================================================================================
//
// Paper §3.3, "Block quantization" and "Incoherent processing": before the FP8 forward, Q and K
// are rotated by M = diag(s)·H/√d (random signs s, Walsh–Hadamard H, so (QM)(KM)ᵀ = QKᵀ) and
// Q, K, V are quantized to e4m3 with one float32 scale per tile of 128 rows. fa3_lab.fp8.quantize
// does this in torch, a pass over memory per elementwise op, and fa3_lab.fp8.kernel_v_layout then
// copies V once more into the layout step 05 reads. This file reads the 16-bit inputs once and
// writes the e4m3 outputs once.
//
// Contract: what fa3_lab.fp8.quantize computes on a CUDA tensor (its float32 path), followed by
// kernel_v_layout on its V, bit for bit by design (the same float32 operations in the same order;
// tests/test_fp8_quantize.py checks it on the GPU). Per (tensor, batch, head, 128-row block):
//   1. x = float(input). If rotated (Q, K with incoherent=True): x ← x·s (a sign flip), the
//      butterflies (a, b) → (a + b, a − b) for h = 1, 2, 4, …, d/2 in that order (as
//      fa3_lab.fp8._fwht), then x ← x · fl32(1 / fl32(√d)): torch evaluates `cuda tensor / python
//      float` as a product with the float32 reciprocal, so that is what is reproduced.
//   2. amax = max |x| over the tile (rows past seqlen count as 0). scale = fl32(fl64(amax) ·
//      fl64(1/448)) (torch's float64 `amax.double() / 448`, again a reciprocal product), 1 when
//      amax = 0. Per tensor (block_quant=False): the amax of the whole tensor instead.
//   3. x8 = e4m3(clamp(x / scale, ±448)), x / scale an IEEE float32 division, the cast
//      round-to-nearest-even (cvt.rn.satfinite).
// Outputs: q8 (batch, seqlen_q, nheads, d), k8 (batch, seqlen_k, nheads_kv, d) e4m3 contiguous;
// vt8 (batch, nheads_kv, d, seqlen_k_pad) e4m3, seqlen_k_pad = ceil(seqlen_k/128)·128, stored
// column 32g + p holding key 32g + PERM[p] (fa3_lab.fp8.PERM), padding +0; descales
// (batch, heads, ceil(seqlen/128)) float32. status[3] gets bit i set when input i (q, k, v) holds
// an inf or NaN; that tile's scale is then NaN, so nothing downstream can look valid.
//
// One CTA per (tensor, batch, row block, head), 2·d threads; grid = Q tiles, then K, then V.
// Thread (s, c), s = tid / (d/16) ∈ 0..31, c = tid % (d/16), holds elements 16c … 16c+15 of the
// four rows k0 + {0, 1, 8, 9}, k0 = 32·(s/8) + 16·((s/4)%2) + 2·(s%4): exactly the four keys
// that PERM stores in columns 4s … 4s+3 of a vt8 row, so the thread's four e4m3 values of one
// dim are one 32-bit word of vt8. Stages:
//   1. load: two 16-byte loads per row (one element at a time when the base or a stride is not
//      16-byte aligned); inf/NaN flagged from the raw bits.
//   2. rotate (Q, K): sign flips; butterflies h = 1..8 inside the thread's 16 elements; then
//      h = 16 … d/2 across the d/16 lanes of the row (shfl.xor), one FFMA with ±1 each.
//   3. tile amax: thread → warp (shfl) → CTA (shared memory, __syncthreads_or for the flags).
//   4. quantize and store. Q, K: one 16-byte store per row. V: the words go through shared
//      memory (XOR-swizzled, no bank conflicts either way) so each warp stores 128 contiguous
//      bytes of a vt8 row. Per tensor: a first launch does 1–3 and an atomicMax on the amax's
//      bits (the order of non-negative floats), the second redoes 1–2 and quantizes.
// Measured: not yet recorded (fa3_lab.fp8.time_quantize_vs_kernel, `python -m fa3_lab bench
// --fp8`, key quantize_ms). Known limits: the cross-lane butterflies cost one shuffle per element
// per stage (2, 3, 4 stages for d = 64, 128, 256), and the IEEE division about eight
// instructions, so d = 256 leans toward issue-bound rather than memory-bound; per-tensor mode
// reads the inputs twice.
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fa3 {
namespace fp8_quantize {

constexpr int kBlockRows = 128;              // rows per descale = step 05's kBlockM = kBlockN
constexpr int kElems = 16;                   // elements of a row per thread: two 16-byte loads
constexpr int kRows = 4;                     // rows per thread: keys k0 + {0, 1, 8, 9}
constexpr int kWordsPerRow = kBlockRows / 4; // 32-bit words of one vt8 row within a tile
constexpr int kMaxHeadDim = 256;
constexpr int kTensors = 3;                  // q, k, v
constexpr int kFlagsWord = kTensors;         // status[kFlagsWord]: bit i = input i has inf/NaN
constexpr float kE4M3Max = 448.f;            // largest finite e4m3fn
constexpr double kInvE4M3Max = 1.0 / 448.0;  // torch: amax.double() / 448 → amax · (1/448)
constexpr uint32_t kNaNBits = 0x7fffffffu;   // a NaN above every non-negative float's bits (atomicMax)
constexpr uint32_t kAbs2 = 0x7fff7fffu;      // |·| of two packed 16-bit floats

enum class Mode { kBlockScale, kAmaxOnly, kTensorScale };

struct TensorArgs {
  const uint16_t* src;                  // (batch, seqlen, nheads, d) fp16/bf16, last dim contiguous
  int64_t stride_b, stride_s, stride_h; // in elements
  uint8_t* dst;                         // e4m3: BSHD contiguous, or vt8 (batch, nheads, d, seqlen_pad)
  float* descale;                       // (batch, nheads, nblocks) fp32
  int seqlen, nheads, nblocks;
  int tile_begin;                       // this tensor's first CTA
  bool rotate;                          // incoherent processing (Q, K)
  bool transposed;                      // V: write step 05's layout
  bool vec_ok;                          // base and strides 16-byte aligned: vector loads
};

struct Params {
  TensorArgs t[kTensors];
  uint32_t sign_bits[kMaxHeadDim / 32]; // bit e set ⇔ s[e] = −1
  float inv_sqrt_d;                     // fl32(1 / fl32(√d))
  uint32_t* status;                     // [0..2] amax bits per tensor (per-tensor mode), [3] flags
};

template <typename T>
struct Input;

template <>
struct Input<__half> {
  static constexpr uint32_t kInfBits = 0x7c00;  // |bits| >= this: inf or NaN
  __device__ __forceinline__ static float lo(uint32_t w) { return __half2float(__ushort_as_half(w & 0xffffu)); }
  __device__ __forceinline__ static float hi(uint32_t w) { return __half2float(__ushort_as_half(w >> 16)); }
};

template <>
struct Input<__nv_bfloat16> {
  static constexpr uint32_t kInfBits = 0x7f80;
  __device__ __forceinline__ static float lo(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ __forceinline__ static float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
};

// One row's 16 elements as 8 words (two 16-bit values each, element 2i in the low half).
__device__ __forceinline__ void load_row(const uint16_t* src, bool vec_ok, uint32_t (&w)[kElems / 2]) {
  if (vec_ok) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(src));
    const uint4 b = __ldg(reinterpret_cast<const uint4*>(src) + 1);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < kElems / 2; ++i)
      w[i] = static_cast<uint32_t>(__ldg(src + 2 * i)) | (static_cast<uint32_t>(__ldg(src + 2 * i + 1)) << 16);
  }
}

// Four floats → four e4m3 bytes, the first in the lowest byte (cvt.rn.satfinite.e4m3x2.f32).
__device__ __forceinline__ uint32_t pack_e4m3(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

template <typename T, int kHeadDim, Mode kMode>
__global__ void __launch_bounds__(2 * kHeadDim)
    quantize_kernel(const __grid_constant__ Params p) {
  constexpr int kThreadsPerRow = kHeadDim / kElems;  // lanes sharing a row: 4, 8, 16
  constexpr int kThreads = 2 * kHeadDim;
  constexpr int kWarps = kThreads / 32;
  constexpr int kGroupsPerWarp = 32 / kThreadsPerRow; // 4-key groups (s) per warp: 8, 4, 2
  static_assert(kThreads / kThreadsPerRow == kWordsPerRow && kWordsPerRow * kRows == kBlockRows,
                "32 groups of 4 keys cover the 128-row tile");
  static_assert(kHeadDim <= kMaxHeadDim && kHeadDim % (2 * kElems) == 0, "headdim 64, 128 or 256");

  __shared__ float warp_amax[kWarps];
  // (kHeadDim, 32 words) e4m3 tile of vt8; word s of row dd sits at s ^ (dd/16 · kGroupsPerWarp)
  __shared__ uint32_t s_vt[kMode == Mode::kAmaxOnly ? 1 : kHeadDim * kWordsPerRow];

  const int which = blockIdx.x < p.t[1].tile_begin ? 0 : blockIdx.x < p.t[2].tile_begin ? 1 : 2;
  const TensorArgs& a = p.t[which];
  int tile = blockIdx.x - a.tile_begin;  // (batch, block, head), head fastest: neighbours read neighbours
  const int h = tile % a.nheads;
  tile /= a.nheads;
  const int blk = tile % a.nblocks;
  const int b = tile / a.nblocks;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int c = tid % kThreadsPerRow;  // elements 16c … 16c+15 of each row
  const int s = tid / kThreadsPerRow;  // 4-key group: vt8 word s of the tile
  const int k0 = 32 * (s >> 3) + 16 * ((s >> 2) & 1) + 2 * (s & 3);
  int row[kRows];
  bool valid[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    row[m] = blk * kBlockRows + k0 + (m & 1) + 8 * (m >> 1);  // member m = 2·(j/2) + j%2 of PERM
    valid[m] = row[m] < a.seqlen;
  }

  // ---------------------------------------------------------------- 1. load
  float x[kRows][kElems];  // (4 rows, 16 elements) fp32, registers
  uint32_t max_bits = 0;   // packed max of |raw bits|, two halves
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    uint32_t w[kElems / 2] = {};
    if (valid[m]) {
      const uint16_t* src = a.src + b * a.stride_b + static_cast<int64_t>(row[m]) * a.stride_s +
                            h * a.stride_h + kElems * c;
      load_row(src, a.vec_ok, w);
    }
#pragma unroll
    for (int i = 0; i < kElems / 2; ++i) {
      max_bits = __vmaxu2(max_bits, w[i] & kAbs2);
      x[m][2 * i] = Input<T>::lo(w[i]);
      x[m][2 * i + 1] = Input<T>::hi(w[i]);
    }
  }
  const int bad = max(max_bits & 0xffffu, max_bits >> 16) >= Input<T>::kInfBits;

  // ---------------------------------------------------------------- 2. rotate: x ← (x·s) H / √d
  if (a.rotate) {
    const uint32_t signs = p.sign_bits[kElems * c / 32] >> (kElems * c % 32);
#pragma unroll
    for (int m = 0; m < kRows; ++m)
#pragma unroll
      for (int e = 0; e < kElems; ++e)
        x[m][e] = __uint_as_float(__float_as_uint(x[m][e]) ^ (((signs >> e) & 1u) << 31));
#pragma unroll
    for (int hs = 1; hs < kElems; hs *= 2)  // butterflies inside the thread: element e pairs e + hs
#pragma unroll
      for (int m = 0; m < kRows; ++m)
#pragma unroll
        for (int e = 0; e < kElems; ++e)
          if (!(e & hs)) {
            const float lo = x[m][e], hi = x[m][e + hs];
            x[m][e] = __fadd_rn(lo, hi);
            x[m][e + hs] = __fsub_rn(lo, hi);
          }
#pragma unroll
    for (int hs = kElems; hs < kHeadDim; hs *= 2) {  // across lanes: element e pairs e + hs in lane c ^ hs/16
      const int lane_mask = hs / kElems;
      const float sign = (c & lane_mask) ? -1.f : 1.f;  // upper half: a − b = other − self
#pragma unroll
      for (int m = 0; m < kRows; ++m)
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          const float other = __shfl_xor_sync(0xffffffffu, x[m][e], lane_mask);
          x[m][e] = __fmaf_rn(sign, x[m][e], other);  // ±x exact: one rounding, as a + b / a − b
        }
    }
#pragma unroll
    for (int m = 0; m < kRows; ++m)
#pragma unroll
      for (int e = 0; e < kElems; ++e) x[m][e] = __fmul_rn(x[m][e], p.inv_sqrt_d);
  }

  // ---------------------------------------------------------------- 3. tile amax
  float amax = 0.f;
#pragma unroll
  for (int m = 0; m < kRows; ++m)
#pragma unroll
    for (int e = 0; e < kElems; ++e) amax = fmaxf(amax, fabsf(x[m][e]));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (lane == 0) warp_amax[warp] = amax;
  const int tile_bad = __syncthreads_or(bad);
  amax = warp_amax[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) amax = fmaxf(amax, warp_amax[i]);
  if (tile_bad) amax = __uint_as_float(kNaNBits);

  if constexpr (kMode == Mode::kAmaxOnly) {
    if (tid == 0) {
      atomicMax(&p.status[which], __float_as_uint(amax));
      if (tile_bad) atomicOr(&p.status[kFlagsWord], 1u << which);
    }
    return;
  } else {
    if constexpr (kMode == Mode::kTensorScale) amax = __uint_as_float(__ldg(&p.status[which]));
    const float scale = amax == 0.f ? 1.f : __double2float_rn(static_cast<double>(amax) * kInvE4M3Max);
    if (tid == 0) {
      a.descale[(b * a.nheads + h) * a.nblocks + blk] = scale;
      if (kMode == Mode::kBlockScale && tile_bad) atomicOr(&p.status[kFlagsWord], 1u << which);
    }

    // -------------------------------------------------------------- 4. quantize and store
#pragma unroll
    for (int m = 0; m < kRows; ++m)
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        const float q = fminf(fmaxf(__fdiv_rn(x[m][e], scale), -kE4M3Max), kE4M3Max);
        x[m][e] = valid[m] ? q : 0.f;  // V's padding keys: +0
      }
    if (!a.transposed) {  // Q, K: (batch, seqlen, nheads, d) e4m3, 16 bytes per row
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        if (!valid[m]) continue;
        uint4 out;
        out.x = pack_e4m3(x[m][0], x[m][1], x[m][2], x[m][3]);
        out.y = pack_e4m3(x[m][4], x[m][5], x[m][6], x[m][7]);
        out.z = pack_e4m3(x[m][8], x[m][9], x[m][10], x[m][11]);
        out.w = pack_e4m3(x[m][12], x[m][13], x[m][14], x[m][15]);
        const int64_t offset = ((static_cast<int64_t>(b) * a.seqlen + row[m]) * a.nheads + h) * kHeadDim + kElems * c;
        *reinterpret_cast<uint4*>(a.dst + offset) = out;
      }
    } else {  // V: word (dim dd, group s) = the 4 keys of group s, byte m = member m
      const int swz = c * kGroupsPerWarp;  // lanes of a warp: distinct (s mod kGroupsPerWarp, c) → 32 banks
#pragma unroll
      for (int e = 0; e < kElems; ++e)
        s_vt[(kElems * c + e) * kWordsPerRow + (s ^ swz)] = pack_e4m3(x[0][e], x[1][e], x[2][e], x[3][e]);
      __syncthreads();
      const int64_t seqlen_pad = static_cast<int64_t>(a.nblocks) * kBlockRows;
      uint8_t* vt = a.dst + (static_cast<int64_t>(b) * a.nheads + h) * kHeadDim * seqlen_pad + blk * kBlockRows;
#pragma unroll
      for (int dd = warp; dd < kHeadDim; dd += kWarps) {  // one 128-byte vt8 row segment per warp
        const uint32_t word = s_vt[dd * kWordsPerRow + (lane ^ (dd / kElems * kGroupsPerWarp))];
        reinterpret_cast<uint32_t*>(vt + dd * seqlen_pad)[lane] = word;
      }
    }
  }
}

template <typename T, int kHeadDim>
void launch(const Params& p, int num_tiles, bool block_quant, cudaStream_t stream) {
  constexpr int kThreads = 2 * kHeadDim;
  if (block_quant) {
    quantize_kernel<T, kHeadDim, Mode::kBlockScale><<<num_tiles, kThreads, 0, stream>>>(p);
  } else {  // per tensor: the amax of everything first, then the same pass with that one scale
    quantize_kernel<T, kHeadDim, Mode::kAmaxOnly><<<num_tiles, kThreads, 0, stream>>>(p);
    quantize_kernel<T, kHeadDim, Mode::kTensorScale><<<num_tiles, kThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_headdim(const Params& p, int headdim, int num_tiles, bool block_quant, cudaStream_t stream) {
  switch (headdim) {
    case 64: launch<T, 64>(p, num_tiles, block_quant, stream); break;
    case 128: launch<T, 128>(p, num_tiles, block_quant, stream); break;
    case 256: launch<T, 256>(p, num_tiles, block_quant, stream); break;
    default: break;  // the caller checked headdim
  }
}

}  // namespace fp8_quantize

// Host entry, called by cuda/binding.cpp (quantize_fp8), which has validated the shapes and
// allocated the outputs. Per input i (q, k, v): src[i] device pointer, strides[i] = (batch, seqlen,
// head) strides in elements, seqlen[i], nheads[i]; dst[i] = q8 / k8 (BSHD contiguous) / vt8;
// descale[i]. status: 4 zeroed words. sign_bits: bit e of word e/32 set ⇔ s[e] = −1 (used only
// with incoherent). Returns the launch error, if any.
cudaError_t run_quantize_fp8(const void* const src[3], const int64_t strides[3][3], const int sizes[3][2],
                             uint8_t* const dst[3], float* const descale[3], int batch, int headdim, bool bf16,
                             bool block_quant, bool incoherent, const uint32_t sign_bits[8], uint32_t* status,
                             cudaStream_t stream) {
  namespace fq = fp8_quantize;
  fq::Params p{};
  int tiles = 0;
  for (int i = 0; i < fq::kTensors; ++i) {
    fq::TensorArgs& a = p.t[i];
    a.src = static_cast<const uint16_t*>(src[i]);
    a.stride_b = strides[i][0], a.stride_s = strides[i][1], a.stride_h = strides[i][2];
    a.dst = dst[i];
    a.descale = descale[i];
    a.seqlen = sizes[i][0], a.nheads = sizes[i][1];
    a.nblocks = (a.seqlen + fq::kBlockRows - 1) / fq::kBlockRows;
    a.tile_begin = tiles;
    a.rotate = incoherent && i < 2;
    a.transposed = i == 2;
    constexpr int64_t kVecElems = 16 / sizeof(uint16_t);
    a.vec_ok = reinterpret_cast<uintptr_t>(src[i]) % 16 == 0 && a.stride_b % kVecElems == 0 &&
               a.stride_s % kVecElems == 0 && a.stride_h % kVecElems == 0;
    tiles += batch * a.nblocks * a.nheads;
  }
  for (int w = 0; w < fq::kMaxHeadDim / 32; ++w) p.sign_bits[w] = sign_bits[w];
  p.inv_sqrt_d = 1.0f / static_cast<float>(std::sqrt(static_cast<double>(headdim)));
  p.status = status;
  if (bf16)
    fq::launch_headdim<__nv_bfloat16>(p, headdim, tiles, block_quant, stream);
  else
    fq::launch_headdim<__half>(p, headdim, tiles, block_quant, stream);
  return cudaGetLastError();
}

}  // namespace fa3
