// Decode matmuls for x86 CPUs with AVX2 + FMA: the int8 weight-only linear of a decode step's few
// rows (1..~16) and an fp32 GEMV. Built and loaded lazily by cpukernels.py (see its docstring for
// why and how); registers the ops gpt2model_kernels::int8_linear, ::f32_linear and ::calls.
//
// int8_linear(x (rows, in) fp32|bf16, weight int8 (out, in), scales fp32 (out,), bias?, interleaved)
//   y[m, o] = sum_i x[m, i] * weight[o, i] * scales[o] (+ bias[o]), in x's dtype.
// Each activation row is put on its own 15-bit grid (x ~ xq * sx with xq int16 in [-32767, 32767],
// sx = max|x| / 32767: an absolute error of at most max|x| / 65534 per feature, far finer than the
// bf16 activations torch's int8 kernel takes), then the inner loop multiplies int8 weights by the
// int16 activations exactly in integers: vpmovsxbw (16 weights to int16) + vpmaddwd (16 products
// summed in pairs into 8 int32) + vpaddd: 16 multiply-adds per ~3 instructions, where an fp32 loop
// needs a widening, a conversion and an FMA per 8. int32 lanes are exact while a lane holds fewer
// than 2^31 / (2 * 128 * 32767) = 256.0 pairs (even for -128 weights), so the loop sums at most
// CHUNK = 4,096 inputs (256 pairs per lane) before it adds the lanes into an int64: the whole dot product is exact, whatever the order,
// so a row's result does not depend on how many rows the call has, on the blocking or on the
// threads (the engine's "a request gets the same tokens alone or batched").
// Weights are read as 4 concurrent sequential streams (row b of each quarter of the rows in
// turn): one stream of rows reaches ~16 GB/s on a 2-core AVX2 EPYC, four ~24 (quantize.GEMV_STREAMS);
// each block of 4 rows reuses every activation load 4 times, and rows are taken 2 at a time so
// that the block's weights (<= 4 * in bytes, L1-resident) are read from memory once per call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <unistd.h>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 4096;  // inputs summed in int32 lanes before they are added up in int64
// Rows per block, one from each quarter of the weight's rows. Measured (50,257 x 384 head, one row,
// 1 thread): 4 streams 0.9-1.15 ms, 4 consecutive rows (one stream) 1.7-1.8, 8 streams 1.2-1.3,
// 2 streams 1.2-1.3; software prefetching 256-2048 bytes ahead made no difference beyond noise.
constexpr int64_t STREAMS = 4;

// A call whose weight bytes x rows are below this runs on the calling thread alone, whatever
// torch.get_num_threads() says. On the 2-core AVX2 EPYC one thread already streams ~20 GB/s of the
// ~26 GB/s two reach, so a decode step's body matrices (a 1,536 x 384 int8 one: 0.058 ms at 1 and
// at 2 threads) gain nothing from a second thread, while each parallel region is a fork and a join:
// waking the other thread, and on a busy machine waiting for it to be scheduled. Measured (6x384
// BPE, compiled batch-1 step, 2 threads, wall, best / median of 5): quiet, int8 2.34 / 2.52 ms vs
// 2.40 / 2.52 splitting every matrix, fp32 6.41 / 6.75 vs 7.52 / 7.88; at load ~3.5, int8 7.2-8.6 /
// 11.6-13.0 vs 9.7-12.0 / 15.1-16.3. The 50,257-row head (19 MB in int8) and GPT-2 124M's fp32
// matrices (>= 7 MB), and steps of several rows (compute-bound), are still split.
constexpr int64_t SERIAL_BELOW_BYTES = int64_t(4) << 20;

std::atomic<int64_t> g_calls{0};

inline int64_t hsum_epi32(__m256i v) {
  // Exact: each lane is < 2^31 in magnitude, the int64 sum cannot overflow.
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}

inline __m256i madd16(const int8_t* w, __m256i x) {  // 16 int8 weights x 16 int16 activations -> 8 int32 pair sums
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), x);
}

inline __m256i load16(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }

inline int64_t tail(const int16_t* x, const int8_t* w, int64_t k, int64_t k1) {  // the last < 16 inputs
  int64_t t = 0;
  for (; k < k1; ++k) t += int64_t(x[k]) * int64_t(w[k]);
  return t;
}

// acc[m][r] += dot(xq row m, weight row r) over [k0, k1), k1 - k0 <= CHUNK, for NM (1 or 2)
// activation rows and NR (1 or 4) weight rows. The accumulators are named variables, not an
// array, and the file is built with -O2, not -O3 (cpukernels.CXX_FLAGS): g++ 12 -O3 kept an array
// of them on the stack in one build (a store and a load per multiply-add: the 50,257 x 384 head
// 1.2 -> 2.0 ms) and spilled one of the 2-row loop's 8 accumulators with named ones (8-row head
// 6.0 -> 8.2 ms); -O2 keeps all in registers (checked in the disassembly).
template <int NM, int NR>
inline void dot_chunk(const int16_t* const* xq, const int8_t* const* w, int64_t k0, int64_t k1,
                      int64_t (*acc)[STREAMS]) {
  static_assert((NM == 1 || NM == 2) && (NR == 1 || NR == 4));
  const int16_t* x0 = xq[0];
  const int16_t* x1 = xq[NM - 1];
  const int8_t* w0 = w[0];
  const int8_t* w1 = w[NR > 1 ? 1 : 0];
  const int8_t* w2 = w[NR > 1 ? 2 : 0];
  const int8_t* w3 = w[NR > 1 ? 3 : 0];
  const __m256i z = _mm256_setzero_si256();
  __m256i s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z;
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    const __m256i a0 = load16(x0 + k);
    if constexpr (NM == 1) {
      s00 = _mm256_add_epi32(s00, madd16(w0 + k, a0));
      if constexpr (NR == 4) {
        s01 = _mm256_add_epi32(s01, madd16(w1 + k, a0));
        s02 = _mm256_add_epi32(s02, madd16(w2 + k, a0));
        s03 = _mm256_add_epi32(s03, madd16(w3 + k, a0));
      }
    } else {
      const __m256i a1 = load16(x1 + k);
      __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + k)));
      s00 = _mm256_add_epi32(s00, _mm256_madd_epi16(v, a0));
      s10 = _mm256_add_epi32(s10, _mm256_madd_epi16(v, a1));
      if constexpr (NR == 4) {
        v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w1 + k)));
        s01 = _mm256_add_epi32(s01, _mm256_madd_epi16(v, a0));
        s11 = _mm256_add_epi32(s11, _mm256_madd_epi16(v, a1));
        v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w2 + k)));
        s02 = _mm256_add_epi32(s02, _mm256_madd_epi16(v, a0));
        s12 = _mm256_add_epi32(s12, _mm256_madd_epi16(v, a1));
        v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w3 + k)));
        s03 = _mm256_add_epi32(s03, _mm256_madd_epi16(v, a0));
        s13 = _mm256_add_epi32(s13, _mm256_madd_epi16(v, a1));
      }
    }
  }
  acc[0][0] += hsum_epi32(s00) + tail(x0, w0, k, k1);
  if constexpr (NR == 4) {
    acc[0][1] += hsum_epi32(s01) + tail(x0, w1, k, k1);
    acc[0][2] += hsum_epi32(s02) + tail(x0, w2, k, k1);
    acc[0][3] += hsum_epi32(s03) + tail(x0, w3, k, k1);
  }
  if constexpr (NM == 2) {
    acc[1][0] += hsum_epi32(s10) + tail(x1, w0, k, k1);
    if constexpr (NR == 4) {
      acc[1][1] += hsum_epi32(s11) + tail(x1, w1, k, k1);
      acc[1][2] += hsum_epi32(s12) + tail(x1, w2, k, k1);
      acc[1][3] += hsum_epi32(s13) + tail(x1, w3, k, k1);
    }
  }
}

// y rows of NR weight rows (w, their output indices o) for every activation row.
template <int NR>
inline void rows_block(const int16_t* xq, int64_t xq_stride, const float* sx, int64_t rows, int64_t in,
                       const int8_t* const* w, const int64_t* o, const float* scales, const float* bias, float* y,
                       int64_t out) {
  int64_t m = 0;
  for (; m < rows; m += 2) {
    const int nm = rows - m >= 2 ? 2 : 1;
    int64_t acc[2][STREAMS] = {};
    const int16_t* xr[2] = {xq + m * xq_stride, xq + (m + nm - 1) * xq_stride};
    for (int64_t k0 = 0; k0 < in; k0 += CHUNK) {
      const int64_t k1 = std::min(in, k0 + CHUNK);
      if (nm == 2)
        dot_chunk<2, NR>(xr, w, k0, k1, acc);
      else
        dot_chunk<1, NR>(xr, w, k0, k1, acc);
    }
    for (int mm = 0; mm < nm; ++mm)
      for (int r = 0; r < NR; ++r) {
        // One rounding to fp32 of the exact integer sum times both scales (in double).
        double v = double(acc[mm][r]) * double(sx[m + mm]) * double(scales[o[r]]);
        float f = float(v);
        if (bias) f += bias[o[r]];
        y[(m + mm) * out + o[r]] = f;
      }
  }
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// Row m of x (any strides) on its 15-bit grid, in the weight's column order; returns the grid step.
template <typename T>
float quantize_row(const T* x, int64_t stride, int64_t in, bool interleaved, int16_t* xq, float* tmp) {
  const int64_t quarter = in / 4;
  if (interleaved) {
    // Decode order (quantize._interleave): column 4k + j of the weight holds input j * in/4 + k.
    for (int64_t k = 0; k < quarter; ++k)
      for (int64_t j = 0; j < 4; ++j) tmp[4 * k + j] = to_float(x[(j * quarter + k) * stride]);
  } else {
    for (int64_t i = 0; i < in; ++i) tmp[i] = to_float(x[i * stride]);
  }
  float amax = 0.f, poison = 0.f;
  for (int64_t i = 0; i < in; ++i) {
    amax = std::max(amax, std::fabs(tmp[i]));
    poison += tmp[i] * 0.f;  // NaN once any input is inf or NaN
  }
  if (amax == 0.f || poison != 0.f) {
    // A zero row gives zeros; an inf or NaN in the row gives NaN outputs, as a float matmul would.
    for (int64_t i = 0; i < in; ++i) xq[i] = 0;
    return amax == 0.f && poison == 0.f ? 0.f : NAN;
  }
  const float inv = 32767.f / amax;
  // 16 at a time: vcvtps2dq rounds to nearest even (the default rounding mode), as nearbyint does,
  // and |values| <= 32767, so the saturating pack to int16 is exact: the same grid as the scalar
  // loop, whose libm nearbyint call per value cost ~20 ns (~35 us for a 1,536-wide row; ~0.1-0.3
  // ms per 6x384 decode step of 25 calls).
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(tmp + i), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(tmp + i + 8), vinv));
    // packs works per 128-bit lane, giving (a0 b0 a1 b1): reorder the 64-bit quarters to (a0 a1 b0 b1).
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
  }
  for (; i < in; ++i) xq[i] = static_cast<int16_t>(std::nearbyint(tmp[i] * inv));
  return amax / 32767.f;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, bool interleaved) {
  g_calls.fetch_add(1, std::memory_order_relaxed);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "int8_linear: x (rows, in) and weight (out, in) expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "int8_linear: contiguous int8 weight");
  TORCH_CHECK(scales.numel() == weight.size(0), "int8_linear: one scale per output expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_linear: fp32 or bf16 x");
  TORCH_CHECK(!interleaved || x.size(1) % 4 == 0, "int8_linear: interleaved weights need in % 4 == 0");
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out, "int8_linear: bias of ", out, " outputs expected");
    b = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  if (rows == 0 || out == 0) return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());

  // The activations on their grids: (rows, in padded to 16) int16, and each row's step.
  const int64_t xs = (in + 15) / 16 * 16;
  std::vector<int16_t> xq(rows * xs, 0);
  std::vector<float> sx(rows), tmp(in);
  for (int64_t m = 0; m < rows; ++m) {
    if (x.scalar_type() == at::kFloat)
      sx[m] = quantize_row(x.data_ptr<float>() + m * x.stride(0), x.stride(1), in, interleaved, &xq[m * xs], tmp.data());
    else
      sx[m] = quantize_row(x.data_ptr<c10::BFloat16>() + m * x.stride(0), x.stride(1), in, interleaved, &xq[m * xs],
                           tmp.data());
  }
  const int8_t* wp = weight.data_ptr<int8_t>();
  // (A model cast with .to(bfloat16) has bf16 scales: read in fp32.)
  const at::Tensor s32 = scales.scalar_type() == at::kFloat && scales.is_contiguous() ? scales
                                                                                      : scales.to(at::kFloat).contiguous();
  const float* sp = s32.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int16_t* xqp = xq.data();
  const float* sxp = sx.data();

  // Blocks b = 0..nb-1 take rows b, nb + b, 2nb + b, 3nb + b; the last out % 4 rows go one at a time.
  const int64_t nb = out / STREAMS;
  // Threads (torch.get_num_threads()) split the blocks, a part of at least ~64 KB of weights each,
  // and only for calls of at least SERIAL_BELOW_BYTES of weight bytes x rows (see there).
  const int64_t grain = rows * out * in < SERIAL_BELOW_BYTES ? std::max<int64_t>(nb, 1)
                                                              : std::max<int64_t>(1, (64 * 1024) / (STREAMS * in));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t o[STREAMS];
      const int8_t* w[STREAMS];
      for (int r = 0; r < STREAMS; ++r) {
        o[r] = r * nb + blk;
        w[r] = wp + o[r] * in;
      }
      rows_block<STREAMS>(xqp, xs, sxp, rows, in, w, o, sp, bp, yp, out);
    }
  });
  for (int64_t r = nb * STREAMS; r < out; ++r) {
    const int8_t* w[1] = {wp + r * in};
    const int64_t o[1] = {r};
    rows_block<1>(xqp, xs, sxp, rows, in, w, o, sp, bp, yp, out);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// (8 streams measured no faster than 4 here: 50,257 x 384 3.65 vs 3.66-3.78 ms.)
constexpr int64_t F32_STREAMS = STREAMS;
// fp32 GEMV: y[m, o] = sum_i x[m, i] * w[o, i] (+ bias), a block of 4 rows (one per quarter of the
// weight's rows: 4 streams) against up to 2 activation rows at a time, 8-wide FMA accumulators.
inline float hsum_ps(__m256 v) {  // a fixed order: the same bits for a row whatever the call
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

// bf16 weights: 8 per 16-byte load, widened to fp32 by a 16-bit shift (bf16 is fp32's top half).
inline __m256 load_bf16x8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 fp32 or bf16 values (weights, cache entries) as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) { return load_bf16x8(p); }

// (Named accumulators, not an array, for the reason given at dot_chunk.) W is float or bf16: the
// same arithmetic and summation order, reading 4 or 2 bytes per weight.
template <int NM, typename W = float>
inline void f32_block(const float* const* xr, const W* const* w, int64_t in, float (*acc)[F32_STREAMS]) {
  static_assert(F32_STREAMS == 4 && (NM == 1 || NM == 2));
  const float *x0 = xr[0], *x1 = xr[NM - 1];
  const W *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  const __m256 z = _mm256_setzero_ps();
  __m256 s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z;
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    const __m256 a0 = _mm256_loadu_ps(x0 + k);
    if constexpr (NM == 1) {
      s00 = _mm256_fmadd_ps(load8(w0 + k), a0, s00);
      s01 = _mm256_fmadd_ps(load8(w1 + k), a0, s01);
      s02 = _mm256_fmadd_ps(load8(w2 + k), a0, s02);
      s03 = _mm256_fmadd_ps(load8(w3 + k), a0, s03);
    } else {
      const __m256 a1 = _mm256_loadu_ps(x1 + k);
      __m256 v = load8(w0 + k);
      s00 = _mm256_fmadd_ps(v, a0, s00);
      s10 = _mm256_fmadd_ps(v, a1, s10);
      v = load8(w1 + k);
      s01 = _mm256_fmadd_ps(v, a0, s01);
      s11 = _mm256_fmadd_ps(v, a1, s11);
      v = load8(w2 + k);
      s02 = _mm256_fmadd_ps(v, a0, s02);
      s12 = _mm256_fmadd_ps(v, a1, s12);
      v = load8(w3 + k);
      s03 = _mm256_fmadd_ps(v, a0, s03);
      s13 = _mm256_fmadd_ps(v, a1, s13);
    }
  }
  const __m256 s[2][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}};
  const W* wr[4] = {w0, w1, w2, w3};
  const float* xm[2] = {x0, x1};
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < 4; ++r) {
      float t = hsum_ps(s[m][r]);
      for (int64_t j = k; j < in; ++j) t += xm[m][j] * float(wr[r][j]);
      acc[m][r] = t;
    }
}

// bf16 weights, 16 per 32-byte load (decode_step's bf16 layers): a load holds 8 (even, odd) pairs
// of bf16; the even element becomes an fp32 by a 16-bit left shift of its 32-bit lane, the odd one
// by clearing the lane's low 16 bits (bf16 is fp32's top half): 2 integer ops per 16 weights,
// where widening 8 at a time (load_bf16x8: a zero-extension and a shift per 8) takes 4. The
// activations are read in the matching order: xd holds each 16-block's 8 even inputs, then its 8
// odd ones (deinterleave16). A fixed summation order per row (the same bits for any rows, chunks
// or threads); the in % 16 inputs left over are added one at a time.
inline void deinterleave16(const float* x, float* xd, int64_t in) {
  int64_t k = 0;
  for (; k + 16 <= in; k += 16)
    for (int j = 0; j < 8; ++j) {
      xd[k + j] = x[k + 2 * j];
      xd[k + 8 + j] = x[k + 2 * j + 1];
    }
  for (; k < in; ++k) xd[k] = x[k];
}

template <int NM>
inline void bf16_block(const float* const* xd, const c10::BFloat16* const* w, int64_t in, float (*acc)[F32_STREAMS]) {
  static_assert(F32_STREAMS == 4 && (NM == 1 || NM == 2));
  const float *d0 = xd[0], *d1 = xd[NM - 1];
  const c10::BFloat16 *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  const __m256 z = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  __m256 s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z;
  auto pair = [&](const c10::BFloat16* p, __m256& even, __m256& odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
  };
  int64_t k = 0;
  for (; k + 16 <= in; k += 16) {
    const __m256 e0 = _mm256_loadu_ps(d0 + k), o0 = _mm256_loadu_ps(d0 + k + 8);
    __m256 we, wo;
    if constexpr (NM == 1) {
      pair(w0 + k, we, wo); s00 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s00));
      pair(w1 + k, we, wo); s01 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s01));
      pair(w2 + k, we, wo); s02 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s02));
      pair(w3 + k, we, wo); s03 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s03));
    } else {
      const __m256 e1 = _mm256_loadu_ps(d1 + k), o1 = _mm256_loadu_ps(d1 + k + 8);
      pair(w0 + k, we, wo);
      s00 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s00));
      s10 = _mm256_fmadd_ps(wo, o1, _mm256_fmadd_ps(we, e1, s10));
      pair(w1 + k, we, wo);
      s01 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s01));
      s11 = _mm256_fmadd_ps(wo, o1, _mm256_fmadd_ps(we, e1, s11));
      pair(w2 + k, we, wo);
      s02 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s02));
      s12 = _mm256_fmadd_ps(wo, o1, _mm256_fmadd_ps(we, e1, s12));
      pair(w3 + k, we, wo);
      s03 = _mm256_fmadd_ps(wo, o0, _mm256_fmadd_ps(we, e0, s03));
      s13 = _mm256_fmadd_ps(wo, o1, _mm256_fmadd_ps(we, e1, s13));
    }
  }
  const __m256 s[2][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}};
  const c10::BFloat16* wr[4] = {w0, w1, w2, w3};
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < 4; ++r) {
      float t = hsum_ps(s[m][r]);
      for (int64_t j = k; j < in; ++j) t += xd[m][j] * float(wr[r][j]);  // (past the 16-blocks xd is x)
      acc[m][r] = t;
    }
}

at::Tensor f32_linear(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  g_calls.fetch_add(1, std::memory_order_relaxed);
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2 && x_in.size(1) == weight.size(1), "f32_linear: shapes");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && x_in.scalar_type() == at::kFloat,
              "f32_linear: fp32 x and a contiguous fp32 weight");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
    bp = b.data_ptr<float>();
  }
  const float* wp = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t xs = x.stride(0);
  float* yp = y.data_ptr<float>();
  const int64_t nb = out / F32_STREAMS;
  auto block = [&](const float* const* w, const int64_t* o, int nr) {
    for (int64_t m = 0; m < rows; m += 2) {
      const int nm = rows - m >= 2 ? 2 : 1;
      const float* xr[2] = {xp + m * xs, xp + (m + nm - 1) * xs};
      float acc[2][F32_STREAMS];
      if (nm == 2) f32_block<2>(xr, w, in, acc); else f32_block<1>(xr, w, in, acc);
      for (int mm = 0; mm < nm; ++mm)
        for (int r = 0; r < nr; ++r) yp[(m + mm) * out + o[r]] = acc[mm][r] + (bp ? bp[o[r]] : 0.f);
    }
  };
  const int64_t grain = rows * out * in * 4 < SERIAL_BELOW_BYTES
                            ? std::max<int64_t>(nb, 1)  // one thread (see SERIAL_BELOW_BYTES)
                            : std::max<int64_t>(1, (256 * 1024) / (F32_STREAMS * in * 4));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t o[F32_STREAMS];
      const float* w[F32_STREAMS];
      for (int r = 0; r < F32_STREAMS; ++r) { o[r] = r * nb + blk; w[r] = wp + o[r] * in; }
      block(w, o, F32_STREAMS);
    }
  });
  for (int64_t r0 = nb * F32_STREAMS; r0 < out; ++r0) {
    // The last out % 4 rows: the same arithmetic with the block's other rows repeating this one.
    int64_t o[F32_STREAMS];
    const float* w[F32_STREAMS];
    for (int r = 0; r < F32_STREAMS; ++r) { o[r] = r0; w[r] = wp + r0 * in; }
    block(w, o, 1);
  }
  return y;
}


// ---------------------------------------------------------------------------------------------
// decode_step: a whole decode step of the GPT (B <= 16 rows, one token each, cache rows 0..B-1 of
// caches of >= B rows) in ONE op with ONE parallel region, called eagerly once per token by CPU decode
// steps (model.GPT._fused_decode says when it applies; the PyTorch path stays the reference and
// the fallback).
//
// Why: a compiled step made ~25 calls of the ops above plus ~20 of inductor's fused kernels, each
// an OpenMP region. At one thread that is ~8-11 us of dispatch per op call; at two threads every
// region is also a fork and a join, and on this 2-core VM the second thread added almost nothing
// (6x384 BPE int8: 2.6-2.9 ms per token at 1 and at 2 threads, while llama.cpp's one thread pool
// with spin barriers between its graph's nodes went 3.6 -> 2.0 ms). Here the threads enter once
// and go from phase to phase (the matmuls, attention) the way llama.cpp's graph compute does.
//
// Phases: each phase's work is cut into chunks (ranges of 4-row weight blocks, attention heads);
// a thread takes the next chunk with an atomic counter until none is left, then waits until every
// chunk of the phase is done (Phase::done). Nothing depends on how many threads take part: one
// thread alone does every chunk (at one thread, or when the helpers never get a CPU) and a thread
// never waits for a thread that has not started (StepPool), so there is no deadlock. Every output element is computed by exactly one
// chunk with the same arithmetic, so the results do not depend on the threads (nor, per row, on
// the other rows: the int8 and fp32 dot products above are row-independent).
// Small serial work (layer norms, GELU, an int8 layer's activation grid) is done by EVERY thread
// into its own scratch instead of by one thread behind a barrier: a few microseconds of
// duplicated arithmetic is cheaper than a barrier round trip and a thread waiting on it.
// A thread that falls behind (descheduled on a busy machine) may find a phase finished by the
// others: it then claims nothing there, so its scratch, computed from inputs that may already
// have moved on, is never used; a chunk it does claim belongs to an unfinished phase, whose
// inputs (written by earlier, finished phases) are stable.

struct alignas(64) Phase {  // one cache line each: the two threads' counters do not false-share
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

#ifdef GPT2_PHASE_PROFILE
// Built with -DGPT2_PHASE_PROFILE only (bench/profiling): per thread and phase, nanoseconds spent
// before the phase (the serial, duplicated work since the last one), in its chunks, and waiting.
double g_prof[4][64][4];
thread_local int64_t t_last = 0;
inline int64_t now_ns() { return std::chrono::steady_clock::now().time_since_epoch().count(); }
std::atomic<int64_t> g_step_start{0};  // when the caller opened the step (StepPool::run)
#endif

#ifndef SPIN_PAUSES
#define SPIN_PAUSES 20000
#endif
// Take chunks 0..n-1 of a phase until none are left, then wait for the others' chunks.
template <typename F>
void run_phase(Phase& ph, int64_t n, F&& chunk, int tid = 0, int idx = 0) {
#ifdef GPT2_PHASE_PROFILE
  const int64_t t0 = now_ns();
  double* pr = g_prof[std::min(tid, 3)][std::min(idx, 63)];
  if (t_last) pr[0] += t0 - t_last;
#endif
  for (int64_t c; (c = ph.next.fetch_add(1, std::memory_order_relaxed)) < n;) {
    chunk(c);
    ph.done.fetch_add(1, std::memory_order_release);
#ifdef GPT2_PHASE_PROFILE
    pr[3] += 1;
#endif
  }
#ifdef GPT2_PHASE_PROFILE
  const int64_t t1 = now_ns();
  pr[1] += t1 - t0;
#endif
  for (int spins = 0; ph.done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < SPIN_PAUSES) _mm_pause();
    else std::this_thread::yield();  // the other thread is off the CPU (a busy machine): let it run
  }
#ifdef GPT2_PHASE_PROFILE
  t_last = now_ns();
  pr[2] += t_last - t1;
#endif
}

// A small float vector of the model's dtype (layer norm weights, biases, embeddings, masks).
struct FVec {
  const void* p = nullptr;
  bool bf16 = false;
  float operator[](int64_t i) const {
    return bf16 ? float(static_cast<const c10::BFloat16*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  explicit operator bool() const { return p != nullptr; }
  FVec shifted(int64_t n) const {  // the vector from element n on
    FVec v = *this;
    if (p) v.p = bf16 ? static_cast<const void*>(static_cast<const c10::BFloat16*>(p) + n)
                      : static_cast<const void*>(static_cast<const float*>(p) + n);
    return v;
  }
};

FVec fvec(const at::Tensor& t) {
  FVec v;
  if (!t.defined() || t.numel() == 0) return v;
  TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "decode_step: contiguous fp32/bf16 vectors expected");
  v.p = t.data_ptr();
  v.bf16 = t.scalar_type() == at::kBFloat16;
  return v;
}

FVec fvec_strided(const at::Tensor& t) {  // a (rows, 1, 1, L) mask: rows at any stride, L contiguous
  FVec v;
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "decode_step: an fp32/bf16 mask expected");
  v.p = t.data_ptr();
  v.bf16 = t.scalar_type() == at::kBFloat16;
  return v;
}

// exp(x) for 8 floats (Cephes' expf: range reduction by ln 2 in two parts, a degree-5
// polynomial; ~1 ulp), clamped to fp32's normal range: -inf gives ~1e-38, callers that need an
// exact 0 there (masked attention slots) select it.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

inline float exp1(float x) {  // the same function on one float (tails), so no element depends on its position
  alignas(32) float l[8] = {x};
  _mm256_store_ps(l, exp8(_mm256_load_ps(l)));
  return l[0];
}

// GELU (tanh form) as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): model.gelu_tanh's
// compiled form (the same function; see there).
void gelu_row(const float* x, float* y, int64_t n) {
  const float c = 2.0f * 0.7978845608028654f;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 z = _mm256_mul_ps(_mm256_set1_ps(c),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
    _mm256_storeu_ps(y + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
  }
  for (; i < n; ++i) {
    const float v = x[i];
    y[i] = v / (1.f + exp1(-c * (v + 0.044715f * v * v * v)));
  }
}

// nn.LayerNorm of one row (biased variance, as torch), in fp32 with a double-free two-pass form.
void layer_norm_row(const float* x, float* y, int64_t n, FVec w, FVec b, float eps) {
  float mean = 0.f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= float(n);
  float var = 0.f;
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.f / std::sqrt(var / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * (w ? w[i] : 1.f) + (b ? b[i] : 0.f);
}


// One linear layer of the step: its weight (int8 with fp32 scales, fp32, or bf16; row-major), bias.
struct Lin {
  enum Kind { F32, BF16, INT8 } kind = F32;
  const void* w = nullptr;
  const float* scales = nullptr;
  FVec bias;
  int64_t in = 0, out = 0;
  bool interleaved = false;
};

Lin make_lin(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& bias, bool interleaved) {
  Lin l;
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "decode_step: contiguous 2-D weights expected");
  l.in = w.size(1);
  l.out = w.size(0);
  l.w = w.data_ptr();
  l.bias = fvec(bias);
  TORCH_CHECK(!l.bias || bias.numel() == l.out, "decode_step: a bias per output expected");
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == l.out,
                "decode_step: an int8 weight needs fp32 scales, one per output");
    TORCH_CHECK(!interleaved || l.in % 4 == 0, "decode_step: interleaved weights need in % 4 == 0");
    l.kind = Lin::INT8;
    l.scales = scales.data_ptr<float>();
    l.interleaved = interleaved;
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
                "decode_step: int8, fp32 or bf16 weights expected");
    l.kind = w.scalar_type() == at::kFloat ? Lin::F32 : Lin::BF16;
  }
  return l;
}

// A thread's view of a linear layer's input rows: fp32 rows, and for an int8 layer the same rows
// on their 15-bit grids (quantize_row: int8_linear's arithmetic exactly, so a row gets the bits
// it gets from int8_linear, whatever the rows and the threads).
struct Input {
  const float* x = nullptr;  // (rows, in), row stride `stride`
  int64_t stride = 0;
  std::vector<int16_t> xq;
  std::vector<float> sx, tmp;
  std::vector<float> xd;  // bf16 layers: the rows deinterleaved (rows, in)
  int64_t xs = 0;  // xq's row stride
  void prepare(const Lin& l, const float* x_, int64_t stride_, int64_t rows) {
    x = x_;
    stride = stride_;
    if (l.kind == Lin::BF16) {  // each row's 16-blocks as (8 even, 8 odd) inputs: bf16_block's order
      xd.resize(rows * l.in);
      for (int64_t m = 0; m < rows; ++m) deinterleave16(x + m * stride, &xd[m * l.in], l.in);
      return;
    }
    if (l.kind != Lin::INT8) return;
    xs = (l.in + 15) / 16 * 16;
    xq.assign(rows * xs, 0);
    sx.resize(rows);
    tmp.resize(l.in);
    for (int64_t m = 0; m < rows; ++m) sx[m] = quantize_row(x + m * stride, 1, l.in, l.interleaved, &xq[m * xs], tmp.data());
  }
};

// The chunks of a linear layer: ranges of its 4-row blocks (block b: rows b, nb + b, 2nb + b,
// 3nb + b), sized so that both threads get several (balance) of >= ~16 KB of weights each (a
// chunk costs one atomic), and one last chunk for the out % 4 rows left over. Up to PHASE_CHUNKS
// per layer: the 50,257-row head's int8 chunks are then ~0.6 MB (~30 us), so the two threads
// finish within about one chunk of each other.
#ifndef PHASE_CHUNKS
#define PHASE_CHUNKS 32
#endif
struct Plan {
  int64_t nb, per, nblocks_chunks, tail;
  int64_t chunks() const { return nblocks_chunks + (tail ? 1 : 0); }
};

Plan plan(const Lin& l) {
  Plan p;
  p.nb = l.out / STREAMS;
  p.tail = l.out - p.nb * STREAMS;
  const int64_t bytes_per_block = STREAMS * l.in * (l.kind == Lin::INT8 ? 1 : l.kind == Lin::BF16 ? 2 : 4);
  const int64_t min_blocks = std::max<int64_t>(1, (16 * 1024) / bytes_per_block);
  p.per = std::max(min_blocks, (p.nb + PHASE_CHUNKS - 1) / PHASE_CHUNKS);
  p.nblocks_chunks = p.nb ? (p.nb + p.per - 1) / p.per : 0;
  return p;
}

// Chunk c of a linear layer for all `rows` input rows: emit(m, o, value) for each output.
template <typename Emit>
void linear_chunk(const Lin& l, const Plan& p, const Input& in, int64_t rows, int64_t c, Emit&& emit) {
  int64_t o[STREAMS];
  auto rows_of = [&](int64_t blk, int nr) {
    for (int r = 0; r < STREAMS; ++r) o[r] = nr == 1 ? p.nb * STREAMS + blk : r * p.nb + blk;
  };
  int64_t b0, b1;
  int nr;
  if (c < p.nblocks_chunks) {
    b0 = c * p.per;
    b1 = std::min(p.nb, b0 + p.per);
    nr = STREAMS;
  } else {
    b0 = 0;
    b1 = p.tail;
    nr = 1;
  }
  for (int64_t blk = b0; blk < b1; ++blk) {
    rows_of(blk, nr);
    if (l.kind == Lin::INT8) {
      const int8_t* wp = static_cast<const int8_t*>(l.w);
      const int8_t* w[STREAMS];
      for (int r = 0; r < STREAMS; ++r) w[r] = wp + o[r] * l.in;
      for (int64_t m = 0; m < rows; m += 2) {
        const int nm = rows - m >= 2 ? 2 : 1;
        int64_t acc[2][STREAMS] = {};
        const int16_t* xr[2] = {&in.xq[m * in.xs], &in.xq[(m + nm - 1) * in.xs]};
        for (int64_t k0 = 0; k0 < l.in; k0 += CHUNK) {
          const int64_t k1 = std::min(l.in, k0 + CHUNK);
          if (nr == STREAMS) {
            if (nm == 2) dot_chunk<2, STREAMS>(xr, w, k0, k1, acc); else dot_chunk<1, STREAMS>(xr, w, k0, k1, acc);
          } else {
            if (nm == 2) dot_chunk<2, 1>(xr, w, k0, k1, acc); else dot_chunk<1, 1>(xr, w, k0, k1, acc);
          }
        }
        for (int mm = 0; mm < nm; ++mm)
          for (int r = 0; r < nr; ++r) {  // int8_linear's epilogue: one rounding, then the bias
            float f = float(double(acc[mm][r]) * double(in.sx[m + mm]) * double(l.scales[o[r]]));
            if (l.bias) f += l.bias[o[r]];
            emit(m + mm, o[r], f);
          }
      }
    } else {
      for (int64_t m = 0; m < rows; m += 2) {
        const int nm = rows - m >= 2 ? 2 : 1;
        const float* xr[2] = {in.x + m * in.stride, in.x + (m + nm - 1) * in.stride};
        float acc[2][F32_STREAMS];
        if (l.kind == Lin::F32) {
          const float* wp = static_cast<const float*>(l.w);
          const float* w[F32_STREAMS];
          for (int r = 0; r < STREAMS; ++r) w[r] = wp + o[r] * l.in;  // (tail: the same row 4 times)
          if (nm == 2) f32_block<2>(xr, w, l.in, acc); else f32_block<1>(xr, w, l.in, acc);
        } else {
          const c10::BFloat16* wp = static_cast<const c10::BFloat16*>(l.w);
          const c10::BFloat16* w[F32_STREAMS];
          for (int r = 0; r < STREAMS; ++r) w[r] = wp + o[r] * l.in;
          const float* xdr[2] = {&in.xd[m * l.in], &in.xd[(m + nm - 1) * l.in]};
          if (nm == 2) bf16_block<2>(xdr, w, l.in, acc); else bf16_block<1>(xdr, w, l.in, acc);
        }
        for (int mm = 0; mm < nm; ++mm)
          for (int r = 0; r < nr; ++r) emit(m + mm, o[r], acc[mm][r] + (l.bias ? l.bias[o[r]] : 0.f));
      }
    }
  }
}

// Attention of one row and head: write this token's k, v into cache slot `slot`, then softmax
// over slots 0..L-1 (scores scaled by 1/sqrt(hd) plus the additive mask) and the weighted sum of
// v: model.decode_attention's arithmetic (fp32 inside). hd % 8 == 0 (checked by the caller).
template <typename T>
void attend(const float* q, const float* k_new, const float* v_new, T* kc, T* vc, int64_t slot, int64_t L,
            int64_t hd, FVec mask, float* scores, float* y) {
  for (int64_t d = 0; d < hd; ++d) {
    kc[slot * hd + d] = T(k_new[d]);
    vc[slot * hd + d] = T(v_new[d]);
  }
  const float scale = 1.0f / std::sqrt(float(hd));
  // Scores, 4 slots at a time (4 independent FMA chains instead of one).
  int64_t j = 0;
  for (; j + 4 <= L; j += 4) {
    const T *k0 = kc + j * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, load8(k0 + d), a0);
      a1 = _mm256_fmadd_ps(qv, load8(k1 + d), a1);
      a2 = _mm256_fmadd_ps(qv, load8(k2 + d), a2);
      a3 = _mm256_fmadd_ps(qv, load8(k3 + d), a3);
    }
    scores[j] = hsum_ps(a0);
    scores[j + 1] = hsum_ps(a1);
    scores[j + 2] = hsum_ps(a2);
    scores[j + 3] = hsum_ps(a3);
  }
  for (; j < L; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kc + j * hd + d), a);
    scores[j] = hsum_ps(a);
  }
  float mx = -INFINITY;
  for (j = 0; j < L; ++j) {
    scores[j] = scores[j] * scale + mask[j];
    mx = std::max(mx, scores[j]);
  }
  // exp(s - max), 8 at a time (masked slots, -inf, give exactly 0), padded to a multiple of 8.
  const int64_t L8 = (L + 7) / 8 * 8;
  for (j = L; j < L8; ++j) scores[j] = -INFINITY;
  const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
  __m256 vsum = _mm256_setzero_ps();
  for (j = 0; j < L8; j += 8) {
    const __m256 s = _mm256_loadu_ps(scores + j);
    const __m256 e = _mm256_blendv_ps(exp8(_mm256_sub_ps(s, vmx)), _mm256_setzero_ps(), _mm256_cmp_ps(s, ninf, _CMP_EQ_OQ));
    _mm256_storeu_ps(scores + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  const float inv = 1.f / hsum_ps(vsum);
  // y = sum_j p_j v_j, 8 dimensions at a time with the accumulator in a register.
  for (int64_t d = 0; d < hd; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (j = 0; j < L; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), load8(vc + j * hd + d), acc);
    _mm256_storeu_ps(y + d, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
  }
}

// The step's helper threads: our own, not an OpenMP region. An OpenMP region ends in a join that
// waits for every thread of the team, even one that never got a CPU during the step: on a busy
// machine (load 2-3 on the 2-core VM) a worker woken for each token often sat in the run queue for
// a scheduler time slice, and the step waited for it (6x384 BPE int8 generate at two threads
// 7-10 ms per token against 2.4-5.6 at one). Here the calling thread never waits for a helper that
// has not started the step: a helper enters a step only if it is still open (`active`, `closed`:
// a seq_cst handshake), and the caller, after its own share, closes the step and waits only for
// helpers inside it. A helper that arrives late finds every phase's chunks taken and leaves. Idle
// helpers spin ~0.3 ms (a pause is ~33 ns on the 2-core EPYC), then sleep: longer than the Python
// between two greedy tokens (~0.05-0.15 ms since greedy_step), so a helper is awake for the next
// step instead of waiting for a wake-up (4,000 spins, ~0.13 ms: in a generate at load ~4 the
// helper missed 15-25% of the steps and joined the rest 0.5-1.8 ms late on average; 10,000: it
// joined every step, 0.07-0.14 ms late on average in one round, ~0.5 ms in another: load noise).
#ifndef HELPER_SPINS
#define HELPER_SPINS 10000
#endif
struct StepPool {
  std::atomic<uint64_t> gen{0}, closed{0};
  std::atomic<int> active{0}, sleepers{0};
  const std::function<void(int)>* job = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::thread> threads;
  pid_t pid = 0;

  void helper(int tid) {
    uint64_t seen = gen.load();
    for (;;) {
      for (int spins = 0; gen.load() == seen; ++spins) {
        if (spins < HELPER_SPINS) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu);
        sleepers.fetch_add(1);
        cv.wait(lock, [&] { return gen.load() != seen; });
        sleepers.fetch_sub(1);
      }
      const uint64_t g = gen.load();
      seen = g;
      active.fetch_add(1);
#ifdef GPT2_PHASE_PROFILE
      g_prof[std::min(tid, 3)][63][0] += double(now_ns() - g_step_start);  // how late a helper joins
      g_prof[std::min(tid, 3)][63][3] += 1;
#endif
      if (closed.load() < g) (*job)(tid);  // still open: the job of step g is alive until active drops
      active.fetch_sub(1);
    }
  }
  std::mutex busy;  // one step at a time on the helpers; a concurrent step runs on its own thread
  // Run fn(0) here and fn(1..n-1) on helpers that manage to join in time.
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> one_step(busy, std::try_to_lock);
    if (!one_step.owns_lock()) {
      fn(0);
      return;
    }
    while (int(threads.size()) < n - 1) {
      threads.emplace_back([this, t = int(threads.size()) + 1] { helper(t); });
      threads.back().detach();
    }
    job = &fn;
#ifdef GPT2_PHASE_PROFILE
    g_step_start = now_ns();
#endif
    const uint64_t g = gen.fetch_add(1) + 1;
    if (sleepers.load() > 0) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
    fn(0);
    closed.store(g);
    for (int spins = 0; active.load() != 0; ++spins) {
      if (spins < 20000) _mm_pause();
      else std::this_thread::yield();
    }
  }
};
StepPool* g_pool = nullptr;  // never destroyed: detached helpers may still read it at exit

// The pool of this process: a forked child (a benchmark's case, a data loader's worker) gets a new
// one, as the parent's helpers are not there and the parent's locks may have been held at the fork.
StepPool& step_pool() {
  static std::mutex made;
  std::lock_guard<std::mutex> lock(made);
  if (g_pool == nullptr || g_pool->pid != getpid()) {
    g_pool = new StepPool;
    g_pool->pid = getpid();
  }
  return *g_pool;
}

// Whether a step runs on all of torch's threads or on the calling thread alone, chosen by
// measuring both. The phases end in spin barriers and the region in OpenMP's join, so a step at
// two threads waits whenever one of its threads is off the CPU. On a quiet 2-core machine two
// threads are faster (6x384 BPE int8: the op 1.1-1.4 ms against 1.9-2.1 at one); with other jobs
// running (load 4-5 on the 2-core VM), the median step at two threads took 4-16 ms (whole
// scheduler time slices lost at barriers) against 2.0-2.3 at one. So per row count B (steps of
// different B are not comparable): run in the mode that is faster on recent steps (a moving
// average of the wall time per step), trying the other mode for one step every `every` steps;
// that interval doubles (up to 256) while the other mode keeps losing, so a bad mode costs < 1%.
// (Measured at load ~1: bf16 generate at two threads 3.54-3.57 ms per token when the choice was
// symmetric (10% either way: it settled on one thread) against 3.24-3.27 forced to two.)
// Results are the same bits in either mode (see above); only the time differs.
struct ThreadChooser {
  struct Row {
    double avg[2] = {0, 0};  // [0]: all threads, [1]: one thread; seconds per step, 0 = not measured
    bool one = false;        // the current mode
    int64_t since = 0, every = 8;
  };
  std::mutex mu;
  Row rows[17];
  bool exploring[17] = {};
  std::atomic<int64_t> policy{0};  // 0: choose by time; 1: always all threads; 2: always one (tests, benchmarks)
  std::atomic<int64_t> steps[2] = {0, 0};  // steps run on all threads, on one (benchmarks report the split)
  bool one_thread(int64_t B) {
    if (policy.load(std::memory_order_relaxed)) return policy.load(std::memory_order_relaxed) == 2;
    std::lock_guard<std::mutex> lock(mu);
    Row& r = rows[std::min<int64_t>(B, 16)];
    exploring[std::min<int64_t>(B, 16)] = ++r.since >= r.every;
    return exploring[std::min<int64_t>(B, 16)] ? !r.one : r.one;
  }
  void record(int64_t B, bool one, double seconds) {
    if (policy.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> lock(mu);
    const int64_t i = std::min<int64_t>(B, 16);
    Row& r = rows[i];
    double& a = r.avg[one];
    a = a == 0 ? seconds : 0.75 * a + 0.25 * seconds;
    if (!exploring[i]) return;
    exploring[i] = false;
    r.since = 0;
    // Biased to all threads: on a quiet machine they are never slower (the memory bandwidth only
    // grows), but the margin can be small (bf16: ~1.1-1.3x), so noise must not leave the step on one
    // thread; one thread must win clearly (15%) to be chosen, all threads only be no slower to return.
    if (r.avg[r.one] > 0 && seconds < (one ? 0.85 : 1.0) * r.avg[r.one]) {  // the other mode won: switch
      r.one = one;
      r.every = 8;
    } else {
      r.every = std::min<int64_t>(2 * r.every, 256);
    }
  }
};
ThreadChooser g_chooser;

// The per-layer tensors in `params` (see model.GPT._fused_decode_args): ln_1 w, b; c_attn w,
// scales, b; attn c_proj w, scales, b; ln_2 w, b; c_fc w, scales, b; mlp c_proj w, scales, b;
// then ln_f w, b and the head's w, scales, b. Absent ones (no bias, float weights' scales) are
// empty tensors. `interleaved`: per linear (4 per layer, then the head), int8_linear's flag.
constexpr int64_t PER_LAYER = 16;

int64_t argmax_row(const float* x, int64_t V);

// The step's logits (B, 1, V) in fp32 (decode_step returns them in the embeddings' dtype).
at::Tensor decode_logits(const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& positions,
                         const at::Tensor& mask, const at::Tensor& wte, const at::Tensor& wpe, at::TensorList params,
                         at::TensorList k_caches, at::TensorList v_caches, at::IntArrayRef interleaved, int64_t n_head,
                         double eps_d) {
  g_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t n_layer = int64_t(k_caches.size());
  TORCH_CHECK(n_layer >= 1 && int64_t(v_caches.size()) == n_layer && int64_t(params.size()) == PER_LAYER * n_layer + 5
                  && int64_t(interleaved.size()) == 4 * n_layer + 1, "decode_step: parameter lists of the wrong length");
  const int64_t B = tokens.size(0), C = wte.size(1), V = params[PER_LAYER * n_layer + 2].size(0);
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == 1 && tokens.scalar_type() == at::kLong, "decode_step: tokens (B, 1) int64");
  // Slots and positions: B values (e.g. (B, 1)) or one for every row (e.g. (1,)), any shape.
  TORCH_CHECK((slots.numel() == B || slots.numel() == 1) && slots.scalar_type() == at::kLong &&
                  (positions.numel() == B || positions.numel() == 1) && positions.scalar_type() == at::kLong,
              "decode_step: slots and positions: B or 1 int64 values");
  TORCH_CHECK(C % n_head == 0 && wte.dim() == 2 && wpe.dim() == 2 && wpe.size(1) == C, "decode_step: embeddings");
  TORCH_CHECK(mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == 1 && mask.size(2) == 1,
              "decode_step: an additive mask (B or 1, 1, 1, L) expected");
  const int64_t L = mask.size(3), hd = C / n_head;
  TORCH_CHECK(hd % 8 == 0, "decode_step: head_dim % 8 == 0 expected");
  const at::ScalarType cdt = k_caches[0].scalar_type();
  TORCH_CHECK(cdt == at::kFloat || cdt == at::kBFloat16, "decode_step: fp32 or bf16 KV caches");
  for (int64_t l = 0; l < n_layer; ++l)
    for (const at::Tensor* c : {&k_caches[l], &v_caches[l]})
      TORCH_CHECK(c->dim() == 4 && c->size(0) >= B && c->size(1) == n_head && c->size(3) == hd && c->size(2) >= L &&
                      c->is_contiguous() && c->scalar_type() == cdt, "decode_step: KV caches (>= B, n_head, len, hd)");
  const int64_t S = k_caches[0].size(2);
  // Rows of the mask at any stride (a slice of the decode loop's full-length mask buffer: no copy).
  const at::Tensor mask_c = mask.stride(3) == 1 ? mask : mask.contiguous();
  const FVec mk = fvec_strided(mask_c), te = fvec(wte), pe = fvec(wpe);
  const int64_t mask_row = mask.size(0) == 1 ? 0 : mask_c.stride(0);
  const float eps = float(eps_d);
  // Token ids, slots and positions, checked here (an out-of-range slot would write out of bounds).
  std::vector<int64_t> tok(B), slot(B), pos(B);
  const at::Tensor sl = slots.contiguous(), ps = positions.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* pp = ps.data_ptr<int64_t>();
  const auto ta = tokens.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    tok[b] = ta[b][0];
    slot[b] = sp[sl.numel() == 1 ? 0 : b];
    pos[b] = pp[ps.numel() == 1 ? 0 : b];
    TORCH_CHECK(0 <= tok[b] && tok[b] < wte.size(0) && 0 <= slot[b] && slot[b] < S && 0 <= pos[b] && pos[b] < wpe.size(0),
                "decode_step: token, slot or position out of range");
  }
  struct Layer { FVec ln1w, ln1b, ln2w, ln2b; Lin qkv, proj, fc, out; Plan pq, pp, pf, po; };
  std::vector<Layer> layers(n_layer);
  for (int64_t l = 0; l < n_layer; ++l) {
    const at::Tensor* p = &params[PER_LAYER * l];
    Layer& y = layers[l];
    y.ln1w = fvec(p[0]); y.ln1b = fvec(p[1]);
    y.qkv = make_lin(p[2], p[3], p[4], interleaved[4 * l]);
    y.proj = make_lin(p[5], p[6], p[7], interleaved[4 * l + 1]);
    y.ln2w = fvec(p[8]); y.ln2b = fvec(p[9]);
    y.fc = make_lin(p[10], p[11], p[12], interleaved[4 * l + 2]);
    y.out = make_lin(p[13], p[14], p[15], interleaved[4 * l + 3]);
    TORCH_CHECK(y.qkv.in == C && y.qkv.out == 3 * C && y.proj.in == C && y.proj.out == C && y.fc.in == C &&
                    y.out.in == y.fc.out && y.out.out == C, "decode_step: layer shapes");
    y.pq = plan(y.qkv); y.pp = plan(y.proj); y.pf = plan(y.fc); y.po = plan(y.out);
  }
  const at::Tensor* f = &params[PER_LAYER * n_layer];
  const FVec lnfw = fvec(f[0]), lnfb = fvec(f[1]);
  const Lin head = make_lin(f[2], f[3], f[4], interleaved[4 * n_layer]);
  TORCH_CHECK(head.in == C, "decode_step: head shape");
  const Plan ph = plan(head);
  const int64_t F = layers[0].fc.out;

  // Shared between the threads: the residual stream, q|k|v, attention outputs, MLP pre-activations, logits.
  std::vector<float> x(B * C), qkv(B * 3 * C), att(B * C), pre(B * F);
  at::Tensor logits = at::empty({B, 1, V}, wte.options().dtype(at::kFloat));
  float* lg = logits.data_ptr<float>();
  std::vector<Phase> phases(1 + 5 * n_layer + 1);  // embeddings; per layer qkv, attention, proj, fc, out; head

  auto worker = [&](int tid) {
    // This thread's scratch: a normed row block, the MLP activations, attention scores, inputs.
    std::vector<float> h(B * C), g(B * F), scores((L + 7) / 8 * 8);
    Input in;
    Phase* ph_it = phases.data();
#ifdef GPT2_PHASE_PROFILE
    t_last = 0;
#endif
    run_phase(*ph_it, B, [&](int64_t b) {  // token + position embeddings
      for (int64_t i = 0; i < C; ++i) x[b * C + i] = te[tok[b] * C + i] + pe[pos[b] * C + i];
    }, tid, int(ph_it - phases.data()));
    ++ph_it;
    for (int64_t l = 0; l < n_layer; ++l) {
      const Layer& y = layers[l];
      for (int64_t b = 0; b < B; ++b) layer_norm_row(&x[b * C], &h[b * C], C, y.ln1w, y.ln1b, eps);
      in.prepare(y.qkv, h.data(), C, B);
      run_phase(*ph_it, y.pq.chunks(), [&](int64_t c) {
        linear_chunk(y.qkv, y.pq, in, B, c, [&](int64_t m, int64_t o, float v) { qkv[m * 3 * C + o] = v; });
      }, tid, int(ph_it - phases.data()));
      ++ph_it;
      run_phase(*ph_it, B * n_head, [&](int64_t c) {
        const int64_t b = c / n_head, hh = c % n_head;
        const float* r = &qkv[b * 3 * C];
        const int64_t off = (b * n_head + hh) * S * hd;
        if (cdt == at::kFloat)
          attend(r + hh * hd, r + C + hh * hd, r + 2 * C + hh * hd, k_caches[l].data_ptr<float>() + off,
                 v_caches[l].data_ptr<float>() + off, slot[b], L, hd, mk.shifted(b * mask_row),
                 scores.data(), &att[b * C + hh * hd]);
        else
          attend(r + hh * hd, r + C + hh * hd, r + 2 * C + hh * hd, k_caches[l].data_ptr<c10::BFloat16>() + off,
                 v_caches[l].data_ptr<c10::BFloat16>() + off, slot[b], L, hd, mk.shifted(b * mask_row),
                 scores.data(), &att[b * C + hh * hd]);
      }, tid, int(ph_it - phases.data()));
      ++ph_it;
      in.prepare(y.proj, att.data(), C, B);
      run_phase(*ph_it, y.pp.chunks(), [&](int64_t c) {
        linear_chunk(y.proj, y.pp, in, B, c, [&](int64_t m, int64_t o, float v) { x[m * C + o] += v; });
      }, tid, int(ph_it - phases.data()));
      ++ph_it;
      for (int64_t b = 0; b < B; ++b) layer_norm_row(&x[b * C], &h[b * C], C, y.ln2w, y.ln2b, eps);
      in.prepare(y.fc, h.data(), C, B);
      run_phase(*ph_it, y.pf.chunks(), [&](int64_t c) {
        linear_chunk(y.fc, y.pf, in, B, c, [&](int64_t m, int64_t o, float v) { pre[m * F + o] = v; });
      }, tid, int(ph_it - phases.data()));
      ++ph_it;
      for (int64_t b = 0; b < B; ++b) gelu_row(&pre[b * F], &g[b * F], F);
      in.prepare(y.out, g.data(), F, B);
      run_phase(*ph_it, y.po.chunks(), [&](int64_t c) {
        linear_chunk(y.out, y.po, in, B, c, [&](int64_t m, int64_t o, float v) { x[m * C + o] += v; });
      }, tid, int(ph_it - phases.data()));
      ++ph_it;
    }
    for (int64_t b = 0; b < B; ++b) layer_norm_row(&x[b * C], &h[b * C], C, lnfw, lnfb, eps);
    in.prepare(head, h.data(), C, B);
    run_phase(*ph_it, ph.chunks(), [&](int64_t c) {
      linear_chunk(head, ph, in, B, c, [&](int64_t m, int64_t o, float v) { lg[m * V + o] = v; });
    }, tid, int(ph_it - phases.data()));
    ++ph_it;
  };
  const int64_t all = at::get_num_threads();
  const bool one = all > 1 && g_chooser.one_thread(B);
  if (all > 1) g_chooser.steps[one].fetch_add(1, std::memory_order_relaxed);
  const int64_t threads = one ? 1 : all;
  const auto t0 = std::chrono::steady_clock::now();
  if (threads == 1) worker(0);
  else step_pool().run(int(threads), std::function<void(int)>(worker));
  if (all > 1) g_chooser.record(B, one, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return logits;
}

at::Tensor decode_step(const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& positions,
                       const at::Tensor& mask, const at::Tensor& wte, const at::Tensor& wpe, at::TensorList params,
                       at::TensorList k_caches, at::TensorList v_caches, at::IntArrayRef interleaved, int64_t n_head,
                       double eps) {
  at::Tensor logits = decode_logits(tokens, slots, positions, mask, wte, wpe, params, k_caches, v_caches, interleaved,
                                    n_head, eps);
  return wte.scalar_type() == at::kFloat ? logits : logits.to(wte.scalar_type());
}

// greedy_step: generate.generation_step for greedy decoding (temperature 0, no repetition penalty)
// in one call, on the generation loop's buffers (generate._Buffers): the torch ops around the
// decode step (~20 eager ops of ~2-6 us each, ~2x that with cold caches: 0.3-0.6 ms per token,
// a fifth of a 2-core step of the 6x384 BPE model) done here in a few microseconds. The same
// results as those ops, bit for bit (tested against them):
//   slot, step = counters; mask[..., slot] = 0; token = out[:, step - 1]
//   logits = decode_step(token, slot, pos, mask[..., :length]) (in the embeddings' dtype)
//   next = argmax(logits[:, :vocab_limit]) (the first maximum; a NaN counts as the maximum)
//   next = eot[0] (>= 0) where done; out[:, step] = next; done |= next in eot; finished = all(done)
//   pos += 1; counters += 1
// length <= 0: every slot of the mask; vocab_limit <= 0: every id.
void greedy_step(const at::Tensor& out, const at::Tensor& mask, const at::Tensor& pos, const at::Tensor& counters,
                 const at::Tensor& done, const at::Tensor& eot, const at::Tensor& finished, int64_t length,
                 int64_t vocab_limit, const at::Tensor& wte, const at::Tensor& wpe, at::TensorList params,
                 at::TensorList k_caches, at::TensorList v_caches, at::IntArrayRef interleaved, int64_t n_head,
                 double eps) {
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kLong, "greedy_step: out (B, N) int64");
  const int64_t B = out.size(0);
  TORCH_CHECK(counters.numel() == 2 && counters.scalar_type() == at::kLong && counters.is_contiguous(),
              "greedy_step: counters (2,) int64");
  TORCH_CHECK(done.numel() == B && done.scalar_type() == at::kBool && done.is_contiguous() &&
                  finished.numel() == 1 && finished.scalar_type() == at::kBool,
              "greedy_step: done (B,) and finished (1,) bool");
  TORCH_CHECK(eot.dim() == 1 && eot.numel() >= 1 && eot.scalar_type() == at::kLong && eot.is_contiguous(),
              "greedy_step: eot (E,) int64");
  TORCH_CHECK(pos.numel() == B && pos.scalar_type() == at::kLong && pos.is_contiguous(), "greedy_step: pos (B, 1)");
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == B && mask.is_contiguous() &&
                  (mask.scalar_type() == at::kFloat || mask.scalar_type() == at::kBFloat16),
              "greedy_step: a contiguous (B, 1, 1, L) float mask");
  int64_t* cnt = counters.data_ptr<int64_t>();
  const int64_t slot = cnt[0], step = cnt[1], M = mask.size(3);
  TORCH_CHECK(1 <= step && step < out.size(1) && 0 <= slot && slot < M && (length <= 0 || slot < length),
              "greedy_step: slot or step out of range");
  const int64_t mrow = mask.stride(0);
  for (int64_t b = 0; b < B; ++b) {  // the slot written now becomes visible
    if (mask.scalar_type() == at::kFloat) mask.data_ptr<float>()[b * mrow + slot] = 0.f;
    else mask.data_ptr<c10::BFloat16>()[b * mrow + slot] = c10::BFloat16(0.f);
  }
  const at::Tensor logits = decode_logits(out.narrow(1, step - 1, 1), counters.narrow(0, 0, 1), pos,
                                          length > 0 ? mask.narrow(3, 0, std::min(length, M)) : mask, wte, wpe,
                                          params, k_caches, v_caches, interleaved, n_head, eps);
  const int64_t V = logits.size(2), Vl = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
  float* lg = logits.data_ptr<float>();
  if (wte.scalar_type() == at::kBFloat16)  // the argmax of the logits as decode_step returns them: in bf16
    for (int64_t i = 0; i < B * V; ++i) lg[i] = float(c10::BFloat16(lg[i]));
  const int64_t* e = eot.data_ptr<int64_t>();
  const int64_t E = eot.numel();
  bool* dn = done.data_ptr<bool>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* ps = pos.data_ptr<int64_t>();
  bool all_done = true;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t token = dn[b] ? std::max<int64_t>(e[0], 0) : argmax_row(lg + b * V, Vl);
    o[b * out.stride(0) + step * out.stride(1)] = token;
    for (int64_t j = 0; j < E; ++j) dn[b] = dn[b] || token == e[j];
    all_done = all_done && dn[b];
    ps[b] += 1;
  }
  finished.data_ptr<bool>()[0] = all_done;
  cnt[0] += 1;
  cnt[1] += 1;
}

// argmax_rows(x (B, V) fp32, last dim contiguous) -> (B,) int64: torch.argmax(x, -1) exactly (the
// first maximal index; a NaN counts as the maximum, so the first NaN's index). Eagerly, torch's CPU
// argmax is a scalar (value, index) loop, ~1 ns per element: 0.05-0.065 ms for one row of GPT-2's
// 50,257 logits, a few % of a whole decode step run as one op. Here one pass, 8 lanes, each lane
// keeping its first maximum (strict >) and its index; lanes tie-break to the smaller index.
int64_t argmax_row(const float* x, int64_t V) {
  int64_t i = 0, best_i = 0;
  float best = x[0];
  __m256 nan = _mm256_setzero_ps();
  if (V >= 16) {
    __m256 vbest = _mm256_loadu_ps(x);
    __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = vidx;
    const __m256i eight = _mm256_set1_epi32(8);
    nan = _mm256_cmp_ps(vbest, vbest, _CMP_UNORD_Q);
    for (i = 8; i + 8 <= V; i += 8) {
      cur = _mm256_add_epi32(cur, eight);
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 gt = _mm256_cmp_ps(v, vbest, _CMP_GT_OQ);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vbest = _mm256_blendv_ps(vbest, v, gt);
      vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(cur), gt));
    }
    alignas(32) float vals[8];
    alignas(32) int32_t idx[8];
    _mm256_store_ps(vals, vbest);
    _mm256_store_si256(reinterpret_cast<__m256i*>(idx), vidx);
    best = vals[0];
    best_i = idx[0];
    for (int l = 1; l < 8; ++l)
      if (vals[l] > best || (vals[l] == best && idx[l] < best_i)) {
        best = vals[l];
        best_i = idx[l];
      }
  } else {
    i = 1;
    if (std::isnan(best)) return 0;
  }
  for (; i < V; ++i) {  // the tail (later indices: strict > keeps the first maximum)
    if (std::isnan(x[i])) {
      nan = _mm256_castsi256_ps(_mm256_set1_epi32(-1));  // (movemask reads the sign bits)
      break;
    }
    if (x[i] > best) {
      best = x[i];
      best_i = i;
    }
  }
  if (_mm256_movemask_ps(nan)) {  // some NaN: torch returns the first one
    for (int64_t j = 0; j < V; ++j)
      if (std::isnan(x[j])) return j;
  }
  return best_i;
}

at::Tensor argmax_rows(const at::Tensor& x) {  // (not counted in calls(): the tests count the matmul paths)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) >= 1 &&
                  x.size(1) < (int64_t(1) << 31), "argmax_rows: (B, V) fp32 with contiguous rows expected");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const float* p = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) o[b] = argmax_row(p + b * x.stride(0), V);
  return out;
}

int64_t calls() { return g_calls.load(); }

// decode_step's thread policy (ThreadChooser): 0 chooses by measured time (the default), 1 always
// uses all of torch's threads, 2 always one; returns the previous policy.
int64_t thread_policy(int64_t policy) {
  TORCH_CHECK(0 <= policy && policy <= 2, "thread_policy: 0 (auto), 1 (all threads) or 2 (one thread)");
  return g_chooser.policy.exchange(policy);
}

// How many multi-threaded-capable steps (torch.get_num_threads() > 1) ran on all threads and on
// one since the process started: [all, one].
std::vector<int64_t> thread_steps() { return {g_chooser.steps[0].load(), g_chooser.steps[1].load()}; }

// The phase profile (see GPT2_PHASE_PROFILE) as a (4, 64, 4) fp64 tensor, reset; empty without it.
at::Tensor phase_profile() {
#ifdef GPT2_PHASE_PROFILE
  at::Tensor t = at::empty({4, 64, 4}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(t.data_ptr<double>(), g_prof, sizeof(g_prof));
  std::memset(g_prof, 0, sizeof(g_prof));
  return t;
#else
  return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
#endif
}

}  // namespace

TORCH_LIBRARY(gpt2model_kernels, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias, bool interleaved) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("calls() -> int", calls);
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("phase_profile() -> Tensor", phase_profile);
  m.def("thread_policy(int policy) -> int", thread_policy);
  m.def("thread_steps() -> int[]", thread_steps);
  m.impl("argmax_rows", c10::DispatchKey::CPU, TORCH_FN(argmax_rows));
  m.def("decode_step(Tensor tokens, Tensor slots, Tensor positions, Tensor mask, Tensor wte, Tensor wpe, "
        "Tensor[] params, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int[] interleaved, int n_head, "
        "float eps) -> Tensor");
  m.impl("decode_step", c10::DispatchKey::CPU, TORCH_FN(decode_step));
  m.def("greedy_step(Tensor(a!) out, Tensor(b!) mask, Tensor(c!) pos, Tensor(d!) counters, Tensor(e!) done, "
        "Tensor eot, Tensor(f!) finished, int length, int vocab_limit, Tensor wte, Tensor wpe, Tensor[] params, "
        "Tensor(g!)[] k_caches, Tensor(h!)[] v_caches, int[] interleaved, int n_head, float eps) -> ()");
  m.impl("greedy_step", c10::DispatchKey::CPU, TORCH_FN(greedy_step));
  m.impl("f32_linear", c10::DispatchKey::CPU, TORCH_FN(f32_linear));
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
}
