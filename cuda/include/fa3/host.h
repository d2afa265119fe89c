// fa3/host.h — host-side helpers: TMA tensor maps and kernel launch checks.
//
// A tensor map (CUtensorMap, 128 bytes) describes a global tensor to the TMA unit. We describe each
// BSHD tensor as 4-D (innermost first): (headdim, seqlen, heads, batch) with the caller's strides, and
// a box of (64 elements = 128 bytes, rows, 1, 1) with 128-byte swizzle: one "atom" of the smem tile.
// The driver entry point is fetched through the runtime, so nothing links against libcuda.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "params.h"

namespace fa3 {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
#else
    check_cuda(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &status),
               "cudaGetDriverEntryPoint(cuTensorMapEncodeTiled)");
#endif
    if (status != cudaDriverEntryPointSuccess || ptr == nullptr)
      throw std::runtime_error("cuTensorMapEncodeTiled is not available from this driver");
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }
  return fn;
}

// Tensor map of a BSHD tensor; box = (box_cols elements, box_rows rows, 1 head, 1 batch).
inline CUtensorMap make_tmap_bshd(const void* ptr, Dtype dtype, int headdim, int seqlen, int heads, int batch,
                                  int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_cols,
                                  int box_rows, int swizzle_bytes = 128) {
  const int elem_bytes = dtype == Dtype::kE4M3 ? 1 : 2;
  const CUtensorMapDataType type = dtype == Dtype::kE4M3    ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                   : dtype == Dtype::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  cuuint64_t dims[4] = {(cuuint64_t)headdim, (cuuint64_t)seqlen, (cuuint64_t)heads, (cuuint64_t)batch};
  cuuint64_t strides[3] = {(cuuint64_t)(row_stride * elem_bytes), (cuuint64_t)(head_stride * elem_bytes),
                           (cuuint64_t)(batch_stride * elem_bytes)};
  cuuint32_t box[4] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows, 1, 1};
  cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  CUresult r = tensor_map_encoder()(&map, type, 4, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE,
                                    swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("cuTensorMapEncodeTiled failed (" + std::to_string((int)r) +
                             "): strides must be multiples of 16 bytes and the base 16-byte aligned");
  return map;
}

inline int ceil_div_host(int a, int b) { return (a + b - 1) / b; }

}  // namespace fa3
