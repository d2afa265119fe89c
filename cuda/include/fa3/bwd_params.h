// fa3/bwd_params.h — the backward's parameter struct (host and device; no device code, so the C++ binding
// cuda/binding_bwd.cpp can include it).
#pragma once
#include <cstdint>

#include "params.h"  // Dtype

namespace fa3 {

struct BwdParams {
  // Inputs, BSHD, strides in ELEMENTS, last dim contiguous (dout: made so, with 16-byte aligned strides, by
  // the binding, since it is loaded by TMA).
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  const float* lse;      // (batch, nheads, seqlen_q) fp32, natural log, +inf for rows that see no key
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  // Workspace written by the preprocess kernel, fp32, rows padded to seqlen_q_rounded:
  float* lse_log2;       // (batch, nheads, seqlen_q_rounded) L_i·log2(e); +inf in the padding
  float* dpsum;          // (batch, nheads, seqlen_q_rounded) D_i = rowsum(dO_i ∘ O_i); 0 in the padding
  float* dq_accum;       // (batch, nheads, seqlen_q_rounded, headdim), zeroed by the caller
  int* dq_semaphore;     // (batch, nheads, ceil(seqlen_q / kBlockM)), zeroed; deterministic mode only
  // Outputs: contiguous (batch, seqlen, heads, headdim).
  void* dq;              // q's shape, input dtype
  void* dk;              // k's shape, input dtype
  void* dv;
  float* dk_accum;       // GQA (nheads > nheads_kv): (batch, seqlen_k, nheads, headdim) fp32, one slice per
  float* dv_accum;       //   query head, summed over each group by the postprocess; else nullptr
  int batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim;
  int seqlen_q_rounded;  // seqlen_q rounded up to the step's kBlockM (cuda/binding_bwd.cpp): lse_log2, dpsum and
                         // dq_accum hold whole m_blocks, so their copies and the dQ adds need no bounds checks
  float softmax_scale;   // α
  float scale_log2;      // α·log2(e)
  bool causal;
  bool deterministic;    // dQ added in n_block order (semaphore per (batch, head, m_block))
  Dtype dtype;
  // Tracing (FA3_TRACE builds only, cuda/include/fa3/trace.h): the first `trace_ctas` CTAs of the main kernel.
  uint64_t* trace = nullptr;
  int trace_ctas = 0;
  int trace_capacity = 0;  // events per row
};

}  // namespace fa3
