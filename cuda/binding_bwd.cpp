// binding_bwd.cpp — the backward's torch entry (binding.cpp registers it as `bwd`): workspace, outputs and
// the launch of a backward step (cuda/steps/bwd/). Python validates first (fa3_lab/ops.py); these checks are
// the last line of defence.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fa3/bwd_params.h"

namespace fa3 {
// Each backward step NN defines run_bwd_stepNN and bwd_stepNN_block_m (its m_block size: the semaphores' count).
#define FA3_DECLARE_BWD_STEP(NN)                        \
  void run_bwd_step##NN(const BwdParams&, cudaStream_t); \
  int bwd_step##NN##_block_m(int headdim);
#ifdef FA3_HAS_STEP11
FA3_DECLARE_BWD_STEP(11)
#endif
#ifdef FA3_HAS_STEP12
FA3_DECLARE_BWD_STEP(12)
#endif
#ifdef FA3_HAS_STEP13
FA3_DECLARE_BWD_STEP(13)
#endif
#ifdef FA3_HAS_STEP14
FA3_DECLARE_BWD_STEP(14)
#endif
#ifdef FA3_HAS_STEP15
FA3_DECLARE_BWD_STEP(15)
#endif
#ifdef FA3_HAS_STEP16
FA3_DECLARE_BWD_STEP(16)
#endif
#ifdef FA3_HAS_STEP17
FA3_DECLARE_BWD_STEP(17)
#endif
#ifdef FA3_HAS_STEP18
FA3_DECLARE_BWD_STEP(18)
#endif
#ifdef FA3_HAS_STEP19
FA3_DECLARE_BWD_STEP(19)
#endif
#ifdef FA3_HAS_STEP20
FA3_DECLARE_BWD_STEP(20)
#endif
#ifdef FA3_HAS_STEP21
FA3_DECLARE_BWD_STEP(21)
bool bwd_step21_needs_dkv_accum(const BwdParams&);  // GQA: fp32 dK/dV slices only where a CTA has one query head
#endif
#ifdef FA3_HAS_STEP22
FA3_DECLARE_BWD_STEP(22)
bool bwd_step22_needs_dkv_accum(const BwdParams&);
#endif
#ifdef FA3_HAS_STEP23
FA3_DECLARE_BWD_STEP(23)
bool bwd_step23_needs_dkv_accum(const BwdParams&);
#endif
#ifdef FA3_HAS_STEP24
FA3_DECLARE_BWD_STEP(24)
bool bwd_step24_needs_dkv_accum(const BwdParams&);
#endif
#ifdef FA3_HAS_STEP25
FA3_DECLARE_BWD_STEP(25)
bool bwd_step25_needs_dkv_accum(const BwdParams&);
#endif
#ifdef FA3_HAS_STEP26
FA3_DECLARE_BWD_STEP(26)
bool bwd_step26_needs_dkv_accum(const BwdParams&);
#endif
#ifdef FA3_HAS_STEP27
FA3_DECLARE_BWD_STEP(27)
bool bwd_step27_needs_dkv_accum(const BwdParams&);
#endif
#ifdef FA3_HAS_STEP28
FA3_DECLARE_BWD_STEP(28)
bool bwd_step28_needs_dkv_accum(const BwdParams&);
#endif
}  // namespace fa3

// dq, dk, dv (contiguous, the inputs' shapes and dtype) of attention, from the forward's out and lse.
// dout (loaded by TMA) and out (16-byte loads in step 17's preprocess) are copied to fresh contiguous tensors when
// their last dim is not contiguous or their address or a stride is not 16-byte aligned. trace_ (FA3_TRACE builds,
// int64 (trace_ctas, 4, 2·capacity), cuda/include/fa3/trace.h): the main kernel's first trace_ctas CTAs record.
std::vector<at::Tensor> fa3_bwd(int64_t step, const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& out_in, const at::Tensor& lse_in, bool causal,
                                double softmax_scale, bool deterministic, c10::optional<at::Tensor> trace_,
                                int64_t trace_ctas) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && out_in.is_cuda() && dout_in.is_cuda() && lse_in.is_cuda(),
              "bwd: every tensor must be on CUDA");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "bwd: q must be fp16 or bf16");
  for (const auto* t : {&k, &v, &out_in, &dout_in})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "bwd: q, k, v, out, dout must share one dtype");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && out_in.sizes() == q.sizes() &&
              dout_in.sizes() == q.sizes(), "bwd: shapes do not fit");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && out_in.stride(3) == 1,
              "bwd: the last dim of q, k, v, out must be contiguous");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t elem = q.element_size();
  bool dout_ok = dout_in.stride(3) == 1 && reinterpret_cast<uintptr_t>(dout_in.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) dout_ok = dout_ok && (dout_in.stride(d) * elem) % 16 == 0;
  // (clone, not contiguous(): a contiguous tensor at a misaligned address would come back as it is)
  const at::Tensor dout = dout_ok ? dout_in : dout_in.clone(at::MemoryFormat::Contiguous);
  bool out_ok = reinterpret_cast<uintptr_t>(out_in.data_ptr()) % 16 == 0;  // step 17's preprocess loads 16 bytes
  for (int d = 0; d < 3; ++d) out_ok = out_ok && (out_in.stride(d) * elem) % 16 == 0;
  const at::Tensor out = out_ok ? out_in : out_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();

  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), headdim = q.size(3);
  const int64_t seqlen_k = k.size(1), nheads_kv = k.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == nheads && lse.size(2) == seqlen_q,
              "bwd: lse must be (batch, nheads, seqlen_q)");
  // The step's m_block size (its kBlockM at this headdim) and its launcher.
  int (*block_m)(int) = nullptr;
  void (*run)(const fa3::BwdParams&, cudaStream_t) = nullptr;
  bool zeroes_dq_accum = false;  // the step's preprocess zeroes dq_accum itself (step 17 on); else a memset here
  bool (*needs_dkv_accum)(const fa3::BwdParams&) = nullptr;  // GQA fp32 dK/dV slices: always, unless the step says
  switch (step) {
#ifdef FA3_HAS_STEP11
    case 11: block_m = fa3::bwd_step11_block_m, run = fa3::run_bwd_step11; break;
#endif
#ifdef FA3_HAS_STEP12
    case 12: block_m = fa3::bwd_step12_block_m, run = fa3::run_bwd_step12; break;
#endif
#ifdef FA3_HAS_STEP13
    case 13: block_m = fa3::bwd_step13_block_m, run = fa3::run_bwd_step13; break;
#endif
#ifdef FA3_HAS_STEP14
    case 14: block_m = fa3::bwd_step14_block_m, run = fa3::run_bwd_step14; break;
#endif
#ifdef FA3_HAS_STEP15
    case 15: block_m = fa3::bwd_step15_block_m, run = fa3::run_bwd_step15; break;
#endif
#ifdef FA3_HAS_STEP16
    case 16: block_m = fa3::bwd_step16_block_m, run = fa3::run_bwd_step16; break;
#endif
#ifdef FA3_HAS_STEP17
    case 17: block_m = fa3::bwd_step17_block_m, run = fa3::run_bwd_step17, zeroes_dq_accum = true; break;
#endif
#ifdef FA3_HAS_STEP18
    case 18: block_m = fa3::bwd_step18_block_m, run = fa3::run_bwd_step18, zeroes_dq_accum = true; break;
#endif
#ifdef FA3_HAS_STEP19
    case 19: block_m = fa3::bwd_step19_block_m, run = fa3::run_bwd_step19, zeroes_dq_accum = true; break;
#endif
#ifdef FA3_HAS_STEP20
    case 20: block_m = fa3::bwd_step20_block_m, run = fa3::run_bwd_step20, zeroes_dq_accum = true; break;
#endif
#ifdef FA3_HAS_STEP21
    case 21: block_m = fa3::bwd_step21_block_m, run = fa3::run_bwd_step21, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step21_needs_dkv_accum; break;
#endif
#ifdef FA3_HAS_STEP22
    case 22: block_m = fa3::bwd_step22_block_m, run = fa3::run_bwd_step22, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step22_needs_dkv_accum; break;
#endif
#ifdef FA3_HAS_STEP23
    case 23: block_m = fa3::bwd_step23_block_m, run = fa3::run_bwd_step23, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step23_needs_dkv_accum; break;
#endif
#ifdef FA3_HAS_STEP24
    case 24: block_m = fa3::bwd_step24_block_m, run = fa3::run_bwd_step24, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step24_needs_dkv_accum; break;
#endif
#ifdef FA3_HAS_STEP25
    case 25: block_m = fa3::bwd_step25_block_m, run = fa3::run_bwd_step25, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step25_needs_dkv_accum; break;
#endif
#ifdef FA3_HAS_STEP26
    case 26: block_m = fa3::bwd_step26_block_m, run = fa3::run_bwd_step26, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step26_needs_dkv_accum; break;
#endif
#ifdef FA3_HAS_STEP27
    case 27: block_m = fa3::bwd_step27_block_m, run = fa3::run_bwd_step27, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step27_needs_dkv_accum; break;
#endif
#ifdef FA3_HAS_STEP28
    case 28: block_m = fa3::bwd_step28_block_m, run = fa3::run_bwd_step28, zeroes_dq_accum = true,
             needs_dkv_accum = fa3::bwd_step28_needs_dkv_accum; break;
#endif
    default: TORCH_CHECK(false, "backward step ", step, " is not built into this extension");
  }
  const int64_t bm = block_m(static_cast<int>(headdim));
  const int64_t rounded = (seqlen_q + bm - 1) / bm * bm;  // whole m_blocks (bwd_params.h)
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse_log2 = at::empty({batch, nheads, rounded}, f32);
  at::Tensor dpsum = at::empty({batch, nheads, rounded}, f32);
  at::Tensor dq_accum = zeroes_dq_accum ? at::empty({batch, nheads, rounded, headdim}, f32)
                                         : at::zeros({batch, nheads, rounded, headdim}, f32);
  at::Tensor dq = at::empty({batch, seqlen_q, nheads, headdim}, q.options());
  at::Tensor dk = at::empty({batch, seqlen_k, nheads_kv, headdim}, q.options());
  at::Tensor dv = at::empty({batch, seqlen_k, nheads_kv, headdim}, q.options());
  at::Tensor dk_accum, dv_accum, semaphore;

  fa3::BwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.o = out.data_ptr(), p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.lse_log2 = lse_log2.data_ptr<float>(), p.dpsum = dpsum.data_ptr<float>(), p.dq_accum = dq_accum.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.batch = batch, p.seqlen_q = seqlen_q, p.seqlen_k = seqlen_k, p.nheads = nheads, p.nheads_kv = nheads_kv;
  p.headdim = headdim, p.seqlen_q_rounded = rounded;
  if (nheads != nheads_kv && (needs_dkv_accum == nullptr || needs_dkv_accum(p))) {
    // GQA/MQA: one fp32 slice per query head, summed over the group afterwards
    dk_accum = at::empty({batch, seqlen_k, nheads, headdim}, f32);
    dv_accum = at::empty({batch, seqlen_k, nheads, headdim}, f32);
    p.dk_accum = dk_accum.data_ptr<float>(), p.dv_accum = dv_accum.data_ptr<float>();
  }
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal, p.deterministic = deterministic;
  if (trace_.has_value()) {
    TORCH_CHECK(trace_->is_cuda() && trace_->scalar_type() == at::kLong && trace_->dim() == 3 && trace_->size(1) == 4 &&
                trace_->size(0) >= trace_ctas, "bwd: trace must be a CUDA int64 tensor (>= trace_ctas, 4, 2·capacity)");
    p.trace = reinterpret_cast<uint64_t*>(trace_->data_ptr<int64_t>());
    p.trace_ctas = static_cast<int>(trace_ctas);
    p.trace_capacity = static_cast<int>(trace_->size(-1) / 2);  // records of 2 int64
  }
  p.dtype = q.scalar_type() == at::kHalf ? fa3::Dtype::kFloat16 : fa3::Dtype::kBFloat16;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (deterministic) {
    semaphore = at::zeros({batch, nheads, rounded / bm}, q.options().dtype(at::kInt));
    p.dq_semaphore = semaphore.data_ptr<int>();
  }
  run(p, stream);
  return {dq, dk, dv};
}
