// The CPU kernels, one file per instruction-set family, behind plain C++ signatures (raw pointers, no torch).
//
//   cpu_avx2.cpp    AVX2 + FMA + F16C: products of a few fp32 rows with bf16 / fp16 / int8 weights, widened in
//                   registers; widening rows of weights to fp32 (or int8 to bf16) at memory speed
//   cpu_avx512.cpp  AVX-512: products of a few rows with int8 weights (VNNI) or bf16 weights (AVX512_BF16)
//   cpu_ops.cpp     the torch-facing functions: checks, threads (at::parallel_for), the CPU check before each call
//
// Each family's file compiles every function with __attribute__((target(...))) and includes no torch header, so
// one extension module holds all of them and runs on any x86-64 CPU: cpu_ops.cpp calls a family's functions only
// after the CPU has reported its instructions (a call on a CPU without them would stop the process).
//
// Weights are row-major (out, in); a "row range" [o_begin, o_end) of outputs is what one thread computes.
#pragma once

#include <xmmintrin.h>  // _mm_prefetch: SSE, on every x86-64 CPU

#include <cstdint>

namespace q2a {

enum class WeightType { bf16, fp16 };

// Ask for the next block of J weight rows (the J * in elements after w's J rows) into the L2 cache, one 64-byte
// line at `offset` bytes into it. The few-row kernels call it once per 64 bytes their block's loop reads of its J
// rows, so the next block is in L2 as this one ends. Rows of 4-8 KB each end a 4 KB page, where the CPU's own
// prefetcher stops and restarts; with this the kernels read 26-33 GB/s instead of 17-26 (AMD EPYC Zen 4, 2 cores).
// The address is computed as an integer: past the last block it points beyond the weight, which a prefetch may do
// but C++ pointer arithmetic may not.
template <typename T>
inline void prefetch_next(const T* w, int J, int64_t in, int64_t offset) {
  const uintptr_t next = reinterpret_cast<uintptr_t>(w) + (J * in) * sizeof(T) + offset;
  _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T1);
}
enum class CacheType { bf16, fp16, fp32 };

// y[r, o] = sum_k x[r, k] * w[o, k] (+ bias[o]) for r < n, o in [o_begin, o_end); x (n, in) fp32, y (n, out) fp32.
void float_rows_avx2(const float* x, int64_t n, const uint16_t* w, WeightType type, const float* bias, int64_t in,
                     int64_t out, int64_t o_begin, int64_t o_end, float* y);

// y[r, o] = sx[r] * scales[o] * sum_k xq[r, k] * w[o, k]: int16 rows (n, stride), zero-padded past `in`; exact
// integer sums (int32 lanes added into int64 every kInt8Chunk elements), scaled in double.
constexpr int64_t kInt8RowPad = 32;  // xq rows are padded with zeros to a multiple of this
void int8_rows_avx2(const int16_t* xq, const float* sx, int64_t n, int64_t stride, const int8_t* w,
                    const float* scales, int64_t in, int64_t out, int64_t o_begin, int64_t o_end, float* y);
void int8_rows_vnni(const int16_t* xq, const float* sx, int64_t n, int64_t stride, const int8_t* w,
                    const float* scales, int64_t in, int64_t out, int64_t o_begin, int64_t o_end, float* y);

// y[r, o] = sum_k x[r, k] * w[o, k] (+ bias[o]) for bf16 x (n, in) and w: exact products, fp32 sums (vdpbf16ps);
// y (n, out) fp32.
void bf16_rows_avx512(const uint16_t* x, int64_t n, const uint16_t* w, const float* bias, int64_t in, int64_t out,
                      int64_t o_begin, int64_t o_end, float* y);

// dst[i] = src[i], exactly, for i < count.
void widen_bf16_avx2(const uint16_t* src, float* dst, int64_t count);
void widen_fp16_avx2(const uint16_t* src, float* dst, int64_t count);
void widen_int8_avx2(const int8_t* src, float* dst, int64_t count);
void widen_int8_to_bf16_avx2(const int8_t* src, uint16_t* dst, int64_t count);

// Attention of one (batch, head) pair: out[t] = softmax_s(scale * q[t] . k[s], where mask[t, s]) @ v, in fp32, for
// T query rows q (T, D) fp32 over S keys and values k, v (S, D) of `type`, rows contiguous; mask (T, S) or null (all
// keys). D: a multiple of 8; scores: room for S floats; out (T, D). A row that may attend to no key gets zeros.
void attend_avx2(const float* q, const void* k, const void* v, CacheType type, const bool* mask, int64_t T,
                 int64_t S, int64_t D, float scale, float* scores, float* out);

}  // namespace q2a
