// exercise_binding.cpp — torch extension entry for a CUDA exercise (fa3_lab.grading.build_exercise).
// Compiled together with ONE exercise source that defines fa3::run_fwd_exercise01 (the solution in
// cuda/exercises/ or a student's copy). Same FwdParams as cuda/binding.cpp; the checks that
// fa3_lab/api.py makes for the real steps are made here, since the exercise has no Python wrapper.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fa3/params.h"

namespace fa3 {
void run_fwd_exercise01(const FwdParams&, cudaStream_t);
}  // namespace fa3

namespace {

constexpr double kLog2e = 1.4426950408889634;

// q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_kv, headdim): fp16/bf16 CUDA,
// last dim contiguous. Returns {out (like q), lse (batch, nheads, seqlen_q) fp32}.
std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double softmax_scale, c10::optional<at::Tensor> out_) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v: expected CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: expected 4-D (batch, seqlen, heads, headdim)");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "q: expected fp16 or bf16, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k, v: expected q's dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v: the last dim must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "k: batch and headdim must match q");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "nheads (", q.size(2), ") must be a multiple of nheads_kv (", k.size(2), ")");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = out_.has_value() ? out_.value() : at::empty_like(q);
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.stride(3) == 1,
              "out: expected q's shape and dtype, last dim contiguous");
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));

  fa3::FwdParams p;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.batch = q.size(0), p.seqlen_q = q.size(1), p.nheads = q.size(2), p.headdim = q.size(3);
  p.seqlen_k = k.size(1), p.nheads_kv = k.size(2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);  // folded into one FFMA per score
  p.causal = causal;
  p.dtype = q.scalar_type() == at::kHalf ? fa3::Dtype::kFloat16 : fa3::Dtype::kBFloat16;
  fa3::run_fwd_exercise01(p, at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "CUDA exercise 01 (step 01 with your online softmax): returns [out, lse]", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("causal"), pybind11::arg("softmax_scale"),
        pybind11::arg("out") = pybind11::none());
}
