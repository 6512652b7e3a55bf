// AVX-512 kernels for a few rows: int8 weights with VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and
// later), bf16 weights with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later); see cpu_kernels.h.
//
// int8:
//   y[r, o] = sx[r] * scales[o] * sum_k xq[r, k] * w[o, k]        xq (n, in) int16, w (out, in) int8
//
// Why: torch's _weight_int8pack_mm widens every int8 weight to fp32 and is limited by that arithmetic, not by
// memory (on a 2-core Xeon it streams int8 weights no faster than addmv streams bf16 ones, so int8 halved the
// bytes but not the time). Here each x row has been rounded once to int16 (cpu_ops.cpp), and vpdpwssd multiplies
// 32 int16 pairs per instruction into exact int32 sums.
//
// Overflow: a lane of an int32 accumulator adds two products per instruction, each at most 32767 * 128 in size;
// 8192 elements of a row are 512 products per lane (< 2^31), after which the lanes are added into an int64. The
// sums are exact (the same as cpu_avx2.cpp's); the only roundings are the final scaling (in double) and the cast.
//
// bf16:
//
//   y[r, o] = sum_k x[r, k] * w[o, k] (+ bias[o])                 x (n, in) bf16, w (out, in) bf16, y fp32
//
// Why: torch's bf16 product of 2-16 rows is bound by arithmetic, not memory (F.linear, 8 rows x (11008 x 4096):
// 6.5 ms on a 2-core AMD EPYC Zen 4, where reading the weight takes about 3). vdpbf16ps multiplies 32 bf16 pairs per
// instruction (each product exact in fp32) and adds them into 16 fp32 sums; four x rows share each weight load.
// The tail of a row (in % 32) is loaded with a mask. Only the tail: with masked loads in the main loop the kernel
// took 4.9-6.2 ms for 8 rows x (11008 x 4096) on that Zen 4, with plain loads 3.6-4.0.

#include <immintrin.h>

#include <cstdint>

#include "cpu_kernels.h"

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace q2a {
namespace {

constexpr int64_t kChunk = 8192;  // elements per exact int32 sum (see above)

VNNI inline __m512i load_w16(const int8_t* p, __mmask32 mask) {  // 32 int8 weights -> 32 int16
  return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, p));
}

VNNI inline int64_t reduce_exact(__m512i lanes) {  // the sum of 16 int32 lanes, in int64 (no overflow)
  const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lanes));
  const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lanes, 1));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
}

// R rows of x (int16, padded with zeros to a multiple of 32) times J consecutive weight rows -> sums[R][J].
template <int R, int J>
VNNI void block(const int16_t* xq, int64_t stride, const int8_t* w, int64_t in, int64_t sums[][J]) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) sums[r][j] = 0;
  for (int64_t c = 0; c < in; c += kChunk) {
    __m512i acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_si512();
    const int64_t stop = c + kChunk < in ? c + kChunk : in;
    for (int64_t k = c; k < stop; k += 32) {
      const __mmask32 mask = stop - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (stop - k)) - 1;
      for (int line = 0; line < J * 32; line += 64) prefetch_next(w, J, in, J * k + line);  // a step reads J * 32 B
      __m512i wv[J];
      for (int j = 0; j < J; ++j) wv[j] = load_w16(w + j * in + k, mask);
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + r * stride + k);
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpwssd_epi32(acc[r][j], xv, wv[j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) sums[r][j] += reduce_exact(acc[r][j]);
  }
}

template <int J>
VNNI void rows(const int16_t* xq, const float* sx, int64_t n, int64_t stride, const int8_t* w, const float* scales,
               int64_t in, int64_t out, int64_t o, float* y) {
  for (int64_t r = 0; r < n; r += 2) {  // two x rows at a time keep the accumulators in registers
    int64_t sums[2][J];
    const int count = n - r >= 2 ? 2 : 1;
    if (count == 2) block<2, J>(xq + r * stride, stride, w + o * in, in, sums);
    else block<1, J>(xq + r * stride, stride, w + o * in, in, sums);
    for (int i = 0; i < count; ++i)
      for (int j = 0; j < J; ++j)
        y[(r + i) * out + o + j] = static_cast<float>(double(sums[i][j]) * sx[r + i] * scales[o + j]);
  }
}

template <bool FULL>
BF16 inline __m512i load_bf16(const uint16_t* p, __mmask32 mask) {  // 32 bf16; FULL: all 32, else those of mask
  return FULL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mask, p);
}

// One step of bf16_block: 32 elements of J weight rows times R x rows. FULL: all 32 (plain loads), else `mask`.
template <int R, int J, bool FULL>
BF16 inline void bf16_step(__m512 acc[][J], const uint16_t* x, const uint16_t* w, int64_t in, int64_t k,
                           __mmask32 mask) {
  __m512bh wv[J];
  for (int j = 0; j < J; ++j) wv[j] = (__m512bh)load_bf16<FULL>(w + j * in + k, mask);
  for (int r = 0; r < R; ++r) {
    const __m512bh xv = (__m512bh)load_bf16<FULL>(x + r * in + k, mask);
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
  }
}

// R rows of x times J consecutive weight rows -> sums[R][J]: R * J + J + 1 of the 32 zmm registers.
template <int R, int J>
BF16 void bf16_block(const uint16_t* x, const uint16_t* w, int64_t in, float sums[][J]) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= in; k += 32) {
    for (int line = 0; line < J * 64; line += 64) prefetch_next(w, J, in, 2 * J * k + line);  // a step reads J * 64 B
    bf16_step<R, J, true>(acc, x, w, in, k, 0);
  }
  if (k < in) bf16_step<R, J, false>(acc, x, w, in, k, (__mmask32(1) << (in - k)) - 1);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) sums[r][j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int R, int J>
BF16 void bf16_put(const uint16_t* x, const uint16_t* w, const float* bias, int64_t in, int64_t out, int64_t o,
                   int64_t r, float* y) {
  float sums[R][J];
  bf16_block<R, J>(x + r * in, w + o * in, in, sums);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) y[(r + i) * out + o + j] = sums[i][j] + (bias ? bias[o + j] : 0.f);
}

template <int J>
BF16 void bf16_rows(const uint16_t* x, int64_t n, const uint16_t* w, const float* bias, int64_t in, int64_t out,
                    int64_t o, float* y) {
  int64_t r = 0;  // four x rows at a time; the J weight rows are read from memory once, then from cache
  for (; r + 4 <= n; r += 4) bf16_put<4, J>(x, w, bias, in, out, o, r, y);
  if (n - r == 3) bf16_put<3, J>(x, w, bias, in, out, o, r, y);
  if (n - r == 2) bf16_put<2, J>(x, w, bias, in, out, o, r, y);
  if (n - r == 1) bf16_put<1, J>(x, w, bias, in, out, o, r, y);
}

}  // namespace

BF16 void bf16_rows_avx512(const uint16_t* x, int64_t n, const uint16_t* w, const float* bias, int64_t in,
                           int64_t out, int64_t o_begin, int64_t o_end, float* y) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) bf16_rows<4>(x, n, w, bias, in, out, o, y);
  for (; o < o_end; ++o) bf16_rows<1>(x, n, w, bias, in, out, o, y);  // the last 1-3 weight rows
}

VNNI void int8_rows_vnni(const int16_t* xq, const float* sx, int64_t n, int64_t stride, const int8_t* w,
                         const float* scales, int64_t in, int64_t out, int64_t o_begin, int64_t o_end, float* y) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) rows<4>(xq, sx, n, stride, w, scales, in, out, o, y);
  for (; o < o_end; ++o) rows<1>(xq, sx, n, stride, w, scales, in, out, o, y);  // the last 1-3 weight rows
}

}  // namespace q2a
