// fa3/launch.h — host side shared by every step: tensor maps, the smem opt-in, the launch, and the
// dispatch of (dtype × headdim × causal) to a step's kernel template.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "host.h"
#include "params.h"
#include "wgmma.h"

namespace fa3 {

// Grid (ceil(seqlen_q / kBlockM), nheads, batch), Cfg::kThreads threads, Cfg::kSmemBytes of smem.
template <typename Cfg, typename Kernel>
void launch_fwd(Kernel kernel, const FwdParams& p, cudaStream_t stream, const char* name) {
  const CUtensorMap tq = make_tmap_bshd(p.q, p.dtype, p.headdim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                                        p.q_head_stride, p.q_batch_stride, kAtomCols16, Cfg::kBlockM);
  const CUtensorMap tk = make_tmap_bshd(p.k, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.k_row_stride,
                                        p.k_head_stride, p.k_batch_stride, kAtomCols16, Cfg::kBlockN);
  const CUtensorMap tv = make_tmap_bshd(p.v, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.v_row_stride,
                                        p.v_head_stride, p.v_batch_stride, kAtomCols16, Cfg::kBlockN);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
             (std::string("cudaFuncSetAttribute(") + name + ")").c_str());
  const dim3 grid(ceil_div_host(p.seqlen_q, Cfg::kBlockM), p.nheads, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tq, tk, tv, p);
  check_cuda(cudaGetLastError(), (std::string(name) + " launch").c_str());
}

// Launch::template run<T, kHeadDim, kCausal>(p, stream) for the runtime dtype, headdim and mask.
template <template <typename, int, bool> class Launch>
void dispatch_fwd(const FwdParams& p, cudaStream_t stream, const char* name) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (p.headdim) {
      case 64: return p.causal ? Launch<T, 64, true>::run(p, stream) : Launch<T, 64, false>::run(p, stream);
      case 128: return p.causal ? Launch<T, 128, true>::run(p, stream) : Launch<T, 128, false>::run(p, stream);
      case 256: return p.causal ? Launch<T, 256, true>::run(p, stream) : Launch<T, 256, false>::run(p, stream);
      default: throw std::runtime_error(std::string(name) + ": headdim must be 64, 128 or 256");
    }
  };
  if (p.dtype == Dtype::kFloat16) by_dim(__half{});
  else if (p.dtype == Dtype::kBFloat16) by_dim(__nv_bfloat16{});
  else throw std::runtime_error(std::string(name) + ": dtype must be fp16 or bf16");
}

}  // namespace fa3
