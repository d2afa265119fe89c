// overlap_probe.cu — a positive example for fa3_lab.sass (tests/test_sass.py); compiled, never run.
//
// One warpgroup issues one WGMMA commit group (S = A·Bᵀ, 64 × 64 × 64, bf16 → fp32) and, while that
// group is in flight, computes exp2 of values that do not depend on it; only then does it wait
// (wgmma.wait_group 0). If the checker works, every MUFU.EX2 of the loop body is counted as issued
// between the group's last HGMMA (gsb0) and the WARPGROUP.DEPBAR that retires it.
#include <cuda_bf16.h>

#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/wgmma.h"

namespace probe {

constexpr int kRows = 64;      // M = N of the GEMM
constexpr int kDepth = 64;     // K of the GEMM
constexpr int kExps = 16;      // independent exp2 per thread per iteration

__global__ void __launch_bounds__(128, 1) overlap_kernel(const float* x, float* out, int iters) {
  __shared__ alignas(1024) __nv_bfloat16 sA[kRows * kDepth];  // (64, 64) bf16, smem, 128B swizzle
  __shared__ alignas(1024) __nv_bfloat16 sB[kRows * kDepth];  // (64, 64) bf16, smem, 128B swizzle
  const int t = threadIdx.x;
  for (int i = t; i < kRows * kDepth; i += blockDim.x) {
    sA[i] = __float2bfloat16(x[i]);
    sB[i] = __float2bfloat16(x[i + 1]);
  }
  fa3::fence_proxy_async();
  __syncthreads();
  float acc[kRows / 2];  // (64, 64) fp32 fragment, registers
  float e[kExps];
  float total = 0.f;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int k = 0; k < kExps; ++k) e[k] = x[(it * kExps + k) * 128 + t];
    fa3::wgmma_fence();
    fa3::gemm_ss<__nv_bfloat16, kRows, kDepth, kRows, kRows>(acc, fa3::smem_u32(sA), 0, fa3::smem_u32(sB), false);
    fa3::wgmma_commit();
    // work under the GEMM: independent of acc
#pragma unroll
    for (int k = 0; k < kExps; ++k) e[k] = fa3::fast_exp2(e[k]);
    fa3::fence_regs(e);
    fa3::wgmma_wait<0>();
    fa3::fence_regs(acc);
#pragma unroll
    for (int k = 0; k < kExps; ++k) total += e[k] * acc[k];
  }
  out[t] = total;
}

}  // namespace probe
