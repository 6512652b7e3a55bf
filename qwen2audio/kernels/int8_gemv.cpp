// Weight-only int8 products for decoding (a few rows of activations) on x86 CPUs with AVX-512 VNNI.
//
//   y[r, o] = scales[o] * sum_k x[r, k] * w[o, k]        x (n, in) float, w (out, in) int8, scales (out,)
//
// Why: torch's _weight_int8pack_mm widens every int8 weight to fp32 and is limited by that arithmetic, not by
// memory (on a 2-core Xeon it streams int8 weights no faster than addmv streams bf16 ones, so int8 halved the
// bytes but not the time). Here each x row is rounded once to int16 with one scale per row,
// sx = max|x| / 32767 (an error of at most sx / 2 per element, far below the int8 weights' own), and
// vpdpwssd multiplies 32 int16 pairs per instruction into exact int32 sums.
//
// Overflow: a lane of an int32 accumulator adds two products per instruction, each at most 32767 * 128 in size;
// 8192 elements of a row are 512 products per lane (< 2^31), after which the lanes are added into an int64. The
// sums are exact; the only roundings are the final scaling (in double) and the cast to the output type.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 8192;  // elements per exact int32 sum (see above)

inline __m512i load_w16(const int8_t* p, __mmask32 mask) {  // 32 int8 weights -> 32 int16
  return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, p));
}

inline int64_t reduce_exact(__m512i lanes) {  // the sum of 16 int32 lanes, in int64 (no overflow)
  const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lanes));
  const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lanes, 1));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
}

// R rows of x (int16, padded with zeros to a multiple of 32) times 4 consecutive weight rows -> sums[R][4].
template <int R>
void block(const int16_t* xq, int64_t x_stride, const int8_t* w, int64_t in, int64_t sums[][4]) {
  for (int r = 0; r < R; ++r) std::fill(sums[r], sums[r] + 4, 0);
  for (int64_t c = 0; c < in; c += kChunk) {
    __m512i acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
    const int64_t stop = std::min(c + kChunk, in);
    for (int64_t k = c; k < stop; k += 32) {
      const __mmask32 mask = stop - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (stop - k)) - 1;
      const __m512i w0 = load_w16(w + k, mask), w1 = load_w16(w + in + k, mask);
      const __m512i w2 = load_w16(w + 2 * in + k, mask), w3 = load_w16(w + 3 * in + k, mask);
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + r * x_stride + k);
        acc[r][0] = _mm512_dpwssd_epi32(acc[r][0], xv, w0);
        acc[r][1] = _mm512_dpwssd_epi32(acc[r][1], xv, w1);
        acc[r][2] = _mm512_dpwssd_epi32(acc[r][2], xv, w2);
        acc[r][3] = _mm512_dpwssd_epi32(acc[r][3], xv, w3);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) sums[r][j] += reduce_exact(acc[r][j]);
  }
}

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_gemv: x (n, in), w (out, in)");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.device().is_cpu(),
              "int8_gemv: w must be a contiguous int8 CPU tensor");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0), "int8_gemv: scales must be (out,)");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  const int64_t stride = (in + 31) / 32 * 32;

  // Round each x row to int16 with its own scale (zero rows stay zero).
  const auto xf = x.to(torch::kFloat32).contiguous();
  const float* X = xf.data_ptr<float>();
  std::vector<int16_t> xq(n * stride, 0);
  std::vector<float> sx(n, 0.f);
  for (int64_t r = 0; r < n; ++r) {
    float absmax = 0.f;
    for (int64_t k = 0; k < in; ++k) absmax = std::max(absmax, std::fabs(X[r * in + k]));
    if (absmax == 0.f) continue;
    sx[r] = absmax / 32767.f;
    for (int64_t k = 0; k < in; ++k)  // round half to even, as torch.round
      xq[r * stride + k] = static_cast<int16_t>(std::nearbyint(X[r * in + k] / sx[r]));
  }

  const auto sf = scales.to(torch::kFloat32).contiguous();
  const float* S = sf.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  auto y = torch::empty({n, out}, xf.options());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, (out + 3) / 4, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * 4;
      if (o + 4 > out) {  // the last 1-3 rows when out is not a multiple of 4: plain loops
        for (int64_t oo = o; oo < out; ++oo)
          for (int64_t r = 0; r < n; ++r) {
            int64_t sum = 0;
            for (int64_t k = 0; k < in; ++k) sum += int64_t(xq[r * stride + k]) * W[oo * in + k];
            Y[r * out + oo] = static_cast<float>(double(sum) * sx[r] * S[oo]);
          }
        continue;
      }
      for (int64_t r = 0; r < n; r += 2) {  // two x rows at a time keep the accumulators in registers
        int64_t sums[2][4];
        const int rows = n - r >= 2 ? 2 : 1;
        if (rows == 2) block<2>(xq.data() + r * stride, stride, W + o * in, in, sums);
        else block<1>(xq.data() + r * stride, stride, W + o * in, in, sums);
        for (int i = 0; i < rows; ++i)
          for (int j = 0; j < 4; ++j)
            Y[(r + i) * out + o + j] = static_cast<float>(double(sums[i][j]) * sx[r + i] * S[o + j]);
      }
    }
  });
  return y.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "y = scales * (x @ w.T) for int8 w and a few float rows x (AVX-512 VNNI)");
}
