// The torch-facing side of the CPU kernels (kernels/extension.py builds this module; kernels/products.py calls it).
//
// Every function checks its tensors, converts small inputs (activation rows, biases, scales) to fp32, checks that
// the CPU has the instructions of the family it calls (cpu_kernels.h), and splits the output rows over torch's
// threads. Weights are used in place: never copied, never converted as a whole.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace {

void check_cpu(bool avx512_vnni) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(avx2, "qwen2audio CPU kernels: this CPU has no AVX2 + FMA");
  TORCH_CHECK(!avx512_vnni || (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                               __builtin_cpu_supports("avx512vnni")),
              "qwen2audio CPU kernels: this CPU has no AVX-512 VNNI");
}

void check_weight(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (n, in) and weight (out, in) expected");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && w.is_contiguous(), "contiguous CPU tensors expected");
}

constexpr int64_t kRowsPerTask = 64;  // output rows per thread task: small enough to share 11008 rows out evenly

}  // namespace

// (n, in) rows times a bf16 / fp16 weight (out, in), plus bias: (n, out) fp32.
torch::Tensor float_linear_avx2(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_weight(x, w);
  check_cpu(false);
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf, "bf16 or fp16 weight expected");
  const auto type = w.scalar_type() == torch::kHalf ? q2a::WeightType::fp16 : q2a::WeightType::bf16;
  const auto xf = x.to(torch::kFloat32).contiguous();
  const auto bf = bias ? bias->to(torch::kFloat32).contiguous() : torch::Tensor();
  TORCH_CHECK(!bias || (bf.dim() == 1 && bf.size(0) == w.size(0)), "bias (out,) expected");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  auto y = torch::empty({n, out}, xf.options());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* B = bias ? bf.data_ptr<float>() : nullptr;
  at::parallel_for(0, out, kRowsPerTask, [&](int64_t begin, int64_t end) {
    q2a::float_rows_avx2(xf.data_ptr<float>(), n, W, type, B, in, out, begin, end, y.data_ptr<float>());
  });
  return y;
}

// (n, in) rows times an int8 weight (out, in) with per-row scales: (n, out) in x's dtype. Each x row is rounded to
// int16 with its own scale max|x| / 32767 first (an error of at most half that scale per element, far below the
// int8 weights' own); the integer sums are exact. isa: "avx2" or "avx512_vnni" (the same results, bit for bit).
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, const std::string& isa) {
  check_weight(x, w);
  TORCH_CHECK(isa == "avx2" || isa == "avx512_vnni", "isa must be 'avx2' or 'avx512_vnni'");
  check_cpu(isa == "avx512_vnni");
  TORCH_CHECK(w.scalar_type() == torch::kInt8, "int8 weight expected");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0), "scales (out,) expected");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  const int64_t stride = (in + q2a::kInt8RowPad - 1) / q2a::kInt8RowPad * q2a::kInt8RowPad;

  const auto xf = x.to(torch::kFloat32).contiguous();
  const float* X = xf.data_ptr<float>();
  std::vector<int16_t> xq(n * stride, 0);
  std::vector<float> sx(n, 0.f);
  for (int64_t r = 0; r < n; ++r) {
    float absmax = 0.f;
    for (int64_t k = 0; k < in; ++k) absmax = std::max(absmax, std::fabs(X[r * in + k]));
    if (absmax == 0.f) continue;  // a zero row stays zero
    sx[r] = absmax / 32767.f;
    for (int64_t k = 0; k < in; ++k)  // round half to even, as torch.round
      xq[r * stride + k] = static_cast<int16_t>(std::nearbyint(X[r * in + k] / sx[r]));
  }
  const auto sf = scales.to(torch::kFloat32).contiguous();
  auto y = torch::empty({n, out}, xf.options());
  const auto rows = isa == "avx2" ? q2a::int8_rows_avx2 : q2a::int8_rows_vnni;
  at::parallel_for(0, out, kRowsPerTask, [&](int64_t begin, int64_t end) {
    rows(xq.data(), sx.data(), n, stride, w.data_ptr<int8_t>(), sf.data_ptr<float>(), in, out, begin, end,
         y.data_ptr<float>());
  });
  return y.to(x.scalar_type());
}

// dst = src, exactly, for src bf16 / fp16 / int8 and dst fp32, or src int8 and dst bf16 (same number of elements).
void widen(torch::Tensor src, torch::Tensor dst) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel() && src.device().is_cpu() &&
              dst.device().is_cpu(), "widen: contiguous CPU tensors of the same size expected");
  check_cpu(false);
  const auto from = src.scalar_type(), to = dst.scalar_type();
  std::function<void(int64_t, int64_t)> part;
  if (to == torch::kFloat32 && (from == torch::kBFloat16 || from == torch::kHalf)) {
    const auto* s = reinterpret_cast<const uint16_t*>(src.data_ptr());
    const auto fn = from == torch::kHalf ? q2a::widen_fp16_avx2 : q2a::widen_bf16_avx2;
    part = [=, d = dst.data_ptr<float>()](int64_t a, int64_t b) { fn(s + a, d + a, b - a); };
  } else if (to == torch::kFloat32 && from == torch::kInt8) {
    part = [s = src.data_ptr<int8_t>(), d = dst.data_ptr<float>()](int64_t a, int64_t b) {
      q2a::widen_int8_avx2(s + a, d + a, b - a);
    };
  } else if (to == torch::kBFloat16 && from == torch::kInt8) {
    part = [s = src.data_ptr<int8_t>(), d = reinterpret_cast<uint16_t*>(dst.data_ptr())](int64_t a, int64_t b) {
      q2a::widen_int8_to_bf16_avx2(s + a, d + a, b - a);
    };
  } else {
    TORCH_CHECK(false, "widen: bf16 / fp16 / int8 -> fp32, or int8 -> bf16 expected, got ", from, " -> ", to);
  }
  at::parallel_for(0, src.numel(), 1 << 16, part);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("float_linear_avx2", &float_linear_avx2, "x @ w.T + bias for a few fp32 rows and a bf16 / fp16 weight");
  m.def("int8_linear", &int8_linear, "scales * (x @ w.T) for a few rows and an int8 weight (isa avx2 / avx512_vnni)");
  m.def("widen", &widen, "dst = src, exactly: bf16 / fp16 / int8 -> fp32, int8 -> bf16");
}
