// AVX2 + FMA (+ F16C) kernels, for every x86-64 CPU since 2013-2015 (Haswell, Zen): see cpu_kernels.h.
//
// Why: without bf16 arithmetic in hardware, torch multiplies bf16 matrices several times slower than fp32 ones, and
// widens a bf16 tensor to fp32 far below memory speed. Here the weights stay bf16 (or fp16, or int8) in memory:
// - decoding (a few rows): each weight is loaded once and widened in a register, then multiplied in fp32 (FMA), so
//   the product runs at the speed the weights stream from memory;
// - prefill and the encoder (many rows): rows of weights are widened to fp32 at memory speed into a small buffer
//   that the fp32 GEMM reads from cache (the Python side, kernels/products.py, drives the blocks).
// Widening bf16, fp16 and int8 to fp32 is exact, so these products are fp32 products of the stored weights.

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))

namespace q2a {
namespace {

AVX2 inline __m256 load8(const uint16_t* p, WeightType type) {  // 8 bf16 or fp16 -> 8 fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (type == WeightType::fp16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16: the high half of fp32
}

AVX2 inline float widen1(uint16_t v, WeightType type) {
  if (type == WeightType::fp16) return _cvtsh_ss(v);
  union { uint32_t u; float f; } bits = {uint32_t(v) << 16};
  return bits.f;
}

AVX2 inline float sum8(__m256 v) {  // horizontal sum of 8 lanes
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// R rows of x times J consecutive weight rows -> dots[R][J]. Each weight vector is loaded and widened once and
// used for all R rows; R * J accumulators + J weights + 1 x stay in the 16 ymm registers (R = 2, J = 4: 13).
template <int R, int J>
AVX2 void float_block(const float* x, int64_t in, const uint16_t* w, WeightType type, float dots[R][J]) {
  __m256 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    prefetch_next(w, J, in, 2 * J * k);
    __m256 wv[J];
    for (int j = 0; j < J; ++j) wv[j] = load8(w + j * in + k, type);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * in + k);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      float d = sum8(acc[r][j]);
      for (int64_t t = k; t < in; ++t) d += x[r * in + t] * widen1(w[j * in + t], type);  // the last < 8
      dots[r][j] = d;
    }
}

template <int J>
AVX2 void float_rows(const float* x, int64_t n, const uint16_t* w, WeightType type, const float* bias, int64_t in,
                     int64_t out, int64_t o, float* y) {
  for (int64_t r = 0; r < n; r += 2) {  // two x rows at a time keep the accumulators in registers
    float dots[2][J];
    const int rows = n - r >= 2 ? 2 : 1;
    if (rows == 2) float_block<2, J>(x + r * in, in, w + o * in, type, dots);
    else float_block<1, J>(x + r * in, in, w + o * in, type, dots);
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < J; ++j) y[(r + i) * out + o + j] = dots[i][j] + (bias ? bias[o + j] : 0.f);
  }
}

// Exact integer dot products of int16 x rows with int8 weight rows. A lane of vpmaddwd adds two products of at
// most 32767 * 128 each; 4096 elements are 256 vpmaddwd per int32 lane (< 2^31), then the lanes go into int64.
constexpr int64_t kChunk = 4096;

AVX2 inline int64_t sum8_exact(__m256i v) {
  const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), wide);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

template <int R, int J>
AVX2 void int8_block(const int16_t* xq, int64_t stride, const int8_t* w, int64_t in, int64_t sums[R][J]) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) sums[r][j] = 0;
  for (int64_t c = 0; c < in; c += kChunk) {
    const int64_t stop = c + kChunk < in ? c + kChunk : in;
    __m256i acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_si256();
    int64_t k = c;
    for (; k + 16 <= stop; k += 16) {
      prefetch_next(w, J, in, J * k);
      __m256i wv[J];
      for (int j = 0; j < J; ++j)
        wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * in + k)));
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * stride + k));
        for (int j = 0; j < J; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(xv, wv[j]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) {
        sums[r][j] += sum8_exact(acc[r][j]);
        for (int64_t t = k; t < stop; ++t) sums[r][j] += int64_t(xq[r * stride + t]) * w[j * in + t];
      }
  }
}

template <int J>
AVX2 void int8_rows(const int16_t* xq, const float* sx, int64_t n, int64_t stride, const int8_t* w,
                    const float* scales, int64_t in, int64_t out, int64_t o, float* y) {
  for (int64_t r = 0; r < n; r += 2) {
    int64_t sums[2][J];
    const int rows = n - r >= 2 ? 2 : 1;
    if (rows == 2) int8_block<2, J>(xq + r * stride, stride, w + o * in, in, sums);
    else int8_block<1, J>(xq + r * stride, stride, w + o * in, in, sums);
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < J; ++j)
        y[(r + i) * out + o + j] = static_cast<float>(double(sums[i][j]) * sx[r + i] * scales[o + j]);
  }
}

// Attention of one (batch, head) pair's T query rows over S cached keys, in fp32 (see cpu_kernels.h). The keys and
// values are read once per query row, widened in registers: bound by reading the cache, as decoding is.
template <CacheType C>
AVX2 inline __m256 load_kv8(const void* row, int64_t d) {
  if constexpr (C == CacheType::fp32) return _mm256_loadu_ps(static_cast<const float*>(row) + d);
  else return load8(static_cast<const uint16_t*>(row) + d, C == CacheType::fp16 ? WeightType::fp16 : WeightType::bf16);
}

template <CacheType C>
AVX2 float dot(const float* q, const void* k, int64_t D) {  // D: a multiple of 8
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_kv8<C>(k, d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load_kv8<C>(k, d + 8), acc1);
  }
  if (d < D) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_kv8<C>(k, d), acc0);
  return sum8(_mm256_add_ps(acc0, acc1));
}

template <CacheType C>
AVX2 void attend_head(const float* q, const char* k, const char* v, int64_t row_bytes, const bool* mask, int64_t T,
                      int64_t S, int64_t D, float scale, float* scores, float* out) {
  for (int64_t t = 0; t < T; ++t, q += D, out += D) {
    const bool* allowed = mask ? mask + t * S : nullptr;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      scores[s] = allowed && !allowed[s] ? -INFINITY : scale * dot<C>(q, k + s * row_bytes, D);
      top = scores[s] > top || std::isnan(scores[s]) ? scores[s] : top;  // a NaN stays: every output NaN
    }
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_setzero_ps());
    if (top == -INFINITY) continue;  // no key allowed: zeros
    float total = 0.f;
    for (int64_t s = 0; s < S; ++s) {  // out += exp(score - top) * v, unnormalised: one pass over the values
      if (scores[s] == -INFINITY) continue;
      const float p = std::exp(scores[s] - top);
      total += p;
      const __m256 pv = _mm256_set1_ps(p);
      for (int64_t d = 0; d < D; d += 8)
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pv, load_kv8<C>(v + s * row_bytes, d), _mm256_loadu_ps(out + d)));
    }
    const __m256 inverse = _mm256_set1_ps(1.f / total);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(inverse, _mm256_loadu_ps(out + d)));
  }
}

}  // namespace

AVX2 void float_rows_avx2(const float* x, int64_t n, const uint16_t* w, WeightType type, const float* bias,
                          int64_t in, int64_t out, int64_t o_begin, int64_t o_end, float* y) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) float_rows<4>(x, n, w, type, bias, in, out, o, y);
  for (; o < o_end; ++o) float_rows<1>(x, n, w, type, bias, in, out, o, y);
}

AVX2 void int8_rows_avx2(const int16_t* xq, const float* sx, int64_t n, int64_t stride, const int8_t* w,
                         const float* scales, int64_t in, int64_t out, int64_t o_begin, int64_t o_end, float* y) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) int8_rows<4>(xq, sx, n, stride, w, scales, in, out, o, y);
  for (; o < o_end; ++o) int8_rows<1>(xq, sx, n, stride, w, scales, in, out, o, y);
}

AVX2 void widen_bf16_avx2(const uint16_t* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8(src + i, WeightType::bf16));
  for (; i < count; ++i) dst[i] = widen1(src[i], WeightType::bf16);
}

AVX2 void widen_fp16_avx2(const uint16_t* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8(src + i, WeightType::fp16));
  for (; i < count; ++i) dst[i] = widen1(src[i], WeightType::fp16);
}

AVX2 void widen_int8_avx2(const int8_t* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
  }
  for (; i < count; ++i) dst[i] = float(src[i]);
}

// int8 -> bf16: exact, since every integer of magnitude <= 256 has a bf16 (its fp32 bits' high half).
AVX2 void widen_int8_to_bf16_avx2(const int8_t* src, uint16_t* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))), 16);
    const __m256i hi = _mm256_srli_epi32(
        _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))), 16);
    // packus works within 128-bit halves: [lo0-3 hi0-3 lo4-7 hi4-7]; the permute restores [lo0-7 hi0-7].
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  for (; i < count; ++i) {
    union { float f; uint32_t u; } bits = {float(src[i])};
    dst[i] = uint16_t(bits.u >> 16);
  }
}

AVX2 void attend_avx2(const float* q, const void* k, const void* v, CacheType type, const bool* mask, int64_t T,
                      int64_t S, int64_t D, float scale, float* scores, float* out) {
  const auto* K = static_cast<const char*>(k);
  const auto* V = static_cast<const char*>(v);
  const int64_t row_bytes = D * (type == CacheType::fp32 ? 4 : 2);
  if (type == CacheType::bf16) attend_head<CacheType::bf16>(q, K, V, row_bytes, mask, T, S, D, scale, scores, out);
  if (type == CacheType::fp16) attend_head<CacheType::fp16>(q, K, V, row_bytes, mask, T, S, D, scale, scores, out);
  if (type == CacheType::fp32) attend_head<CacheType::fp32>(q, K, V, row_bytes, mask, T, S, D, scale, scores, out);
}

}  // namespace q2a
