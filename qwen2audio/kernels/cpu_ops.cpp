// The torch-facing side of the CPU kernels (kernels/extension.py builds this module; kernels/products.py calls it).
//
// Every function checks its tensors, converts small inputs (activation rows, biases, scales) to the kernel's dtype
// (fp32; bf16 rows for the AVX512_BF16 kernel), checks that the CPU has the instructions of the family it calls
// (cpu_kernels.h), and shares the output rows out to torch's threads in tasks (for_tasks). Weights are used in
// place: never copied, never converted as a whole.

// Only the ATen headers it uses (torch/extension.h alone took 31 s to compile here, these 5 s), and the functions
// registered as torch operators (torch.ops.qwen2audio_cpu.*), so no Python binding code is compiled.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace {

enum class Family { avx2, avx512_vnni, avx512_bf16 };  // avx2 also means FMA; each AVX-512 one also BW and VL

void check_cpu(Family family) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(avx2, "qwen2audio CPU kernels: this CPU has no AVX2 + FMA");
  const bool avx512 = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  TORCH_CHECK(family != Family::avx512_vnni || (avx512 && __builtin_cpu_supports("avx512vnni")),
              "qwen2audio CPU kernels: this CPU has no AVX-512 VNNI");
  TORCH_CHECK(family != Family::avx512_bf16 || (avx512 && __builtin_cpu_supports("avx512bf16")),
              "qwen2audio CPU kernels: this CPU has no AVX512_BF16");
}

void check_weight(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x (n, in) and weight (out, in) expected");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && w.is_contiguous(), "contiguous CPU tensors expected");
}

constexpr int64_t kRowsPerTask = 64;  // output rows per thread task: small enough to share 11008 rows out evenly

// fn(begin, end) over [0, count) in tasks of `size`, which torch's threads take one at a time from a shared
// counter: a thread that the OS holds up (another process, the server's event loop) does fewer tasks instead of
// making the others wait for its fixed share at the end. With at::parallel_for's fixed shares, the bf16 kernel of
// 1 or 8 rows took 5-11% longer beside a process that used a fifth of a core (2-core AMD EPYC Zen 4); alone, the two
// ways are as fast.
template <typename Fn>
void for_tasks(int64_t count, int64_t size, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {  // one call per thread (or one in all)
    for (int64_t begin; (begin = next.fetch_add(size)) < count;) fn(begin, std::min(begin + size, count));
  });
}

}  // namespace

// (n, in) rows times a bf16 / fp16 weight (out, in), plus bias: (n, out) fp32.
at::Tensor float_linear_avx2(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias) {
  check_weight(x, w);
  check_cpu(Family::avx2);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf, "bf16 or fp16 weight expected");
  const auto type = w.scalar_type() == at::kHalf ? q2a::WeightType::fp16 : q2a::WeightType::bf16;
  const auto xf = x.to(at::kFloat).contiguous();
  const auto bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!bias || (bf.dim() == 1 && bf.size(0) == w.size(0)), "bias (out,) expected");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  auto y = at::empty({n, out}, xf.options());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* B = bias ? bf.data_ptr<float>() : nullptr;
  for_tasks(out, kRowsPerTask, [&](int64_t begin, int64_t end) {
    q2a::float_rows_avx2(xf.data_ptr<float>(), n, W, type, B, in, out, begin, end, y.data_ptr<float>());
  });
  return y;
}

// (n, in) bf16 rows times a bf16 weight (out, in), plus bias: (n, out) fp32, with AVX512_BF16 (exact products, fp32
// sums). Rows in another dtype are rounded to bf16 first, as F.linear would need them.
at::Tensor bf16_linear_avx512(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias) {
  check_weight(x, w);
  check_cpu(Family::avx512_bf16);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "bf16 weight expected");
  const auto xb = x.to(at::kBFloat16).contiguous();
  const auto bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!bias || (bf.dim() == 1 && bf.size(0) == w.size(0)), "bias (out,) expected");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  auto y = at::empty({n, out}, xb.options().dtype(at::kFloat));
  const auto* X = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* B = bias ? bf.data_ptr<float>() : nullptr;
  for_tasks(out, kRowsPerTask, [&](int64_t begin, int64_t end) {
    q2a::bf16_rows_avx512(X, n, W, B, in, out, begin, end, y.data_ptr<float>());
  });
  return y;
}

// (n, in) rows times an int8 weight (out, in) with per-row scales: (n, out) in x's dtype. Each x row is rounded to
// int16 with its own scale max|x| / 32767 first (an error of at most half that scale per element, far below the
// int8 weights' own); the integer sums are exact. isa: "avx2" or "avx512_vnni" (the same results, bit for bit).
at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scales, std::string isa) {
  check_weight(x, w);
  TORCH_CHECK(isa == "avx2" || isa == "avx512_vnni", "isa must be 'avx2' or 'avx512_vnni'");
  check_cpu(isa == "avx512_vnni" ? Family::avx512_vnni : Family::avx2);
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8 weight expected");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0), "scales (out,) expected");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  const int64_t stride = (in + q2a::kInt8RowPad - 1) / q2a::kInt8RowPad * q2a::kInt8RowPad;

  const auto xf = x.to(at::kFloat).contiguous();
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
  const auto sf = scales.to(at::kFloat).contiguous();
  auto y = at::empty({n, out}, xf.options());
  const auto rows = isa == "avx2" ? q2a::int8_rows_avx2 : q2a::int8_rows_vnni;
  for_tasks(out, kRowsPerTask, [&](int64_t begin, int64_t end) {
    rows(xq.data(), sx.data(), n, stride, w.data_ptr<int8_t>(), sf.data_ptr<float>(), in, out, begin, end,
         y.data_ptr<float>());
  });
  return y.to(x.scalar_type());
}

// The exact widening of `from` to `to` for `count` elements: bf16 / fp16 / int8 -> fp32, or int8 -> bf16.
using WidenFn = void (*)(const void* src, void* dst, int64_t count);

template <typename S, typename D, void (*F)(const S*, D*, int64_t)>
void widen_as(const void* src, void* dst, int64_t count) {
  F(static_cast<const S*>(src), static_cast<D*>(dst), count);
}

WidenFn widen_fn(c10::ScalarType from, c10::ScalarType to) {
  if (to == at::kFloat && from == at::kBFloat16) return widen_as<uint16_t, float, q2a::widen_bf16_avx2>;
  if (to == at::kFloat && from == at::kHalf) return widen_as<uint16_t, float, q2a::widen_fp16_avx2>;
  if (to == at::kFloat && from == at::kChar) return widen_as<int8_t, float, q2a::widen_int8_avx2>;
  if (to == at::kBFloat16 && from == at::kChar)
    return widen_as<int8_t, uint16_t, q2a::widen_int8_to_bf16_avx2>;
  TORCH_CHECK(false, "widen: bf16 / fp16 / int8 -> fp32, or int8 -> bf16 expected, got ", from, " -> ", to);
}

// dst = src, exactly (same number of elements).
void widen(at::Tensor src, at::Tensor dst) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel() && src.device().is_cpu() &&
              dst.device().is_cpu(), "widen: contiguous CPU tensors of the same size expected");
  check_cpu(Family::avx2);
  const WidenFn fn = widen_fn(src.scalar_type(), dst.scalar_type());
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  const int64_t ss = src.element_size(), ds = dst.element_size();
  at::parallel_for(0, src.numel(), 1 << 16, [&](int64_t a, int64_t b) { fn(s + a * ss, d + a * ds, b - a); });
}

// x (M, in) @ w.T for a weight stored narrower than x's dtype (fp32, or bf16 for int8 weights): each thread takes
// blocks of `block_rows` weight rows, widens each into its own buffer (in its cache) and multiplies it there with
// torch's single-threaded GEMM into its columns of y. One parallel region per product; no full-size copy.
at::Tensor widened_mm(at::Tensor x, at::Tensor w, int64_t block_rows) {
  check_weight(x, w);
  check_cpu(Family::avx2);
  TORCH_CHECK(x.is_contiguous() && block_rows > 0, "widened_mm: contiguous x and block_rows > 0 expected");
  const WidenFn fn = widen_fn(w.scalar_type(), x.scalar_type());
  const int64_t out = w.size(0), in = w.size(1), n_blocks = (out + block_rows - 1) / block_rows;
  auto y = at::empty({x.size(0), out}, x.options());
  const auto* W = static_cast<const char*>(w.data_ptr());
  const bool inference = c10::InferenceMode::is_enabled();  // thread-local: the workers take the caller's
  at::parallel_for(0, n_blocks, 1, [&](int64_t first, int64_t last) {
    c10::InferenceMode guard(inference);
    auto buffer = at::empty({block_rows, in}, x.options());
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * block_rows, rows = std::min(block_rows, out - start);
      fn(W + start * in * w.element_size(), buffer.data_ptr(), rows * in);
      auto y_block = y.narrow(1, start, rows);
      at::mm_out(y_block, x, buffer.narrow(0, 0, rows).t());
    }
  });
  return y;
}

q2a::CacheType cache_type(c10::ScalarType dtype) {
  if (dtype == at::kBFloat16) return q2a::CacheType::bf16;
  if (dtype == at::kHalf) return q2a::CacheType::fp16;
  TORCH_CHECK(dtype == at::kFloat, "attend: bf16, fp16 or fp32 keys and values expected, got ", dtype);
  return q2a::CacheType::fp32;
}

// softmax(scale * q @ k.T, where mask) @ v in fp32, for a few query rows over a key / value cache. q (B, H, T, D);
// k, v (B, KVH, S, D) of one dtype with contiguous rows of D (views of a cache: any batch and head strides), H a
// multiple of KVH (grouped-query heads share a kv head); mask (B or 1, 1, T, S) bool "may attend" or None (every
// key). Returns (B, H, T, D) fp32. A thread's task is 4 (batch, head) pairs.
at::Tensor attend(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> mask, double scale) {
  check_cpu(Family::avx2);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && v.strides() == k.strides() &&
              k.scalar_type() == v.scalar_type(), "attend: q (B, H, T, D), k and v (B, KVH, S, D) alike expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KVH = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && KVH > 0 && H % KVH == 0 && D % 8 == 0 && S > 0,
              "attend: batch and head_dim (a multiple of 8) must match, heads a multiple of kv heads");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && q.device().is_cpu() && k.device().is_cpu(),
              "attend: CPU tensors, k and v with contiguous rows expected");
  at::Tensor m;
  if (mask) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) &&
                m.size(1) == 1 && m.size(2) == T && m.size(3) == S, "attend: mask (B or 1, 1, T, S) bool expected");
  }
  const auto type = cache_type(k.scalar_type());
  const auto qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({B, H, T, D}, qf.options());
  const auto* K = static_cast<const char*>(k.data_ptr());
  const auto* V = static_cast<const char*>(v.data_ptr());
  const int64_t size = k.element_size(), group = H / KVH;
  for_tasks(B * H, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, offset = (b * k.stride(0) + (i % H) / group * k.stride(1)) * size;
      const bool* M = mask ? m.data_ptr<bool>() + (m.size(0) == B ? b : 0) * T * S : nullptr;
      q2a::attend_avx2(qf.data_ptr<float>() + i * T * D, K + offset, V + offset, type, M, T, S, D, float(scale),
                       scores.data(), out.data_ptr<float>() + i * T * D);
    }
  });
  return out;
}

TORCH_LIBRARY(qwen2audio_cpu, m) {
  // x @ w.T + bias for a few fp32 rows and a bf16 / fp16 weight
  m.def("float_linear_avx2(Tensor x, Tensor w, Tensor? bias) -> Tensor", &float_linear_avx2);
  // x @ w.T + bias for a few bf16 rows and a bf16 weight, fp32 sums (AVX512_BF16)
  m.def("bf16_linear_avx512(Tensor x, Tensor w, Tensor? bias) -> Tensor", &bf16_linear_avx512);
  // scales * (x @ w.T) for a few rows and an int8 weight (isa avx2 / avx512_vnni)
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales, str isa) -> Tensor", &int8_linear);
  // dst = src, exactly: bf16 / fp16 / int8 -> fp32, int8 -> bf16
  m.def("widen(Tensor src, Tensor(a!) dst) -> ()", &widen);
  // x @ w.T for a narrower weight, widened block by block (per thread)
  m.def("widened_mm(Tensor x, Tensor w, int block_rows) -> Tensor", &widened_mm);
  // softmax(scale * q @ k.T, where mask) @ v in fp32 for a few query rows over a key / value cache
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor", &attend);
}
