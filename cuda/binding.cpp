// binding.cpp — torch extension entry: one forward launcher per step, all taking fa3::FwdParams, and
// quantize_fp8 (cuda/fp8_quantize.cu), the fused preparation of step 05's e4m3 inputs.
// Python validates the inputs first (fa3_lab/api.py); the checks here are the last line of defence.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fa3/params.h"

namespace fa3 {
// One launcher per 16-bit step (cuda/steps/NN_*.cu), declared where the step is built (FA3_HAS_STEPNN).
#define FA3_DECLARE_STEP(NN) void run_fwd_step##NN(const FwdParams&, cudaStream_t);
#ifdef FA3_HAS_STEP01
FA3_DECLARE_STEP(01)
#endif
#ifdef FA3_HAS_STEP02
FA3_DECLARE_STEP(02)
#endif
#ifdef FA3_HAS_STEP03
FA3_DECLARE_STEP(03)
#endif
#ifdef FA3_HAS_STEP04
FA3_DECLARE_STEP(04)
#endif
#ifdef FA3_HAS_STEP05
FA3_DECLARE_STEP(05)
#endif
#ifdef FA3_HAS_STEP06
FA3_DECLARE_STEP(06)
#endif
#ifdef FA3_HAS_STEP07
FA3_DECLARE_STEP(07)
#endif
#ifdef FA3_HAS_STEP08
FA3_DECLARE_STEP(08)
#endif
#ifdef FA3_HAS_STEP09
FA3_DECLARE_STEP(09)
#endif
#ifdef FA3_HAS_STEP10
FA3_DECLARE_STEP(10)
#endif
#undef FA3_DECLARE_STEP
// cuda/fp8_quantize.cu (always built: it prepares step 05's inputs but needs none of the steps)
cudaError_t run_quantize_fp8(const void* const src[3], const int64_t strides[3][3], const int sizes[3][2],
                             uint8_t* const dst[3], float* const descale[3], int batch, int headdim, bool bf16,
                             bool block_quant, bool incoherent, const uint32_t sign_bits[8], uint32_t* status,
                             cudaStream_t stream);
}  // namespace fa3

namespace {

// The steps whose causal launch takes its tiles from the dynamic scheduler (07 and the steps built on it).
constexpr int64_t kFirstDynamicStep = 7, kLastDynamicStep = 10;

void fill_common(fa3::FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, bool causal, double softmax_scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.batch = q.size(0), p.seqlen_q = q.size(1), p.nheads = q.size(2), p.headdim = q.size(3);
  p.seqlen_k = k.size(1), p.nheads_kv = k.size(2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;
}

std::vector<at::Tensor> fwd(int64_t step, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double softmax_scale, c10::optional<at::Tensor> out_, c10::optional<at::Tensor> trace_,
                            int64_t trace_ctas) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (batch, seqlen, heads, headdim)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the last dim must be contiguous");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = out_.has_value() ? out_.value() : at::empty_like(q, q.options().dtype(
      q.scalar_type() == at::kFloat8_e4m3fn ? at::kBFloat16 : q.scalar_type()));
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  fa3::FwdParams p;
  fill_common(p, q, k, v, out, lse, causal, softmax_scale);
  p.dtype = q.scalar_type() == at::kHalf ? fa3::Dtype::kFloat16
          : q.scalar_type() == at::kBFloat16 ? fa3::Dtype::kBFloat16 : fa3::Dtype::kE4M3;
  if (trace_.has_value()) {
    p.trace = reinterpret_cast<uint64_t*>(trace_.value().data_ptr<int64_t>());
    p.trace_ctas = static_cast<int>(trace_ctas);
    p.trace_capacity = static_cast<int>(trace_.value().size(-1) / 2);  // records of 2 int64
  }
  // Steps 07–10 (the dynamic tile scheduler), causal, short enough: the scheduler's counter, zeroed per call.
  at::Tensor tile_counter;
  if (step >= kFirstDynamicStep && step <= kLastDynamicStep && causal && k.size(1) <= fa3::kDynamicMaxSeqlen &&
      !trace_.has_value()) {
    tile_counter = at::zeros({1}, q.options().dtype(at::kInt));
    p.tile_counter = tile_counter.data_ptr<int>();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (step) {
#ifdef FA3_HAS_STEP01
    case 1: fa3::run_fwd_step01(p, stream); break;
#endif
#ifdef FA3_HAS_STEP02
    case 2: fa3::run_fwd_step02(p, stream); break;
#endif
#ifdef FA3_HAS_STEP03
    case 3: fa3::run_fwd_step03(p, stream); break;
#endif
#ifdef FA3_HAS_STEP04
    case 4: fa3::run_fwd_step04(p, stream); break;
#endif
#ifdef FA3_HAS_STEP06
    case 6: fa3::run_fwd_step06(p, stream); break;
#endif
#ifdef FA3_HAS_STEP07
    case 7: fa3::run_fwd_step07(p, stream); break;
#endif
#ifdef FA3_HAS_STEP08
    case 8: fa3::run_fwd_step08(p, stream); break;
#endif
#ifdef FA3_HAS_STEP09
    case 9: fa3::run_fwd_step09(p, stream); break;
#endif
#ifdef FA3_HAS_STEP10
    case 10: fa3::run_fwd_step10(p, stream); break;
#endif
    default: TORCH_CHECK(false, "step ", step, " is not built into this extension");
  }
  return {out, lse};
}

#ifdef FA3_HAS_STEP05
// vt: V laid out for the kernel by fa3_lab.fp8.kernel_v_layout — (batch, nheads_kv, headdim, seqlen_k_pad)
// e4m3, contiguous, keys permuted within groups of 32. Descales: fp32, contiguous, per 128-row block.
std::vector<at::Tensor> fwd_fp8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& vt, const at::Tensor& q_descale,
                                const at::Tensor& k_descale, const at::Tensor& v_descale, int64_t block_m,
                                int64_t block_n, bool causal, double softmax_scale, c10::optional<at::Tensor> out_) {
  TORCH_CHECK(q.scalar_type() == at::kFloat8_e4m3fn && k.scalar_type() == at::kFloat8_e4m3fn &&
              vt.scalar_type() == at::kFloat8_e4m3fn, "q, k, vt must be float8_e4m3fn");
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && vt.is_cuda(), "q, k, vt must be CUDA tensors");
  TORCH_CHECK(vt.dim() == 4 && vt.is_contiguous() && vt.size(0) == k.size(0) && vt.size(1) == k.size(2) &&
              vt.size(2) == k.size(3) && vt.size(3) % 128 == 0 && vt.size(3) >= k.size(1),
              "vt must be (batch, nheads_kv, headdim, seqlen_k padded to 128), contiguous");
  for (const auto* d : {&q_descale, &k_descale, &v_descale})
    TORCH_CHECK(d->scalar_type() == at::kFloat && d->is_contiguous() && d->is_cuda(), "descales must be contiguous fp32 CUDA");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = out_.has_value() ? out_.value() : at::empty(q.sizes(), q.options().dtype(at::kBFloat16));
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  fa3::FwdParams p;
  fill_common(p, q, k, k, out, lse, causal, softmax_scale);
  p.v = vt.data_ptr();
  p.v_batch_stride = vt.stride(0), p.v_head_stride = vt.stride(1), p.v_row_stride = vt.stride(2);
  p.vt_seqlen_pad = static_cast<int>(vt.size(3));
  p.dtype = fa3::Dtype::kE4M3;
  p.q_descale = q_descale.data_ptr<float>();
  p.k_descale = k_descale.data_ptr<float>();
  p.v_descale = v_descale.data_ptr<float>();
  p.descale_block_m = static_cast<int>(block_m), p.descale_block_n = static_cast<int>(block_n);
  fa3::run_fwd_step05(p, at::cuda::getCurrentCUDAStream());
  return {out, lse};
}
#endif

// quantize_fp8: 16-bit q, k, v (BSHD, last dim contiguous, any other strides) → e4m3 inputs of step 05 in
// one pass (cuda/fp8_quantize.cu): [q8 (b, sq, h, d), k8 (b, sk, hkv, d), vt8 (b, hkv, d, sk padded to 128, keys
// permuted), q_descale (b, h, ceil(sq/128)), k_descale, v_descale (b, hkv, ceil(sk/128)), status (4 int32:
// [3] has bit i set where input i held inf/NaN)]. signs: CPU (d,) ±1 of the incoherent rotation, or None for
// no rotation. Python (fa3_lab.fp8.quantize_for_kernel) validates first.
std::vector<at::Tensor> quantize_fp8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     c10::optional<at::Tensor> signs_, bool block_quant) {
  const at::Tensor* in[3] = {&q, &k, &v};
  for (const auto* t : in) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device(), "q, k, v must be CUDA tensors on one device");
    TORCH_CHECK(t->scalar_type() == q.scalar_type() &&
                (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16), "q, k, v must all be fp16 or all bf16");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "q, k, v must be 4-D (batch, seqlen, heads, headdim), last dim contiguous");
    for (int d = 0; d < 4; ++d) TORCH_CHECK(t->size(d) >= 1 && t->size(d) < (int64_t{1} << 30), "dimension out of range");
  }
  const int64_t batch = q.size(0), headdim = q.size(3);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch && k.size(3) == headdim, "k, v must be (batch, seqlen_k, nheads_kv, headdim)");
  TORCH_CHECK(headdim == 64 || headdim == 128 || headdim == 256, "headdim must be 64, 128 or 256");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "nheads must be a multiple of nheads_kv");
  int64_t tiles = 0;
  for (const auto* t : in) tiles += batch * ((t->size(1) + 127) / 128) * t->size(2);
  TORCH_CHECK(tiles < (int64_t{1} << 31), "too many 128-row tiles for one grid");
  uint32_t sign_bits[8] = {};
  if (signs_.has_value()) {
    const at::Tensor signs = signs_.value().to(at::kDouble).contiguous();
    TORCH_CHECK(signs.device().is_cpu() && signs.dim() == 1 && signs.size(0) == headdim, "signs must be a CPU (headdim,) tensor");
    const double* sv = signs.data_ptr<double>();
    for (int64_t e = 0; e < headdim; ++e) {
      TORCH_CHECK(sv[e] == 1.0 || sv[e] == -1.0, "signs must be +1 or -1");
      if (sv[e] < 0) sign_bits[e / 32] |= 1u << (e % 32);
    }
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const auto e4m3 = q.options().dtype(at::kFloat8_e4m3fn);
  const auto fp32 = q.options().dtype(at::kFloat);
  const int64_t sq = q.size(1), sk = k.size(1), h = q.size(2), hkv = k.size(2);
  const int64_t nq = (sq + 127) / 128, nk = (sk + 127) / 128;
  at::Tensor q8 = at::empty({batch, sq, h, headdim}, e4m3);  // every byte and descale is written by the kernel
  at::Tensor k8 = at::empty({batch, sk, hkv, headdim}, e4m3);
  at::Tensor vt8 = at::empty({batch, hkv, headdim, nk * 128}, e4m3);
  at::Tensor q_descale = at::empty({batch, h, nq}, fp32);
  at::Tensor k_descale = at::empty({batch, hkv, nk}, fp32);
  at::Tensor v_descale = at::empty({batch, hkv, nk}, fp32);
  at::Tensor status = at::zeros({4}, q.options().dtype(at::kInt));
  const void* src[3];
  int64_t strides[3][3];
  int sizes[3][2];
  for (int i = 0; i < 3; ++i) {
    src[i] = in[i]->data_ptr();
    for (int d = 0; d < 3; ++d)  // the stride of a size-1 dim is never used: 0 keeps the vector loads
      strides[i][d] = in[i]->size(d) == 1 ? 0 : in[i]->stride(d);
    sizes[i][0] = static_cast<int>(in[i]->size(1)), sizes[i][1] = static_cast<int>(in[i]->size(2));
  }
  uint8_t* dst[3] = {static_cast<uint8_t*>(q8.data_ptr()), static_cast<uint8_t*>(k8.data_ptr()),
                     static_cast<uint8_t*>(vt8.data_ptr())};
  float* descale[3] = {q_descale.data_ptr<float>(), k_descale.data_ptr<float>(), v_descale.data_ptr<float>()};
  const cudaError_t err = fa3::run_quantize_fp8(
      src, strides, sizes, dst, descale, static_cast<int>(batch), static_cast<int>(headdim),
      q.scalar_type() == at::kBFloat16, block_quant, signs_.has_value(), sign_bits,
      reinterpret_cast<uint32_t*>(status.data_ptr<int>()), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "quantize_fp8 launch failed: ", cudaGetErrorString(err));
  return {q8, k8, vt8, q_descale, k_descale, v_descale, status};
}

}  // namespace

// cuda/binding_bwd.cpp: the backward (steps in cuda/steps/bwd/)
std::vector<at::Tensor> fa3_bwd(int64_t step, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                                double softmax_scale, bool deterministic, c10::optional<at::Tensor> trace,
                                int64_t trace_ctas);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "FlashAttention-3 forward, one of the lab's steps");
  m.def("bwd", &fa3_bwd, "FlashAttention-3 backward (dq, dk, dv), one of the lab's backward steps");
  m.def("quantize_fp8", &quantize_fp8, "16-bit Q, K, V -> step 05's e4m3 inputs and descales, one fused pass");
#ifdef FA3_HAS_STEP05
  m.def("fwd_fp8", &fwd_fp8, "FP8 e4m3 forward (step 05)");
#endif
}
