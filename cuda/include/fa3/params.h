// fa3/params.h — the one parameter struct every step's launcher takes (host and device).
#pragma once
#include <cstdint>
#include <type_traits>

namespace fa3 {

// Steps 07+, causal: inputs with up to this many keys run on the dynamic tile scheduler (which needs
// FwdParams::tile_counter), longer ones one CTA per tile (interleaved A/B on the H100: +3–11 % at 1k–4k,
// −2–5 % at 16k; docs/performance.md). Shared by the launchers and binding.cpp, which allocates the counter.
constexpr int kDynamicMaxSeqlen = 8192;

// Cfg::kClusterM if a kernel config has it, else 1: CTAs per thread-block cluster along the grid's x,
// which share each K/V tile by TMA multicast (step 10; launch.h, producer.h). Steps without kClusterM get 1.
template <typename Cfg, typename = void> struct ClusterM : std::integral_constant<int, 1> {};
template <typename Cfg> struct ClusterM<Cfg, std::void_t<decltype(Cfg::kClusterM)>>
    : std::integral_constant<int, Cfg::kClusterM> {};

enum class Dtype : int { kFloat16 = 0, kBFloat16 = 1, kE4M3 = 2 };

struct FwdParams {
  // BSHD tensors; strides in ELEMENTS; the last dim (headdim) is contiguous.
  const void* q;
  const void* k;
  const void* v;
  void* o;       // (batch, seqlen_q, nheads, headdim), 16-bit (bf16 for the fp8 step)
  float* lse;    // (batch, nheads, seqlen_q) fp32, natural log
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim;
  float softmax_scale;   // α
  float scale_log2;      // α · log2(e), folded into one FFMA per score
  bool causal;
  Dtype dtype;
  // FP8 (step 05): per-block descale factors, fp32, contiguous
  //   q_descale (batch, nheads, ceil(seqlen_q / kBlockM)); k/v_descale (batch, nheads_kv, ceil(seqlen_k / kBlockN))
  const float* q_descale = nullptr;
  const float* k_descale = nullptr;
  const float* v_descale = nullptr;
  int descale_block_m = 0, descale_block_n = 0;
  int vt_seqlen_pad = 0;  // step 05: V is passed transposed, (batch, nheads_kv, headdim, vt_seqlen_pad)
  // Dynamic tile scheduler (steps 07+, causal; unused before): a zeroed int32 the CTAs take their next work
  // tile from (atomicAdd, allocated by binding.cpp), and how many (batch, head) pairs one section of the tile
  // order spans (L2 reuse; set by the step's launcher).
  int* tile_counter = nullptr;
  int sched_heads = 1;
  // Tracing (FA3_TRACE builds only): %globaltimer stamps of the first `trace_ctas` CTAs.
  uint64_t* trace = nullptr;
  int trace_ctas = 0;
  int trace_capacity = 0;  // events per warpgroup
};

}  // namespace fa3
