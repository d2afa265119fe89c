// fa3/launch.h — host side shared by every step: tensor maps, the smem opt-in, the launch, and the
// dispatch of (dtype × headdim × causal) to a step's kernel template.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "host.h"
#include "params.h"
#include "wgmma.h"

namespace fa3 {

// Cfg::kPersistent if the config has it, else false (steps 01–03 launch one CTA per tile).
template <typename Cfg, typename = void> struct IsPersistent : std::false_type {};
template <typename Cfg> struct IsPersistent<Cfg, std::void_t<decltype(Cfg::kPersistent)>>
    : std::integral_constant<bool, Cfg::kPersistent> {};

// Kernels whose Cfg has kTmaStoreO (steps 08+) take a fourth tensor map, O's, after V's: built when
// Cfg::kTmaStoreO (the TMA-store epilogue), else Q's map is passed in its place and not used.
template <typename Cfg, typename = void> struct TakesTmapO : std::false_type {};
template <typename Cfg> struct TakesTmapO<Cfg, std::void_t<decltype(Cfg::kTmaStoreO)>> : std::true_type {};
template <typename Cfg> constexpr bool tma_store_o() {
  if constexpr (TakesTmapO<Cfg>::value) return Cfg::kTmaStoreO;
  else return false;
}

// SMs of the current device (queried once per device).
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  int& n = cached[dev & 63];
  if (n == 0) check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute(SMs)");
  return n;
}

// A persistent grid for a one-CTA-per-tile grid: min(work tiles, SMs) CTAs in x, which stride over the tiles.
// With clusters of `cluster` CTAs a work tile is `cluster` adjacent row blocks (x) of one (head, batch):
// min(work tiles, SMs / cluster) clusters.
inline dim3 persistent_grid(dim3 per_tile, int cluster = 1) {
  const long long work = static_cast<long long>(ceil_div_host(per_tile.x, cluster)) * per_tile.y * per_tile.z;
  const long long slots = sm_count() / cluster;
  return dim3(static_cast<unsigned>((work < slots ? work : slots) * cluster), 1, 1);
}

// Grid (ceil(seqlen_q / kBlockM), nheads, batch) — one CTA per work tile — or, for a persistent
// config (Cfg::kPersistent), min(work tiles, SMs) CTAs that stride over the tiles.
// Cfg::kThreads threads, Cfg::kSmemBytes of smem.
template <typename Cfg, typename Kernel>
void launch_fwd(Kernel kernel, const FwdParams& p, cudaStream_t stream, const char* name) {
  const CUtensorMap tq = make_tmap_bshd(p.q, p.dtype, p.headdim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                                        p.q_head_stride, p.q_batch_stride, kAtomCols16, Cfg::kBlockM);
  constexpr int kCluster = ClusterM<Cfg>::value;  // with a cluster, each CTA loads 1/kCluster of a K/V tile
  const CUtensorMap tk = make_tmap_bshd(p.k, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.k_row_stride,
                                        p.k_head_stride, p.k_batch_stride, kAtomCols16, Cfg::kBlockN / kCluster);
  const CUtensorMap tv = make_tmap_bshd(p.v, p.dtype, p.headdim, p.seqlen_k, p.nheads_kv, p.batch, p.v_row_stride,
                                        p.v_head_stride, p.v_batch_stride, kAtomCols16, Cfg::kBlockN / kCluster);
  // O's map: boxes of (64 columns, 64 rows), one warpgroup's rows per atom
  const CUtensorMap to = tma_store_o<Cfg>()
                             ? make_tmap_bshd(p.o, p.dtype, p.headdim, p.seqlen_q, p.nheads, p.batch, p.o_row_stride,
                                              p.o_head_stride, p.o_batch_stride, kAtomCols16, 64)
                             : tq;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
             (std::string("cudaFuncSetAttribute(") + name + ")").c_str());
  dim3 grid(ceil_div_host(p.seqlen_q, Cfg::kBlockM), p.nheads, p.batch);
  // The kernel's arguments: the tensor maps (O's only where the kernel takes it), then the params.
  auto launch = [&](const auto&... maps) {
    if constexpr (kCluster > 1) {
      // Persistent clusters: each cluster takes kCluster adjacent row blocks of one (batch, head) at a time.
      static_assert(IsPersistent<Cfg>::value, "K/V multicast is built for the persistent grid");
      cudaLaunchConfig_t config = {};
      config.gridDim = persistent_grid(grid, kCluster);
      config.blockDim = dim3(Cfg::kThreads, 1, 1);
      config.dynamicSmemBytes = Cfg::kSmemBytes;
      config.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = kCluster;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      config.attrs = attr;
      config.numAttrs = 1;
      check_cuda(cudaLaunchKernelEx(&config, kernel, maps..., p), (std::string(name) + " launch").c_str());
    } else {
      if constexpr (IsPersistent<Cfg>::value) grid = persistent_grid(grid);
      kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(maps..., p);
    }
  };
  if constexpr (TakesTmapO<Cfg>::value) launch(tq, tk, tv, to);
  else launch(tq, tk, tv);
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
