// Integer dot products on GGUF blocks repacked into groups of 8 rows, for the CPU.
//
// Activations are rounded per run of 32 to int8 with one float scale (as llama.cpp's Q8_0),
// weights stay the file's integers, and the products are exact int32 sums: VNNI's vpdpbusd
// (u8 x s8, four products per 32-bit lane) where the CPU has it, maddubs + madd otherwise.
//
// The repacked layout makes one 32-bit lane hold one weight row: a "unit" is 32 bytes, byte
// 4j+i holding weight 4u+i of row j (u = 0..7 the unit's place in a run of 32). One vpdpbusd on
// a unit and the activations' four bytes repeated 8 times gives 8 rows' partial dot products at
// once, and the 8 rows' scales load as one vector; per run of 32 weights a row costs a quarter of
// the instructions of decoding its block to floats (gguf.cpp).
//
// A group of 8 rows is a run of records, one per super-block (32 weights for Q4_0/Q5_0/Q8_0,
// 256 for the K-quants): a header with the 8 rows' scales, then per run of 32:
//   low bits:   128 bytes, byte 32c+p: low nibble = unit c byte p, high nibble = unit c+4 byte p
//   Q5_0/Q5_K:  + 32 bytes, the fifth bits of unit u as a uint32 at 4u
//   Q6_K:       + 64 bytes, bits 2s..2s+1 of byte p: the top two bits of unit 2s byte p (p < 32)
//                 or of unit 2s+1 byte p-32
//   Q8_0:       256 bytes of int8 in unit order instead
// Headers: Q4_0/Q5_0/Q8_0 d[8] (f16); Q4_K/Q5_K d[8], dmin[8], then per run sc[8], m[8] (u8);
// Q6_K d[8], then per run sc[8] of its first 16 weights and sc[8] of its last 16 (int8).
// Every byte of the file's rows is kept (only the K-quants' packed 6-bit scales grow to bytes),
// so a repacked model reads what the file holds, and `dequantize_packed` returns its exact weights.

// This header holds what the ops (gguf_int8.cpp), the fused decode layer (decode_layer.cpp) and
// the MoE experts call (moe_experts.cpp) share: the vector wrappers, the repacked layout, the int8
// product.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <utility>
#include <vector>

namespace {

enum QType : int64_t { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// ---- vectors of integer units: one AVX512 register holds two units, an AVX2 register one ----
#if defined(__AVX512F__)
using ivec = __m512i;
using fvec = __m512;
constexpr int VB = 64;
inline ivec iload(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline ivec iset1(int8_t a) { return _mm512_set1_epi8(a); }
inline ivec iand(ivec a, ivec b) { return _mm512_and_si512(a, b); }
inline ivec ior(ivec a, ivec b) { return _mm512_or_si512(a, b); }
inline ivec isrl(ivec a, int n) { return _mm512_srli_epi16(a, n); }
inline ivec isll(ivec a, int n) { return _mm512_slli_epi16(a, n); }
inline ivec izero() { return _mm512_setzero_si512(); }
// a |= value where the unit's bits say (bits: VB/8 bytes, one bit per byte)
inline ivec or_bits(ivec a, const uint8_t* bits, int8_t value) {
  uint64_t m;
  std::memcpy(&m, bits, 8);
  return _mm512_mask_add_epi8(a, m, a, _mm512_set1_epi8(value));  // the bit is clear: add = or
}
// int32 lanes += sum of 4 products u8 (a) x s8 (b)
inline ivec dot(ivec acc, ivec a, ivec b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)));
#endif
}
// signed weights (Q8_0): |w| x (x with w's sign)
inline void sign_split(ivec w, ivec x, ivec* a, ivec* b) {
  *a = _mm512_abs_epi8(w);
  *b = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}
inline fvec fzero() { return _mm512_setzero_ps(); }
inline fvec fwiden(__m256 s) { return _mm512_insertf32x8(_mm512_castps256_ps512(s), s, 1); }  // 8 rows, both units
inline fvec fma_scaled(ivec acc, fvec scale, float dx, fvec into) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(scale, _mm512_set1_ps(dx)), into);
}
inline __m256 rows8(fvec a) {  // lanes j and j+8 hold row j of the even and odd units
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}
#else
using ivec = __m256i;
using fvec = __m256;
constexpr int VB = 32;
inline ivec iload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline ivec iset1(int8_t a) { return _mm256_set1_epi8(a); }
inline ivec iand(ivec a, ivec b) { return _mm256_and_si256(a, b); }
inline ivec ior(ivec a, ivec b) { return _mm256_or_si256(a, b); }
inline ivec isrl(ivec a, int n) { return _mm256_srli_epi16(a, n); }
inline ivec isll(ivec a, int n) { return _mm256_slli_epi16(a, n); }
inline ivec izero() { return _mm256_setzero_si256(); }
inline ivec or_bits(ivec a, const uint8_t* bits, int8_t value) {
  uint32_t m;
  std::memcpy(&m, bits, 4);
  const __m256i spread = _mm256_shuffle_epi8(  // byte j <- byte j/8 of m
      _mm256_set1_epi32(static_cast<int>(m)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_or_si256(a, _mm256_and_si256(on, _mm256_set1_epi8(value)));
}
inline ivec dot(ivec acc, ivec a, ivec b) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}
inline void sign_split(ivec w, ivec x, ivec* a, ivec* b) {
  *a = _mm256_sign_epi8(w, w);
  *b = _mm256_sign_epi8(x, w);
}
inline fvec fzero() { return _mm256_setzero_ps(); }
inline fvec fwiden(__m256 s) { return s; }
inline fvec fma_scaled(ivec acc, fvec scale, float dx, fvec into) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(scale, _mm256_set1_ps(dx)), into);
}
inline __m256 rows8(fvec a) { return a; }
#endif
// Floats stored as they are, or rounded to bfloat16 (to nearest even, as torch does): the decoded
// weights of a repacked matrix (gguf_int8.cpp), a prefill's SiLU-times-up (decode_layer.cpp).
inline void store8(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
inline void store8(uint16_t* o, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane: 4 words, twice
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o),
                   _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000)));
}

#if defined(__AVX512F__)
inline void store16(float* o, __m512 v) { _mm512_storeu_ps(o, v); }
inline void store16(uint16_t* o, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(rounded));
}
#endif

inline float sum8(__m256 a) {  // the sum of 8 floats
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t sum8_epi32(__m256i a) {  // the sum of 8 int32
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}

inline float max8(__m256 a) {  // the largest of 8 floats
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// exp on 8 floats (Cephes' expf polynomial on x - n ln2, scaled by 2^n): relative error ~1e-7
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447505531f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

inline __m256 silu8(__m256 g) {  // g * sigmoid(g)
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

constexpr int NV = 256 / VB;  // vectors per run of 32 weights x 8 rows
#ifndef QWEN2_PREFETCH
#define QWEN2_PREFETCH 2048
#endif
constexpr int64_t PREFETCH = QWEN2_PREFETCH;  // bytes

inline __m256 load_halves(const uint8_t* p) {  // 8 f16 -> 8 floats
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load_u8(const uint8_t* p) {  // 8 u8 -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load_i8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ---- each type: its record sizes and how a run decodes into NV vectors of unsigned (or, for Q8_0, signed) bytes
struct Layout {
  int64_t super, header, run;  // weights per record; header bytes; bytes per run of 32
};

constexpr Layout layout(int64_t t) {
  switch (t) {
    case Q4_0: return {32, 16, 128};
    case Q5_0: return {32, 16, 160};
    case Q8_0: return {32, 16, 256};
    case Q4_K: return {256, 32 + 8 * 16, 128};
    case Q5_K: return {256, 32 + 8 * 16, 160};
    case Q6_K: return {256, 16 + 8 * 16, 192};
    default: return {0, 0, 0};
  }
}

template <int64_t T>
inline void decode_run(const uint8_t* run, ivec* v) {
  if constexpr (T == Q8_0) {
    for (int i = 0; i < NV; ++i) v[i] = iload(run + VB * i);
  } else {
    const ivec low4 = iset1(0x0F);
    for (int h = 0; h < NV / 2; ++h) {
      const ivec p = iload(run + VB * h);
      v[h] = iand(p, low4);
      v[h + NV / 2] = iand(isrl(p, 4), low4);
    }
    if constexpr (T == Q5_0 || T == Q5_K)
      for (int i = 0; i < NV; ++i) v[i] = or_bits(v[i], run + 128 + (VB / 8) * i, 0x10);
    if constexpr (T == Q6_K) {
      const ivec three = iset1(3);
      for (int i = 0; i < NV; ++i) {
        // AVX512: one 64-byte load holds every unit's top bits; AVX2: unit i in half i%2, at bits 2(i/2)
        const ivec h = VB == 64 ? isrl(iload(run + 128), 2 * i) : isrl(iload(run + 128 + 32 * (i % 2)), 2 * (i / 2));
        v[i] = ior(v[i], isll(iand(h, three), 4));
      }
    }
  }
}

// The weight scale and offset (or min) of run j of a record for its 8 rows; Q6_K: per half run.
template <int64_t T>
inline void run_scales(const uint8_t* rec, int64_t j, __m256* ws, __m256* wm) {
  const __m256 d = load_halves(rec);
  if constexpr (T == Q4_0 || T == Q5_0 || T == Q8_0) {
    ws[0] = d;
    wm[0] = _mm256_mul_ps(d, _mm256_set1_ps(T == Q4_0 ? 8.f : T == Q5_0 ? 16.f : 0.f));
  } else if constexpr (T == Q4_K || T == Q5_K) {
    ws[0] = _mm256_mul_ps(d, load_u8(rec + 32 + 16 * j));
    wm[0] = _mm256_mul_ps(load_halves(rec + 16), load_u8(rec + 32 + 16 * j + 8));
  } else {
    ws[0] = _mm256_mul_ps(d, load_i8(rec + 16 + 16 * j));
    ws[1] = _mm256_mul_ps(d, load_i8(rec + 16 + 16 * j + 8));
    wm[0] = _mm256_mul_ps(ws[0], _mm256_set1_ps(32.f));
    wm[1] = _mm256_mul_ps(ws[1], _mm256_set1_ps(32.f));
  }
}

// Quantized activations of one row: per run b, `pattern` (256 bytes: unit u's four bytes
// repeated 8 times), `scale` dx, and dx * (sum of its int8) per half run (`sums`).
struct Activations {
  const int8_t* pattern;  // [M][K/32][256]
  const float* scale;     // [M][K/32]
  const float* sums;      // [M][K/16]
  Activations row(int64_t m, int64_t K32) const {  // row m's own
    return {pattern + m * K32 * 256, scale + m * K32, sums + m * 2 * K32};
  }
};

// out[r][n0 .. n0+8) for R activation rows (each a `row` view) of one group of 8 weight rows.
template <int64_t T, int R>
void dot_group(const uint8_t* group, int64_t K, const Activations* rows, float* const* out, int64_t n0) {
  constexpr Layout L = layout(T);
  constexpr int64_t runs = L.super / 32;
  constexpr bool halves = T == Q6_K;  // a scale per 16 weights: units 0-3, then 4-7
  fvec acc[R];
  __m256 off[R];
  for (int r = 0; r < R; ++r) acc[r] = fzero(), off[r] = _mm256_setzero_ps();
  const int64_t records = K / L.super;
  const uint8_t* rec = group;
  for (int64_t s = 0; s < records; ++s, rec += L.header + runs * L.run) {
    for (int64_t j = 0; j < runs; ++j) {
      const int64_t b = s * runs + j;  // run index within the row
      for (int64_t line = 0; line < L.header / runs + L.run; line += 64)  // the stream a few KiB ahead
        _mm_prefetch(reinterpret_cast<const char*>(rec + j * L.run + line + PREFETCH), _MM_HINT_T0);
      ivec v[NV];
      decode_run<T>(rec + L.header + j * L.run, v);
      __m256 ws[2], wm[2];  // weight scale and offset (or min) of each row, per half run
      run_scales<T>(rec, j, ws, wm);
      const fvec wsv0 = fwiden(ws[0]), wsv1 = halves ? fwiden(ws[1]) : wsv0;
      for (int r = 0; r < R; ++r) {
        const Activations& a = rows[r];
        const int8_t* xp = a.pattern + b * 256;
        const float dx = a.scale[b];
        ivec p0 = izero(), p1 = izero();
        for (int i = 0; i < NV; ++i) {
          const ivec x = iload(reinterpret_cast<const uint8_t*>(xp) + VB * i);
          ivec& p = (halves && i >= NV / 2) ? p1 : p0;
          if constexpr (T == Q8_0) {
            ivec w, xs;
            sign_split(v[i], x, &w, &xs);
            p = dot(p, w, xs);
          } else {
            p = dot(p, v[i], x);
          }
        }
        acc[r] = fma_scaled(p0, wsv0, dx, acc[r]);
        if constexpr (halves) {
          acc[r] = fma_scaled(p1, wsv1, dx, acc[r]);
          off[r] = _mm256_fmadd_ps(wm[0], _mm256_set1_ps(a.sums[2 * b]), off[r]);
          off[r] = _mm256_fmadd_ps(wm[1], _mm256_set1_ps(a.sums[2 * b + 1]), off[r]);
        } else if constexpr (T != Q8_0) {
          const float xs = a.sums[2 * b] + a.sums[2 * b + 1];
          off[r] = _mm256_fmadd_ps(wm[0], _mm256_set1_ps(xs), off[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r] + n0, _mm256_sub_ps(rows8(acc[r]), off[r]));
}

// n activation rows against one group, 4 at a time where they can: each decoded run serves them all
template <int64_t T>
void dot_rows(const uint8_t* group, int64_t K, const Activations* rows, float* const* out, int64_t n, int64_t n0) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) dot_group<T, 4>(group, K, rows + r, out + r, n0);
  for (; r + 2 <= n; r += 2) dot_group<T, 2>(group, K, rows + r, out + r, n0);
  for (; r < n; ++r) dot_group<T, 1>(group, K, rows + r, out + r, n0);
}

// body(i, thread) for items 0..n-1: each thread starts on its own contiguous share (weights stream best
// from one range) and, once it is done, takes the others' remaining items from their far ends, so a thread
// the OS or another process slowed does not leave the rest waiting at the join (a 32-row decode step's
// second thread sat idle ~8% of a step at the joins of equal halves). `start(thread)` runs once per
// thread first (AMX tile configuration), `finish(thread)` once after.
template <class Start, class Body, class Finish>
void parallel_shares(int64_t n, Start start, Body body, Finish finish) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  // each share's [next, end) in one word, so taking from its front and from its back never hand out one item twice
  std::vector<std::atomic<uint64_t>> shares(threads);
  for (int64_t t = 0; t < threads; ++t)
    shares[t].store(static_cast<uint64_t>(n * t / threads) << 32 | static_cast<uint64_t>(n * (t + 1) / threads));
  auto take = [&](int64_t t, bool front) -> int64_t {  // an item of share t, or -1 when it has none left
    uint64_t word = shares[t].load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t next = word >> 32, end = word & 0xFFFFFFFFu;
      if (next >= end) return -1;
      const uint64_t taken = front ? (next + 1) << 32 | end : next << 32 | (end - 1);
      if (shares[t].compare_exchange_weak(word, taken, std::memory_order_relaxed))
        return static_cast<int64_t>(front ? next : end - 1);
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      start(t);
      for (int64_t i; (i = take(t, true)) >= 0;) body(i, t);
      for (int64_t other = 1; other < threads; ++other)
        for (int64_t i; (i = take((t + other) % threads, false)) >= 0;) body(i, t);
      finish(t);
    }
  });
}

template <class Body>
void parallel_shares(int64_t n, Body body) {
  parallel_shares(n, [](int64_t) {}, body, [](int64_t) {});
}

int64_t grain_groups(int64_t G) { return std::max<int64_t>(1, (32 << 10) / G); }  // ~32 KiB of weights per task

int64_t group_bytes(int64_t t, int64_t K) {
  const Layout L = layout(t);
  TORCH_CHECK(L.super > 0, "GGUF type ", t, " has no integer kernel here");
  TORCH_CHECK(K % L.super == 0, "K=", K, " is not a whole number of blocks of type ", t);
  return K / L.super * (L.header + L.super / 32 * L.run);
}

#define DISPATCH_INT(t, FN, ...)                     \
  switch (t) {                                       \
    case Q4_0: FN<Q4_0>(__VA_ARGS__); break;         \
    case Q5_0: FN<Q5_0>(__VA_ARGS__); break;         \
    case Q8_0: FN<Q8_0>(__VA_ARGS__); break;         \
    case Q4_K: FN<Q4_K>(__VA_ARGS__); break;         \
    case Q5_K: FN<Q5_K>(__VA_ARGS__); break;         \
    case Q6_K: FN<Q6_K>(__VA_ARGS__); break;         \
    default: TORCH_CHECK(false, "GGUF type ", t, " has no integer kernel here"); \
  }

void check_packed(const at::Tensor& p, int64_t qtype, int64_t K) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kByte && p.dim() == 2 && p.is_contiguous() &&
                  p.size(1) == group_bytes(qtype, K),
              "packed weights must be a contiguous CPU uint8 [rows / 8, ", group_bytes(qtype, K), "] matrix");
}

// Round each run of 32 activations to int8 (scale max|x| / 127), lay out each unit's four bytes
// repeated 8 times, and keep dx * (sum of the int8) per 16 for the offsets and mins. In vectors: a
// batch-1 layer's four roundings took ~40 us one element at a time, 3% of a 1.5B token.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* pattern, float* scale, float* sums) {
  const int64_t K32 = K / 32;
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i unit_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  at::parallel_for(0, M * K32, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* xb = x + (i / K32) * K + (i % K32) * 32;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(xb + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], magnitude));
      }
      const float top = max8(amax);
      const float dx = top / 127.f, inv = top > 0.f ? 127.f / top : 0.f;
      __m256i q[4];  // rounded to nearest even, as std::nearbyint rounds by default
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
      const __m256i half0 = _mm256_add_epi32(q[0], q[1]), half1 = _mm256_add_epi32(q[2], q[3]);
      scale[i] = dx;
      sums[2 * i] = dx * static_cast<float>(sum8_epi32(half0));
      sums[2 * i + 1] = dx * static_cast<float>(sum8_epi32(half1));
      // the packs interleave 128-bit lanes: dword 4l + j holds q[j]'s lane l, units 2j + l
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), unit_order);
      int8_t* out = pattern + i * 256;
      for (int u = 0; u < 8; ++u)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * u),
                            _mm256_permutevar8x32_epi32(bytes, _mm256_set1_epi32(u)));
    }
  });
}

// One matrix's share of a product: its repacked groups (G bytes each, N rows in all) and its output
// columns: y [M, N] within rows of `ld` floats.
struct Product {
  const uint8_t* packed;
  int64_t G, N, qtype;
  float* y;
  int64_t ld;
};

// Products that read the same activations as one parallel loop over all their groups of 8 rows: one
// fork and join for the lot, and small matrices (k and v, 16 groups) stream beside a large one (q)
// instead of splitting their few groups over the threads alone.
inline void dot_groups(const Activations& a, int64_t M, int64_t K, const std::vector<Product>& ps) {
  std::vector<Activations> rows(M);
  for (int64_t m = 0; m < M; ++m) rows[m] = a.row(m, K / 32);
  const int64_t n = static_cast<int64_t>(ps.size());
  std::vector<int64_t> first(n + 1, 0);  // each matrix's first group in the joint loop
  std::vector<std::vector<float*>> out(n, std::vector<float*>(M));
  int64_t widest = 1;
  for (int64_t i = 0; i < n; ++i) {
    first[i + 1] = first[i] + ps[i].N / 8;
    for (int64_t m = 0; m < M; ++m) out[i][m] = ps[i].y + m * ps[i].ld;
    widest = std::max(widest, ps[i].G);
  }
  at::parallel_for(0, first[n], grain_groups(widest), [&](int64_t g0, int64_t g1) {
    int64_t i = 0;
    for (int64_t g = g0; g < g1; ++g) {
      while (g >= first[i + 1]) ++i;
      const int64_t local = g - first[i];
      DISPATCH_INT(ps[i].qtype, dot_rows, ps[i].packed + local * ps[i].G, K, rows.data(), out[i].data(), M, 8 * local);
    }
  });
}

#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

// Many rows on AMX bf16 tiles. Per run of 32 weights, 16 weight rows (two groups) decode to one bf16
// B tile, (d sc) q - m rounded once as dequantize_packed's bf16 output is; the activations are the
// rows rounded to bf16, and `tdpbf16ps` sums 16 x 16 products of 32 in float32 over the whole of K,
// with no per-run scale to apply afterwards. Int8 tiles multiply twice as fast, but every run of 32
// has its own activation and weight scales, so each of their 16 x 16 int32 sums must leave the tile
// and be scaled apart: that, not the products, was their time (1.5-4.6x this kernel's, 16-512 rows).
// Decoding costs ~85 cycles a tile whatever the rows (32 rows' products ~70 more: the two do not overlap
// on a core): the first 32 rows decode each run a step ahead, into a panel that later rows reuse.
constexpr int64_t TILE_MIN_ROWS = 16;  // below it VNNI's integer products win

inline bool amx_ready() {  // Linux lends a process the tile registers only once it asks
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The bf16 B tile of run j of two groups' records (16 weight rows): tile row p holds weights 2p and
// 2p+1 of each of the 16 rows, the pairs `tdpbf16ps` multiplies. One byte permute per 8 rows of a pair
// both gathers those rows' two bytes of it and widens them to 32 bits (`vpermb`, the other bytes zeroed),
// so one conversion to bf16 of the two groups' floats is the tile row as it stands.
template <int64_t T>
inline void bf16_tile(const uint8_t* rec0, const uint8_t* rec1, int64_t j, uint16_t* tile) {
  constexpr Layout L = layout(T);
  constexpr bool halves = T == Q6_K;
  ivec v[2][NV];
  decode_run<T>(rec0 + L.header + j * L.run, v[0]);
  decode_run<T>(rec1 + L.header + j * L.run, v[1]);
  __m256 ws[2][2], wm[2][2];
  run_scales<T>(rec0, j, ws[0], wm[0]);
  run_scales<T>(rec1, j, ws[1], wm[1]);
  // lane 2r + i of a pair's vector is row r's weight: its scale and offset are row r's, each twice
  const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  __m512 scale[2][2], offset[2][2];
  for (int g = 0; g < 2; ++g)
    for (int h = 0; h < (halves ? 2 : 1); ++h) {
      scale[g][h] = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(ws[g][h]));
      // Q8_0's signed bytes are read as unsigned ones with their top bit flipped: q + 128, less 128 scales
      offset[g][h] = T == Q8_0 ? _mm512_mul_ps(scale[g][h], _mm512_set1_ps(128.f))
                               : _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(wm[g][h]));
    }
  // byte 32e + 4r + k of a vector is weight 4(2t + e) + k of row r: pair 4t + 2e + f reads k = 2f, 2f + 1
  __m512i gather[2][2];
  for (int e = 0; e < 2; ++e)
    for (int f = 0; f < 2; ++f) {
      alignas(64) int8_t index[64] = {};
      for (int lane = 0; lane < 16; ++lane)
        index[4 * lane] = static_cast<int8_t>(32 * e + 4 * (lane / 2) + 2 * f + lane % 2);
      gather[e][f] = _mm512_load_si512(index);
    }
  constexpr __mmask64 low_bytes = 0x1111111111111111ULL;
  for (int t = 0; t < NV; ++t) {
    __m512i bytes[2] = {v[0][t], v[1][t]};
    if constexpr (T == Q8_0)
      for (auto& b : bytes) b = _mm512_xor_si512(b, _mm512_set1_epi8(-128));
    for (int e = 0; e < 2; ++e)
      for (int f = 0; f < 2; ++f) {
        const int h = halves && t >= NV / 2;  // units 4-7: the run's last 16 weights
        __m512 w[2];
        for (int g = 0; g < 2; ++g) {
          const __m512i q = _mm512_maskz_permutexvar_epi8(low_bytes, gather[e][f], bytes[g]);
          w[g] = _mm512_fmsub_ps(scale[g][h], _mm512_cvtepi32_ps(q), offset[g][h]);
        }
        _mm512_store_si512(tile + 32 * (4 * t + 2 * e + f), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w[1], w[0])));
      }
  }
}

// 16 weight rows a B tile is decoded from: two groups of a repacked matrix, from `first`
struct TileRows {
  const uint8_t* first;
  int64_t G;
  Layout L;
  void (*decode)(const uint8_t*, const uint8_t*, int64_t, uint16_t*);  // bf16_tile<its type>
  int64_t ahead;  // bytes from these rows to the same place in the next pair's
  void tile(int64_t b, uint16_t* out) const {  // run b of the rows
    const int64_t runs = L.super / 32, j = b % runs, at = b / runs * (L.header + runs * L.run);
    // Prefetched a pair ahead, not a few KiB as dot_group reads its one stream: on K = 896 a pair's four
    // groups are 7.6 KiB streams read side by side, so 2 KiB ahead of each missed the next pair's starts
    // (cold weights, 32 rows: 24 layers' gates 293 -> 199 cycles a tile, the output head 296 -> 231)
    for (const uint8_t* group : {first, first + G})
      for (int64_t line = 0; line < L.header / runs + L.run; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(group + at + j * L.run + line + ahead), _MM_HINT_T0);
    decode(first + at, first + G + at, j, out);
  }
};

template <int64_t T>
void take_decoder(TileRows* r) {
  r->decode = bf16_tile<T>;
}

inline TileRows tile_rows(const uint8_t* packed, int64_t G, int64_t qtype, int64_t group, int64_t pair_groups) {
  TileRows r{packed + group * G, G, layout(qtype), nullptr, pair_groups * G};
  DISPATCH_INT(qtype, take_decoder, &r);
  return r;
}

// This thread's buffer of at least n bf16 (64-byte aligned) for every run's two B tiles, kept between calls:
// a fresh one (311 KB for K = 4864) cost its allocation and page faults at every product of a decode step.
inline uint16_t* tile_panel(int64_t n) {
  thread_local std::unique_ptr<uint16_t[]> buffer;
  thread_local int64_t size = 0;
  if (size < n) {
    buffer.reset(new uint16_t[n + 32]);
    size = n;
  }
  return reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(buffer.get()) + 63) & ~uintptr_t(63));
}

// Bf16 rows x [>= M rounded up to 16, K] against `blocks` pairs of 16 weight rows (`rows(w, half)`), 16 or 32
// activation rows at a time into four C tiles (two per half); each 16 x 16 result of a pair goes to
// `done(w, m0, c0, c1)` (rows m0.., float32, 16 to a row), or, when `direct(w, m0)` gives an output of
// at least 16 rows, straight there (`direct` returns {pointer, row stride in floats} or a null pointer).
template <class Rows, class Direct, class Done>
void tiles_over(const uint16_t* x, int64_t M, int64_t K, int64_t blocks, Rows rows, Direct direct, Done done) {
  const int64_t steps = K / 32, Mpad = (M + 15) / 16 * 16;
  auto configure = [](int64_t) {
    TileConfig config;  // C 0-3, A 4-5 (16 rows x 32 bf16), B 6-7 (16 pairs x 16 weight rows): all 16 x 64 bytes
    for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.colsb[i] = 64;
    _tile_loadconfig(&config);
  };
  auto pair = [&](int64_t w, int64_t) {
    uint16_t* panel = tile_panel(steps * 1024);
    alignas(64) float part[2][16][16];
    const TileRows first = rows(w, 0), second = rows(w, 1);
    auto decode = [&](int64_t b) {  // run b's two B tiles into the panel, which later rows reuse
      first.tile(b, panel + b * 1024);
      second.tile(b, panel + b * 1024 + 512);
    };
    for (int64_t m0 = 0; m0 < Mpad; m0 += 32) {
      const bool two = Mpad - m0 >= 32;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t b = 0; b < steps; ++b) {
        uint16_t* slot = panel + b * 1024;
        if (m0 == 0)  // the first rows decode each run a step ahead of its products (5% faster than just before)
          for (int64_t ahead = b == 0 ? 0 : b + 1; ahead <= b + 1 && ahead < steps; ++ahead) decode(ahead);
        _tile_loadd(6, slot, 64);
        _tile_loadd(7, slot + 512, 64);
        _tile_loadd(4, x + m0 * K + 32 * b, 2 * K);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, x + (m0 + 16) * K + 32 * b, 2 * K);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      const auto [out, ld] = direct(w, m0);
      if (out && m0 + 16 <= M) {
        _tile_stored(0, out, 4 * ld);
        _tile_stored(1, out + 16, 4 * ld);
      } else {
        _tile_stored(0, part[0], 64);
        _tile_stored(1, part[1], 64);
        done(w, m0, part[0][0], part[1][0]);
      }
      if (!two) continue;
      // the same for the lower 16 rows: tile numbers are immediates (_tile_stored pastes them into asm)
      const auto [lower, ld2] = direct(w, m0 + 16);
      if (lower && m0 + 32 <= M) {
        _tile_stored(2, lower, 4 * ld2);
        _tile_stored(3, lower + 16, 4 * ld2);
      } else {
        _tile_stored(2, part[0], 64);
        _tile_stored(3, part[1], 64);
        done(w, m0 + 16, part[0][0], part[1][0]);
      }
    }
  };
  parallel_shares(blocks, configure, pair, [](int64_t) { _tile_release(); });
}

// y [M, N] (rows of ld floats) = x W^T for one repacked matrix with N a multiple of 32: pair w is its
// rows 32w..32w+31, straight into y but for a last part of fewer than 16 rows.
inline void matmul_tiles(const uint16_t* x, int64_t M, int64_t K, const Product& p) {
  tiles_over(
      x, M, K, p.N / 32, [&](int64_t w, int half) { return tile_rows(p.packed, p.G, p.qtype, 4 * w + 2 * half, 4); },
      [&](int64_t w, int64_t m0) { return std::pair<float*, int64_t>{p.y + m0 * p.ld + 32 * w, p.ld}; },
      [&](int64_t w, int64_t m0, const float* c0, const float* c1) {
        for (int64_t m = m0; m < std::min(M, m0 + 16); ++m) {
          std::memcpy(p.y + m * p.ld + 32 * w, c0 + 16 * (m - m0), 64);
          std::memcpy(p.y + m * p.ld + 32 * w + 16, c1 + 16 * (m - m0), 64);
        }
      });
}

// SiLU(x Wgate^T) * (x Wup^T) rounded once to bf16, into h [M, F] (rows of ldh): pair w is gate's and up's
// rows 16w..16w+15, so both products of an output are in the tiles at once and neither leaves them in
// float32 (a 512-row prefill's gate/up output is 20 MB); F a multiple of 16.
inline void matmul_gated(const uint16_t* x, int64_t M, int64_t K, const Product& gate, const Product& up, uint16_t* h,
                         int64_t ldh) {
  tiles_over(
      x, M, K, gate.N / 16,
      [&](int64_t w, int half) {
        const Product& p = half ? up : gate;
        return tile_rows(p.packed, p.G, p.qtype, 2 * w, 2);
      },
      [](int64_t, int64_t) { return std::pair<float*, int64_t>{nullptr, 0}; },
      [&](int64_t w, int64_t m0, const float* g, const float* u) {
        for (int64_t m = m0; m < std::min(M, m0 + 16); ++m)
          for (int i = 0; i < 16; i += 8) {
            const int64_t at = 16 * (m - m0) + i;
            store8(h + m * ldh + 16 * w + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + at)), _mm256_loadu_ps(u + at)));
          }
      });
}
#endif

// Activation rows as the products read them: rounded per run of 32 to int8 for the integer dot products,
// or, from TILE_MIN_ROWS rows on an AMX build, rounded to bf16 (padded to whole tiles) for bf16 tiles.
struct Rows {
  int64_t M, K;
  at::Tensor pattern, scale, sums;  // int8: [M][K/32][256], [M][K/32], [M][K/16]
  at::Tensor bf16;                  // tiles: [M rounded up to 16, K]
  bool tiles() const { return bf16.defined(); }
  Activations view() const { return {pattern.data_ptr<int8_t>(), scale.data_ptr<float>(), sums.data_ptr<float>()}; }
};

// Whether M rows against matrices of these widths take the tiles
inline bool tiles_fit(int64_t M, std::initializer_list<int64_t> widths) {
#if defined(__AMX_BF16__)
  return M >= TILE_MIN_ROWS && std::all_of(widths.begin(), widths.end(), [](int64_t n) { return n % 32 == 0; }) &&
         amx_ready();
#else
  return false;
#endif
}

// float32 rows [M, K] (K a multiple of 8) rounded to bf16, to nearest even as torch rounds finite values
inline void round_rows(const float* x, int64_t M, int64_t K, uint16_t* out) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * K; i < m1 * K; i += 8) store8(out + i, _mm256_loadu_ps(x + i));
  });
}

// x: float32 [M, K] (or, for tiles, bf16 as well)
inline Rows prepare(const at::Tensor& x, bool tiles) {
  const int64_t M = x.size(0), K = x.size(1);
  Rows r{M, K};
  if (tiles) {
    if (M % 16 == 0 && x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
      r.bf16 = x;
    } else {  // rounded here rather than by torch's copy: three ops fewer a product, 96 a decode step's layers
      const int64_t Mpad = (M + 15) / 16 * 16;
      r.bf16 = at::empty({Mpad, K}, at::dtype(at::kBFloat16));
      uint16_t* out = reinterpret_cast<uint16_t*>(r.bf16.data_ptr<at::BFloat16>());
      const at::Tensor xc = x.contiguous();
      if (xc.scalar_type() == at::kBFloat16)
        std::memcpy(out, xc.data_ptr<at::BFloat16>(), M * K * sizeof(uint16_t));
      else
        round_rows(xc.data_ptr<float>(), M, K, out);
      std::memset(out + M * K, 0, (Mpad - M) * K * sizeof(uint16_t));  // the last tile's padding rows
    }
    return r;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  r.pattern = at::empty({M, K / 32, 256}, at::dtype(at::kChar));
  r.scale = at::empty({M, K / 32}, at::dtype(at::kFloat));
  r.sums = at::empty({M, K / 16}, at::dtype(at::kFloat));
  quantize_rows(xf.data_ptr<float>(), M, K, r.pattern.data_ptr<int8_t>(), r.scale.data_ptr<float>(),
                r.sums.data_ptr<float>());
  return r;
}

inline Product product_of(const at::Tensor& packed, int64_t qtype, float* y, int64_t ld = -1) {
  const int64_t N = 8 * packed.size(0);
  return {packed.data_ptr<uint8_t>(), packed.size(1), N, qtype, y, ld < 0 ? N : ld};
}

// Repacked matrices that read the same activations (q, k and v; gate and up): dot_groups' one loop, or
// each matrix's tiles.
inline void matmul_packed_together(const Rows& r, const std::vector<Product>& ps) {
#if defined(__AMX_BF16__)
  if (r.tiles()) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(r.bf16.data_ptr<at::BFloat16>());
    for (const Product& p : ps) matmul_tiles(x, r.M, r.K, p);
    return;
  }
#endif
  dot_groups(r.view(), r.M, r.K, ps);
}

inline void check_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.dim() == 2 && x.size(1) == K,
              "x must be float32 or bfloat16 [M, K]");
}

// x (float32, or bf16 for the tiles) times several repacked matrices at once, their outputs side by side in
// one float32 [M, sum of their rows]: a prefill's q, k and v from one rounding of x.
inline at::Tensor matmul_stacked(const at::Tensor& x, at::TensorList packed, at::IntArrayRef qtypes, int64_t K) {
  TORCH_CHECK(packed.size() == qtypes.size() && !packed.empty(), "one qtype for each matrix");
  check_rows(x, K);
  int64_t width = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    check_packed(packed[i], qtypes[i], K);
    width += 8 * packed[i].size(0);
  }
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, width}, x.options().dtype(at::kFloat));
  if (M == 0 || width == 0) return y;
  std::vector<Product> ps;
  bool fit = true;
  for (size_t i = 0, at = 0; i < packed.size(); at += 8 * packed[i].size(0), ++i) {
    ps.push_back(product_of(packed[i], qtypes[i], y.data_ptr<float>() + at, width));
    fit = fit && tiles_fit(M, {8 * packed[i].size(0)});
  }
  matmul_packed_together(prepare(x.contiguous(), fit), ps);
  return y;
}

}  // namespace
