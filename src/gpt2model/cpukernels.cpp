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
#include <cmath>
#include <cstdint>
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

// (Named accumulators, not an array, for the reason given at dot_chunk.)
template <int NM>
inline void f32_block(const float* const* xr, const float* const* w, int64_t in, float (*acc)[F32_STREAMS]) {
  static_assert(F32_STREAMS == 4 && (NM == 1 || NM == 2));
  const float *x0 = xr[0], *x1 = xr[NM - 1], *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  const __m256 z = _mm256_setzero_ps();
  __m256 s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z;
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    const __m256 a0 = _mm256_loadu_ps(x0 + k);
    if constexpr (NM == 1) {
      s00 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), a0, s00);
      s01 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), a0, s01);
      s02 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), a0, s02);
      s03 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), a0, s03);
    } else {
      const __m256 a1 = _mm256_loadu_ps(x1 + k);
      __m256 v = _mm256_loadu_ps(w0 + k);
      s00 = _mm256_fmadd_ps(v, a0, s00);
      s10 = _mm256_fmadd_ps(v, a1, s10);
      v = _mm256_loadu_ps(w1 + k);
      s01 = _mm256_fmadd_ps(v, a0, s01);
      s11 = _mm256_fmadd_ps(v, a1, s11);
      v = _mm256_loadu_ps(w2 + k);
      s02 = _mm256_fmadd_ps(v, a0, s02);
      s12 = _mm256_fmadd_ps(v, a1, s12);
      v = _mm256_loadu_ps(w3 + k);
      s03 = _mm256_fmadd_ps(v, a0, s03);
      s13 = _mm256_fmadd_ps(v, a1, s13);
    }
  }
  const __m256 s[2][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}};
  const float* wr[4] = {w0, w1, w2, w3};
  const float* xm[2] = {x0, x1};
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < 4; ++r) {
      float t = hsum_ps(s[m][r]);
      for (int64_t j = k; j < in; ++j) t += xm[m][j] * wr[r][j];
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

int64_t calls() { return g_calls.load(); }

}  // namespace

TORCH_LIBRARY(gpt2model_kernels, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias, bool interleaved) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("calls() -> int", calls);
  m.impl("f32_linear", c10::DispatchKey::CPU, TORCH_FN(f32_linear));
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
}
