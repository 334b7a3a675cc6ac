// Matrix x activations on GGUF's own quantized blocks, for the CPU.
//
// y[m, n] = sum_k x[m, k] * W[n, k], where each row of W is a run of the file's blocks
// (ggml-common.h layouts; __init__.py beside this file lists them). Decode reads every weight
// once per token, so the loop is: decode one block into 32..256 floats in L1, then multiply
// it into the accumulators of up to ROWS activation rows. Activations and accumulation are
// float32, so the product equals dequantize-then-matmul up to the order of the additions.
//
// One source, several vector widths: the Python side compiles it once per ISA the CPU has
// (-mavx2 -mfma, or the AVX512 set) and names each build's op namespace after it (QWEN2_NS).
// Block decoding is plain loops the compiler vectorizes; the dot products use intrinsics.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

enum QType : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };


inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float bfloat(const uint8_t* p) {
  uint32_t u = 0;
  std::memcpy(reinterpret_cast<uint8_t*>(&u) + 2, p, 2);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
using vec = __m512;
constexpr int W = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
// 32 int8 -> two vectors of 16 floats
inline void widen(__m256i q, vec* f) {
  f[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
  f[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
}
inline void load_half(const uint8_t* p, vec* f) {
  f[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  f[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
}
inline void load_bfloat(const uint8_t* p, vec* f) {
  for (int v = 0; v < 2; ++v) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * v));
    f[v] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
#else
using vec = __m256;
constexpr int W = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 32 int8 -> four vectors of 8 floats
inline void widen(__m256i q, vec* f) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}
inline void load_half(const uint8_t* p, vec* f) {
  for (int v = 0; v < 4; ++v) f[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v)));
}
inline void load_bfloat(const uint8_t* p, vec* f) {
  for (int v = 0; v < 4; ++v) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v));
    f[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}
#endif
constexpr int LANES = 32 / W;  // vectors per run of 32 weights
// Activation rows sharing one decoded block per pass: as many as the accumulators that fit the
// vector registers (32 with AVX512, 16 with AVX2) beside the decoded block.
constexpr int ROWS = W == 16 ? 8 : 4;

// -- block decoding, in runs of 32 weights ------------------------------------------------
// runs<T>(block, f) calls f(i, vals, m) for the i-th run of 32 weights of one block, where
// vals (LANES vectors) hold the weights plus m: weight = vals - m (m is nonzero only for the
// K-quants with mins, whose callers fold it in as m * sum(x) rather than per weight).

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 16 bytes -> 32 nibbles: the low nibbles are weights 0..15, the high ones 16..31
inline __m256i nibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// bit j of `bits` -> byte j is 0xFF or 0x00
inline __m256i bit_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(  // byte j <- byte j/8 of bits (each 128-bit lane has all 4)
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);  // byte j keeps bit j % 8
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
}

inline void scaled(__m256i q, float s_lo, float s_hi, vec* f) {
  widen(q, f);
  for (int v = 0; v < LANES; ++v) f[v] = vmul(f[v], vset1(v < LANES / 2 ? s_lo : s_hi));
}

// The 8 six-bit scales and mins of a K-quant super-block (12 bytes).
inline void scales_mins(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

template <int64_t T> struct Blocks;

template <> struct Blocks<F16> {
  static constexpr int64_t n = 32, bytes = 64;
  static constexpr bool mins = false;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    vec v[LANES];
    load_half(b, v);
    f(0, v, 0.f);
  }
  static float scalar(const uint8_t* row, int64_t k) { return half(row + 2 * k); }
};

template <> struct Blocks<BF16> {
  static constexpr int64_t n = 32, bytes = 64;
  static constexpr bool mins = false;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    vec v[LANES];
    load_bfloat(b, v);
    f(0, v, 0.f);
  }
  static float scalar(const uint8_t* row, int64_t k) { return bfloat(row + 2 * k); }
};

template <> struct Blocks<Q8_0> {  // d (f16), 32 x int8
  static constexpr int64_t n = 32, bytes = 34;
  static constexpr bool mins = false;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    const float d = half(b);
    vec v[LANES];
    scaled(load32(b + 2), d, d, v);
    f(0, v, 0.f);
  }
};

template <> struct Blocks<Q4_0> {  // d, 16 bytes of nibbles; w = d * (q - 8)
  static constexpr int64_t n = 32, bytes = 18;
  static constexpr bool mins = false;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    const float d = half(b);
    vec v[LANES];
    scaled(_mm256_sub_epi8(nibbles(b + 2), _mm256_set1_epi8(8)), d, d, v);
    f(0, v, 0.f);
  }
};

template <> struct Blocks<Q5_0> {  // d, 32 fifth bits, 16 bytes of nibbles; w = d * (q - 16)
  static constexpr int64_t n = 32, bytes = 22;
#if defined(__AVX512F__)
  // The fifth bits go straight into mask registers and the -16 d offset is folded in as a min
  // (16 d * sum(x)): a third fewer instructions than the byte shuffles below, on the commonest type.
  static constexpr bool mins = true;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    const float d = half(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6)));
    const __m512i sixteen = _mm512_set1_epi32(16);
    __m512i lo = _mm512_and_si512(q, _mm512_set1_epi32(0x0F)), hi = _mm512_srli_epi32(q, 4);
    lo = _mm512_mask_add_epi32(lo, static_cast<__mmask16>(qh & 0xFFFF), lo, sixteen);
    hi = _mm512_mask_add_epi32(hi, static_cast<__mmask16>(qh >> 16), hi, sixteen);
    const vec dv = vset1(d);
    const vec v[LANES] = {vmul(_mm512_cvtepi32_ps(lo), dv), vmul(_mm512_cvtepi32_ps(hi), dv)};
    f(0, v, 16.f * d);
  }
#else
  static constexpr bool mins = false;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    const float d = half(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const __m256i high = _mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(0x10));
    vec v[LANES];
    scaled(_mm256_sub_epi8(_mm256_or_si256(nibbles(b + 6), high), _mm256_set1_epi8(16)), d, d, v);
    f(0, v, 0.f);
  }
#endif
};

template <> struct Blocks<Q4_K> {  // d, dmin, 12 bytes of scales/mins, 128 bytes: 32 hold runs 2g, 2g+1
  static constexpr int64_t n = 256, bytes = 144;
  static constexpr bool mins = true;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    const float d = half(b), dmin = half(b + 2);
    uint8_t sc[8], mn[8];
    scales_mins(b + 4, sc, mn);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int g = 0; g < 4; ++g) {
      const __m256i q = load32(b + 16 + 32 * g);
      vec v[LANES];
      scaled(_mm256_and_si256(q, low4), d * sc[2 * g], d * sc[2 * g], v);
      f(2 * g, v, dmin * mn[2 * g]);
      scaled(_mm256_and_si256(_mm256_srli_epi16(q, 4), low4), d * sc[2 * g + 1], d * sc[2 * g + 1], v);
      f(2 * g + 1, v, dmin * mn[2 * g + 1]);
    }
  }
};

template <> struct Blocks<Q5_K> {  // as Q4_K with a fifth bit: bit s of the 32 qh bytes for run s
  static constexpr int64_t n = 256, bytes = 176;
  static constexpr bool mins = true;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    const float d = half(b), dmin = half(b + 2);
    uint8_t sc[8], mn[8];
    scales_mins(b + 4, sc, mn);
    const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1), qh = load32(b + 16);
    for (int s = 0; s < 8; ++s) {
      __m256i q = load32(b + 48 + 32 * (s / 2));
      if (s % 2) q = _mm256_srli_epi16(q, 4);
      const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, s), one), 4);
      vec v[LANES];
      scaled(_mm256_or_si256(_mm256_and_si256(q, low4), high), d * sc[s], d * sc[s], v);
      f(s, v, dmin * mn[s]);
    }
  }
};

template <> struct Blocks<Q6_K> {  // ql[128], qh[64], 16 int8 scales (one per 16 weights), d last
  static constexpr int64_t n = 256, bytes = 210;
  static constexpr bool mins = false;
  template <class F> static void runs(const uint8_t* b, F&& f) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half(b + 208);
    const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {  // 128 weights: 64 bytes of ql, 32 of qh
      const __m256i qh = load32(b + 128 + 32 * h);
      for (int part = 0; part < 4; ++part) {  // 32 weights: ql nibble part/2, qh bits 2*part..
        __m256i lo = load32(b + 64 * h + 32 * (part % 2));
        if (part / 2) lo = _mm256_srli_epi16(lo, 4);
        const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * part), two), 4);
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(lo, low4), hi), bias);
        const int run = 4 * h + part;
        vec v[LANES];
        scaled(q, d * sc[2 * run], d * sc[2 * run + 1], v);
        f(run, v, 0.f);
      }
    }
  }
};

// y[r, n] for output rows [n0, n1) and R activation rows starting at x (row stride K).
// xsum[r, j]: the sum of run j of row r, for the mins of Q4_K / Q5_K.
template <int64_t T, int R>
void dot_rows(const float* x, const float* xsum, int64_t K, const uint8_t* w, int64_t row_bytes, float* y,
              int64_t N, int64_t n0, int64_t n1) {
  using B = Blocks<T>;
  // Runs alternate between P accumulator sets: with one or two rows a single chain of FMAs would
  // wait on its own latency (4 cycles) rather than on the loads. More rows are enough chains.
  constexpr int P = R <= 2 ? 2 : 1;
  const int64_t blocks = K / B::n, runs_per_row = K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    vec acc[P][R][LANES];
    float low[R] = {};
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < LANES; ++v) acc[p][r][v] = vzero();
    auto block = [&](auto set, int64_t b) {  // set: which accumulators, a compile-time constant
      const float* xb = x + b * B::n;
      B::runs(row + b * B::bytes, [&](int i, const vec* vals, float m) {
        for (int r = 0; r < R; ++r) {
          for (int v = 0; v < LANES; ++v)
            acc[set()][r][v] = vfma(vals[v], vload(xb + r * K + 32 * i + W * v), acc[set()][r][v]);
          if constexpr (B::mins) low[r] += m * xsum[r * runs_per_row + b * (B::n / 32) + i];
        }
      });
    };
    int64_t b = 0;
    for (; b + 1 < blocks; b += 2) {
      block(std::integral_constant<int, 0>{}, b);
      block(std::integral_constant<int, P - 1>{}, b + 1);
    }
    if (b < blocks) block(std::integral_constant<int, 0>{}, b);
    for (int r = 0; r < R; ++r) {
      vec s = acc[0][r][0];
      for (int p = 0; p < P; ++p)
        for (int v = p == 0 ? 1 : 0; v < LANES; ++v) s = vadd(s, acc[p][r][v]);
      float total = vsum(s) - low[r];
      if constexpr (T == F16 || T == BF16)  // their rows need not be a multiple of 32: the tail, scalar
        for (int64_t k = blocks * B::n; k < K; ++k) total += x[r * K + k] * B::scalar(row, k);
      y[r * N + n] = total;
    }
  }
}

template <int64_t T>
void matmul_typed(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes,
                  float* y, int64_t N) {
  // ~32 KiB of weights per task keeps two threads busy on the 128-row K/V projections
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, row_bytes));
  const int64_t runs = K / 32;
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + ROWS <= M; m += ROWS)
      dot_rows<T, ROWS>(x + m * K, xsum + m * runs, K, w, row_bytes, y + m * N, N, n0, n1);
    if constexpr (ROWS > 4)
      for (; m + 4 <= M; m += 4) dot_rows<T, 4>(x + m * K, xsum + m * runs, K, w, row_bytes, y + m * N, N, n0, n1);
    for (; m + 2 <= M; m += 2) dot_rows<T, 2>(x + m * K, xsum + m * runs, K, w, row_bytes, y + m * N, N, n0, n1);
    for (; m < M; ++m) dot_rows<T, 1>(x + m * K, xsum + m * runs, K, w, row_bytes, y + m * N, N, n0, n1);
  });
}

template <int64_t T>
void dequantize_typed(const uint8_t* w, int64_t row_bytes, int64_t N, int64_t K, float* out) {
  using B = Blocks<T>;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w + n * row_bytes;
      float* o = out + n * K;
      const int64_t blocks = K / B::n;
      for (int64_t b = 0; b < blocks; ++b) {
        B::runs(row + b * B::bytes, [&](int i, const vec* vals, float m) {
          for (int v = 0; v < LANES; ++v) vstore(o + b * B::n + 32 * i + W * v, vsub(vals[v], vset1(m)));
        });
      }
      if constexpr (T == F16 || T == BF16)
        for (int64_t k = blocks * B::n; k < K; ++k) o[k] = B::scalar(row, k);
    }
  });
}

int64_t block_weights(int64_t t) {
  switch (t) {
    case F16: case BF16: return 1;
    case Q4_0: case Q5_0: case Q8_0: return 32;
    case Q4_K: case Q5_K: case Q6_K: return 256;
    default: TORCH_CHECK(false, "GGUF type ", t, " has no kernel here");
  }
}

int64_t block_bytes(int64_t t) {
  switch (t) {
    case F16: case BF16: return 2;
    case Q4_0: return 18;
    case Q5_0: return 22;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: TORCH_CHECK(false, "GGUF type ", t, " has no kernel here");
  }
}

void check_weight(const at::Tensor& w, int64_t t, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.stride(1) == 1,
              "weight must be a CPU uint8 matrix of blocks with contiguous rows");
  TORCH_CHECK(K % block_weights(t) == 0, "K=", K, " is not a whole number of blocks of type ", t);
  TORCH_CHECK(w.size(1) == K / block_weights(t) * block_bytes(t), "weight rows hold ", w.size(1),
              " bytes, K=", K, " needs ", K / block_weights(t) * block_bytes(t));
}

#define DISPATCH(t, FN, ...)                         \
  switch (t) {                                       \
    case F16: FN<F16>(__VA_ARGS__); break;           \
    case BF16: FN<BF16>(__VA_ARGS__); break;         \
    case Q4_0: FN<Q4_0>(__VA_ARGS__); break;         \
    case Q5_0: FN<Q5_0>(__VA_ARGS__); break;         \
    case Q8_0: FN<Q8_0>(__VA_ARGS__); break;         \
    case Q4_K: FN<Q4_K>(__VA_ARGS__); break;         \
    case Q5_K: FN<Q5_K>(__VA_ARGS__); break;         \
    case Q6_K: FN<Q6_K>(__VA_ARGS__); break;         \
    default: TORCH_CHECK(false, "GGUF type ", t, " has no kernel here"); \
  }

at::Tensor matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t K) {
  check_weight(w, qtype, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = w.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  // the sums of each run of 32 activations, for the types whose weights carry an offset (mins)
  const at::Tensor xsum = K % 32 == 0 ? xc.view({M, K / 32, 32}).sum(-1).contiguous()
                                      : at::zeros({M, K / 32}, xc.options());
  DISPATCH(qtype, matmul_typed, xc.data_ptr<float>(), xsum.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(),
           w.stride(0), y.data_ptr<float>(), N);
  return y;
}

at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t K) {
  check_weight(w, qtype, K);
  at::Tensor out = at::empty({w.size(0), K}, at::dtype(at::kFloat));
  if (w.size(0) == 0) return out;
  DISPATCH(qtype, dequantize_typed, w.data_ptr<uint8_t>(), w.stride(0), w.size(0), K, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(QWEN2_NS, m) {
  m.def("matmul(Tensor x, Tensor w, int qtype, int k) -> Tensor", &matmul);
  m.def("dequantize(Tensor w, int qtype, int k) -> Tensor", &dequantize);
}
