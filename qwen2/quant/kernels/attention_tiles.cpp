// Causal attention of a prompt chunk on AMX bf16 tiles, at float32's accuracy.
//
// The scores must stay near-exact: Qwen2's q and k carry large biases, so q.k reaches the hundreds
// and more at early positions, and bf16 inputs (8 significant bits) err there by whole units before
// the softmax (bench/RESULTS.md: torch's bf16 attention put one early position at KL 7.3 from float32).
// So each float32 operand is split into bf16 parts, x = hi + mid + lo, each part the rounding of what
// the parts before it left, and a product is the sum of the parts' tile products, in float32 in the
// tiles. q.k takes three parts of each (24 bits, float32's) and the six products above 2^-24 of the
// whole; P.V takes two parts (16 bits) and three products: probabilities in [0, 1] and values of the
// size of activations lose ~1e-5 of an output there. Six tile products still beat float32 FMAs 2x.
//
// Per 16 query rows of one head: the scores against every key one of them may see (16 x keys, float32,
// 32 keys a step), an exact softmax in float32 (each row its own max, masked past its own position),
// then P V with the 16 x head_dim output in the tiles across all keys. Keys and values are split into
// tile layout once per call, shared by every query head of their group.

#include "int8_matmul.h"

namespace {

#if defined(__AMX_BF16__)

// exp on 16 floats: exp8's polynomial (Cephes' expf) on x - n ln2, scaled by 2^n
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365447505531f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

// 16 floats as bf16 parts, each rounded to nearest even (vcvtneps2bf16): hi + lo (16 bits), or hi + mid + lo
inline __m512 widen(__m256bh h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
}
inline void split16(__m512 v, uint16_t* hi, uint16_t* lo) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), reinterpret_cast<__m256i>(h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(v, widen(h)))));
}

inline void split16(__m512 v, uint16_t* hi, uint16_t* mid, uint16_t* lo) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), reinterpret_cast<__m256i>(h));
  split16(_mm512_sub_ps(v, widen(h)), mid, lo);
}

// Scores of 16 query rows against 32 keys into C tiles 0-1 (into c, rows ldc floats apart), both split in
// three (q at q + part * q_part, row-major, lda a row; keys at k + part * k_part, the tile of 16 keys i and
// dims 32s.. at 512 s + i k_block): the six products of q's and k's parts whose errors are above 2^-24
// of the whole (hi.hi, mid.hi, lo.hi, hi.mid, mid.mid, hi.lo). Two parts each were not enough: their
// scores, off by 2^-17 of |q||k| (~0.01 at Qwen2's early positions), moved one position's prediction by
// KL 8 from float64's, where float32's is off by 0.6 (bench/RESULTS.md).
inline void scores_tiles(const uint16_t* q, int64_t q_part, int64_t lda, int64_t steps, const uint16_t* k,
                         int64_t k_part, int64_t k_block, float* c, int64_t ldc) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(2, q + 32 * s, 2 * lda);
    _tile_loadd(3, q + q_part + 32 * s, 2 * lda);
    _tile_loadd(4, q + 2 * q_part + 32 * s, 2 * lda);
#define QWEN2_SCORES(i)                                   \
  _tile_loadd(5, k + 512 * s + (i) * k_block, 64);        \
  _tile_loadd(6, k + k_part + 512 * s + (i) * k_block, 64); \
  _tile_loadd(7, k + 2 * k_part + 512 * s + (i) * k_block, 64); \
  _tile_dpbf16ps(i, 2, 5);                                \
  _tile_dpbf16ps(i, 3, 5);                                \
  _tile_dpbf16ps(i, 4, 5);                                \
  _tile_dpbf16ps(i, 2, 6);                                \
  _tile_dpbf16ps(i, 3, 6);                                \
  _tile_dpbf16ps(i, 2, 7);
    QWEN2_SCORES(0)
    QWEN2_SCORES(1)
#undef QWEN2_SCORES
  }
  _tile_stored(0, c, 4 * ldc);
  _tile_stored(1, c + 16, 4 * ldc);
}

// C tiles 0-3 (16 rows x 64 floats into c, rows ldc floats apart) = the sum over `steps` of A_s B_s,i, with
// A_s the columns 32s..32s+31 of the row-major a_hi + a_lo (lda bf16 a row) and B_s,i the tile at
// b + s * b_step + i * b_tile of b_hi + b_lo: three tile products each.
inline void split_product(const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda, int64_t steps,
                          const uint16_t* b_hi, const uint16_t* b_lo, int64_t b_step, int64_t b_tile, float* c,
                          int64_t ldc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a_hi + 32 * s, 2 * lda);
    _tile_loadd(5, a_lo + 32 * s, 2 * lda);
    const uint16_t *hi = b_hi + s * b_step, *lo = b_lo + s * b_step;
    // tile numbers are immediates (pasted into the asm), so the four outputs are written out
#define QWEN2_ACCUMULATE(i)                  \
  _tile_loadd(6, hi + (i) * b_tile, 64);     \
  _tile_loadd(7, lo + (i) * b_tile, 64);     \
  _tile_dpbf16ps(i, 4, 6);                   \
  _tile_dpbf16ps(i, 5, 6);                   \
  _tile_dpbf16ps(i, 4, 7);
    QWEN2_ACCUMULATE(0)
    QWEN2_ACCUMULATE(1)
    QWEN2_ACCUMULATE(2)
    QWEN2_ACCUMULATE(3)
#undef QWEN2_ACCUMULATE
  }
  _tile_stored(0, c, 4 * ldc);
  _tile_stored(1, c + 16, 4 * ldc);
  _tile_stored(2, c + 32, 4 * ldc);
  _tile_stored(3, c + 48, 4 * ldc);
}

// One group's keys and values split into B tiles (keys past S are zeros, to Spad a multiple of 64):
//   keys:   [hi/lo][16 keys kb][32 dims s] tile: row r, column j = dims 32s+2r, 32s+2r+1 of key 16kb+j
//   values: [hi/lo][32 keys s][16 dims i] tile: row r, column n = dim 16i+n of keys 32s+2r, 32s+2r+1
struct SplitKV {
  std::vector<uint16_t> k, v;  // keys: hi, mid, lo (each Spad x hd); values: hi, lo
  int64_t Spad, hd;
};

void split_keys(const at::TensorAccessor<float, 2>& K, const at::TensorAccessor<float, 2>& V, int64_t S, int64_t j0,
                int64_t j1, SplitKV& out) {
  const int64_t hd = out.hd, chunks = hd / 32, blocks = hd / 16, low = out.Spad * hd;  // one part's size
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));  // a tile's rows are 16 pairs apart
  const auto row = [S](const at::TensorAccessor<float, 2>& X, int64_t j, int64_t d) {
    return j < S ? _mm512_loadu_ps(&X[j][d]) : _mm512_setzero_ps();
  };
  for (int64_t j = j0; j < j1; ++j)  // a key's 32 dims of chunk s are 16 pairs down column j % 16 of its tile
    for (int64_t s = 0; s < chunks; ++s) {
      alignas(64) uint16_t parts[3][32];
      split16(row(K, j, 32 * s), parts[0], parts[1], parts[2]);
      split16(row(K, j, 32 * s + 16), parts[0] + 16, parts[1] + 16, parts[2] + 16);
      uint16_t* tile = out.k.data() + (j / 16 * chunks + s) * 512 + 2 * (j % 16);
      for (int part = 0; part < 3; ++part)
        _mm512_i32scatter_epi32(tile + part * low, column, _mm512_load_si512(parts[part]), 4);
    }
  for (int64_t j = j0; j < j1; j += 2)  // two keys' 16 dims of block i, interleaved, are one tile row
    for (int64_t i = 0; i < blocks; ++i) {
      alignas(64) uint16_t hi[2][16], lo[2][16];
      split16(row(V, j, 16 * i), hi[0], lo[0]);
      split16(row(V, j + 1, 16 * i), hi[1], lo[1]);
      uint16_t* tile_row = out.v.data() + (j / 32 * blocks + i) * 512 + (j % 32 / 2) * 32;
      for (int n = 0; n < 16; ++n) {
        tile_row[2 * n] = hi[0][n], tile_row[2 * n + 1] = hi[1][n];
        tile_row[low + 2 * n] = lo[0][n], tile_row[low + 2 * n + 1] = lo[1][n];
      }
    }
}

// Rows t0.. (up to 16) of head h: out[t][h] = softmax(scale q_t K^T over keys <= positions[t]) V
void attend_block(const at::TensorAccessor<float, 3>& q, const at::TensorAccessor<int64_t, 1>& positions,
                  const SplitKV& kv, int64_t S, int64_t T, int64_t h, int64_t t0, float scale,
                  at::TensorAccessor<float, 3> out) {
  const int64_t hd = kv.hd, rows = std::min<int64_t>(16, T - t0);
  int64_t seen[16] = {}, widest = 0;  // keys each row sees
  for (int64_t r = 0; r < rows; ++r) {
    seen[r] = std::min(positions[t0 + r], S - 1) + 1;
    widest = std::max(widest, seen[r]);
  }
  const int64_t keys = (widest + 31) / 32 * 32, part = 16 * std::max(hd, keys);
  thread_local std::vector<uint16_t> a;  // q in three parts, then P in two
  thread_local std::vector<float> scores;
  a.assign(3 * part, 0);  // the q rows past the last are zero
  scores.resize(16 * std::max(keys, hd));
  uint16_t *a_hi = a.data(), *a_lo = a.data() + part;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < hd; d += 16)
      split16(_mm512_mul_ps(_mm512_loadu_ps(&q[h][t0 + r][d]), _mm512_set1_ps(scale)), a.data() + r * hd + d,
              a.data() + part + r * hd + d, a.data() + 2 * part + r * hd + d);
  for (int64_t j = 0; j < keys; j += 32)
    scores_tiles(a.data(), part, hd, hd / 32, kv.k.data() + j * hd, kv.Spad * hd, hd / 32 * 512, scores.data() + j,
                 keys);
  float total[16] = {};
  for (int64_t r = 0; r < 16; ++r) {  // P = exp(scores - the row's max) as hi + lo, zero past the row's own keys
    const float* row = scores.data() + r * keys;
    uint16_t *p_hi = a_hi + r * keys, *p_lo = a_lo + r * keys;
    const int64_t n = r < rows ? seen[r] : 0, full = n / 16 * 16;
    const __mmask16 tail = _cvtu32_mask16((1u << (n - full)) - 1);
    __m512 top = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, row + full);
    for (int64_t j = 0; j < full; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < full; j += 16) {
      const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), m));
      sum = _mm512_add_ps(sum, p);
      split16(p, p_hi + j, p_lo + j);
    }
    for (int64_t j = full; j < keys; j += 16) {  // the tail, then zeros: keys is a multiple of 32
      const __m512 p = _mm512_maskz_mov_ps(j == full ? tail : 0, exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), m)));
      sum = _mm512_add_ps(sum, p);
      split16(p, p_hi + j, p_lo + j);
    }
    total[r] = _mm512_reduce_add_ps(sum);
  }
  float* o = scores.data();  // 16 x hd
  for (int64_t d = 0; d < hd; d += 64)
    split_product(a_hi, a_lo, keys, keys / 32, kv.v.data() + d / 16 * 512, kv.v.data() + kv.Spad * hd + d / 16 * 512,
                  hd / 16 * 512, 512, o + d, hd);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < hd; d += 16)
      _mm512_storeu_ps(&out[t0 + r][h][d],
                       _mm512_div_ps(_mm512_loadu_ps(o + r * hd + d), _mm512_set1_ps(total[r])));
}

#endif

// q (B, heads, T, hd), k and v (B, kv_heads, S, hd), float32; positions (B, T): query t of row b sees the
// keys 0..positions[b][t] (keys sit at their positions, as in the KV cache). Out: (B, T, heads, hd).
at::Tensor attention_tiles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                           double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
              "q must be (B, heads, T, hd), k and v (B, kv_heads, S, hd), heads a multiple of kv_heads");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k and v must be float32");
  TORCH_CHECK(q.size(3) % 64 == 0, "head_dim must be a multiple of 64");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.size(0) == q.size(0) &&
                  positions.size(1) == q.size(2),
              "positions must be int64 (B, T)");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), G = k.size(1), S = k.size(2);
  at::Tensor out = at::empty({B, T, H, hd}, q.options());
#if defined(__AMX_BF16__)
  TORCH_CHECK(amx_ready(), "no AMX tiles are available to this process");
  TORCH_CHECK(S > 0 && positions.min().item<int64_t>() >= 0, "positions must be >= 0 and there must be keys");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), pc = positions.contiguous();
  const auto qa = qc.accessor<float, 4>();
  const auto ka = kc.accessor<float, 4>(), va = vc.accessor<float, 4>();
  const auto pa = pc.accessor<int64_t, 2>();
  const auto oa = out.accessor<float, 4>();
  const int64_t Spad = (S + 63) / 64 * 64;  // whole 64s: split_keys works in 64s
  std::vector<SplitKV> kv(B * G);
  for (SplitKV& s : kv) s = {std::vector<uint16_t>(3 * Spad * hd), std::vector<uint16_t>(2 * Spad * hd), Spad, hd};
  at::parallel_for(0, B * G * (Spad / 64), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t bg = w / (Spad / 64), j = w % (Spad / 64) * 64;
      split_keys(ka[bg / G][bg % G], va[bg / G][bg % G], S, j, j + 64, kv[bg]);
    }
  });
  // later rows see more keys: blocks are dealt to the threads in turn, not in halves, so they finish together
  const int64_t blocks = (T + 15) / 16, items = B * H * blocks, threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    TileConfig config;  // C 0-3, A 4-5 (16 rows x 32 bf16), B 6-7: all 16 x 64 bytes
    for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.colsb[i] = 64;
    _tile_loadconfig(&config);
    for (int64_t thread = t0; thread < t1; ++thread)
      for (int64_t w = thread; w < items; w += threads) {
        const int64_t block = w % blocks, h = w / blocks % H, b = w / blocks / H;
        attend_block(qa[b], pa[b], kv[b * G + h / (H / G)], S, T, h, 16 * block, static_cast<float>(scale), oa[b]);
      }
    _tile_release();
  });
#else
  TORCH_CHECK(false, "this build has no AMX bf16 tiles: attention_tiles needs them (see tiles())");
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWEN2_NS, m) {
  m.def("attention_tiles(Tensor q, Tensor k, Tensor v, Tensor positions, float scale) -> Tensor", &attention_tiles);
}
