// A decode step's decoder layers in a single call: the whole of Block.forward, layer after layer, for B
// rows of one new token each, on int8-repacked weights and the engine's paged KV cache. Per layer:
//
//   h = RMSNorm(x); q, k, v = h Wq + bq, h Wk + bk, h Wv + bv (one int8 rounding of h for all three)
//   q, k rotated; k, v written at each row's slot of the pool; attention over the row's keys
//   x += (attention) Wo;  h = RMSNorm(x);  x += (SiLU(h Wgate) * (h Wup)) Wdown
//
// It exists for the time around the matrix products: the same step as torch ops is ~90 small
// ops a layer, which cost as much as the products themselves at batch 1 (bench/RESULTS.md). Dense
// layers without a sliding window, float32 activations; anything else runs the model's own code.

#include "int8_matmul.h"

#include <torch/custom_class.h>

#include <initializer_list>
#include <vector>

namespace {

// Per-row work (norms, rotary, biases, the KV write) forks over rows from this many on: a few rows
// stay on the calling thread, where a fork would cost more than the work.
constexpr int64_t ROWS_GRAIN = 8;

inline float dot(const float* a, const float* b, int64_t n) {  // n a multiple of 8
  __m256 s = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
  return sum8(s);
}

void rms_norm(const float* x, const float* w, float eps, int64_t B, int64_t H, float* out) {
  at::parallel_for(0, B, ROWS_GRAIN, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = x + b * H;
      const float scale = 1.f / std::sqrt(dot(xb, xb, H) / H + eps);
      for (int64_t i = 0; i < H; ++i) out[b * H + i] = xb[i] * scale * w[i];
    }
  });
}

void add_bias(float* y, const float* bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += bias[i];
}

// x * cos + rotate_half(x) * sin for each head of one row, where rotate_half(x) = (-x2, x1)
void rotate(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// The attention's vectors: 16 floats where the build has AVX-512 (half the instructions a key), else 8.
#if defined(__AVX512F__)
using Lane = __m512;
constexpr int LANE = 16;
inline Lane lane_load(const float* p) { return _mm512_loadu_ps(p); }
inline void lane_store(float* p, Lane a) { _mm512_storeu_ps(p, a); }
inline Lane lane_mul(Lane a, Lane b) { return _mm512_mul_ps(a, b); }
inline Lane lane_fmadd(Lane a, Lane b, Lane c) { return _mm512_fmadd_ps(a, b, c); }
inline Lane lane_set1(float x) { return _mm512_set1_ps(x); }
inline float lane_sum(Lane a) { return sum8(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))); }
inline Lane lane_add(Lane a, Lane b) { return _mm512_add_ps(a, b); }
template <int M>
inline Lane lane_shuffle(Lane a, Lane b) { return _mm512_shuffle_ps(a, b, M); }
constexpr int KEY_OF[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
inline void to_quarters(const Lane* a, Lane* quarters) {  // 16 vectors -> 4 whose 128-bit lanes hold 4-lane parts
  Lane halves[8];
  for (int i = 0; i < 8; ++i)
    halves[i] = lane_add(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    quarters[i] = lane_add(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
}
#else
using Lane = __m256;
constexpr int LANE = 8;
inline Lane lane_load(const float* p) { return _mm256_loadu_ps(p); }
inline void lane_store(float* p, Lane a) { _mm256_storeu_ps(p, a); }
inline Lane lane_mul(Lane a, Lane b) { return _mm256_mul_ps(a, b); }
inline Lane lane_fmadd(Lane a, Lane b, Lane c) { return _mm256_fmadd_ps(a, b, c); }
inline Lane lane_set1(float x) { return _mm256_set1_ps(x); }
inline float lane_sum(Lane a) { return sum8(a); }
inline Lane lane_add(Lane a, Lane b) { return _mm256_add_ps(a, b); }
template <int M>
inline Lane lane_shuffle(Lane a, Lane b) { return _mm256_shuffle_ps(a, b, M); }
constexpr int KEY_OF[8] = {0, 4, 1, 5, 2, 6, 3, 7};
inline void to_quarters(const Lane* a, Lane* quarters) {  // 8 vectors -> 4 whose 128-bit lanes hold 4-lane parts
  for (int i = 0; i < 4; ++i)
    quarters[i] = lane_add(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                           _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
}
#endif

// LANE keys' sums at once: lane i of lane_sums(a) is the sum of a[KEY_OF[i]]'s lanes (one add tree for all,
// not a horizontal sum per key); fed a[KEY_OF[i]] = key i's products, it gives the keys in order
inline Lane lane_sums(const Lane* a) {
  Lane q[4];
  to_quarters(a, q);
  const Lane ab = lane_add(lane_shuffle<0x44>(q[0], q[1]), lane_shuffle<0xEE>(q[0], q[1]));
  const Lane cd = lane_add(lane_shuffle<0x44>(q[2], q[3]), lane_shuffle<0xEE>(q[2], q[3]));
  return lane_add(lane_shuffle<0x88>(ab, cd), lane_shuffle<0xDD>(ab, cd));
}

// Attention of row b's query heads of KV head g over its keys 0..length-1, read through its block table.
// The group's heads share their keys and values: a chunk of them is read from memory once and kept in
// cache while every head of the group uses it (head by head over all keys read them `group` times
// over, 7 at Qwen2-0.5B: most of a long context's step). A head's query and its output stay in
// registers over a chunk (HD, the head size, fixed at compile time; a multiple of LANE); LANE keys'
// scores are summed by one add tree (a horizontal sum per key was most of a long context's attention).
// The weighted values are summed in key order.
template <int HD>
void attend(const float* q, const float* k_pool, const float* v_pool, const int64_t* table, int64_t length,
            int64_t block_size, int64_t n_kv, int64_t g, int64_t group, float* out) {
  constexpr int64_t chunk = 256;  // keys (64-128 KiB of them at head_dim 64-128): well inside L2
  constexpr int V = HD / LANE;
  const float scale = 1.f / std::sqrt(static_cast<float>(HD));
  std::vector<float> scores(group * length);
  std::vector<const float*> keys(length), values(length);
  for (int64_t t = 0; t < length; ++t) {
    const int64_t slot = table[t / block_size] * block_size + t % block_size;
    keys[t] = k_pool + (slot * n_kv + g) * HD;
    values[t] = v_pool + (slot * n_kv + g) * HD;
  }
  Lane acc[V];
  for (int64_t c = 0; c < length; c += chunk)
    for (int64_t j = 0; j < group; ++j) {
      for (int i = 0; i < V; ++i) acc[i] = lane_load(q + j * HD + LANE * i);
      float* p = scores.data() + j * length;
      const int64_t end = std::min(length, c + chunk);
      int64_t t = c;
      for (; t + LANE <= end; t += LANE) {
        Lane s[LANE];
        for (int n = 0; n < LANE; ++n) {
          const float* key = keys[t + KEY_OF[n]];
          s[n] = lane_mul(acc[0], lane_load(key));
          for (int i = 1; i < V; ++i) s[n] = lane_fmadd(acc[i], lane_load(key + LANE * i), s[n]);
        }
        lane_store(p + t, lane_mul(lane_sums(s), lane_set1(scale)));
      }
      for (; t < end; ++t) {
        Lane s = lane_mul(acc[0], lane_load(keys[t]));
        for (int i = 1; i < V; ++i) s = lane_fmadd(acc[i], lane_load(keys[t] + LANE * i), s);
        p[t] = lane_sum(s) * scale;
      }
    }
  for (int64_t j = 0; j < group; ++j) {
    float* p = scores.data() + j * length;
    __m256 top8 = _mm256_set1_ps(-INFINITY);  // the max apart from the products: no chain through memory
    int64_t t = 0;
    for (; t + 8 <= length; t += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(p + t));
    float top = max8(top8);
    for (; t < length; ++t) top = std::max(top, p[t]);
    __m256 sum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= length; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(top)));
      _mm256_storeu_ps(p + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = sum8(sum);
    for (; t < length; ++t) total += p[t] = std::exp(p[t] - top);
    for (t = 0; t + 8 <= length; t += 8) _mm256_storeu_ps(p + t, _mm256_div_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(total)));
    for (; t < length; ++t) p[t] /= total;
    std::fill(out + j * HD, out + (j + 1) * HD, 0.f);
  }
  for (int64_t c = 0; c < length; c += chunk)
    for (int64_t j = 0; j < group; ++j) {
      const float* p = scores.data() + j * length;
      float* o = out + j * HD;
      for (int i = 0; i < V; ++i) acc[i] = lane_load(o + LANE * i);
      for (int64_t t = c; t < std::min(length, c + chunk); ++t) {
        const Lane w = lane_set1(p[t]);
        for (int i = 0; i < V; ++i) acc[i] = lane_fmadd(w, lane_load(values[t] + LANE * i), acc[i]);
      }
      for (int i = 0; i < V; ++i) lane_store(o + LANE * i, acc[i]);
    }
}

using Attend = void (*)(const float*, const float*, const float*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                        int64_t, float*);

Attend attend_for(int64_t hd) {  // the head sizes fused_decode.py lets through
  switch (hd) {
    case 16: return attend<16>;
    case 32: return attend<32>;
    case 64: return attend<64>;
    case 128: return attend<128>;
    case 256: return attend<256>;
    default: return nullptr;
  }
}


void silu_mul(float* gate, const float* up, int64_t n) {  // gate <- gate * sigmoid(gate) * up
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(gate + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
  for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> float32: the bits move to the top half
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return c10::BFloat16(v, c10::BFloat16::from_bits()); }

// A prefill's SiLU(gate) * up (qwen2/quant/fused_prefill.py): gate_up (M, 2F), as the stacked gate/up
// product gives it (bf16 from a GEMM, float32 from our tiles) -> (M, F) bf16, computed in float32 and
// rounded once, as the down product's input. One pass instead of torch's four (casts, silu, mul).
template <class In>
void silu_mul_rows(const In* src, int64_t M, int64_t F, uint16_t* dst) {
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const In *gate = src + r * 2 * F, *up = gate + F;
      uint16_t* o = dst + r * F;
      int64_t i = 0;
      for (; i + 8 <= F; i += 8) store8(o + i, _mm256_mul_ps(silu8(load8(gate + i)), load8(up + i)));
      for (; i < F; ++i) {
        const float g = scalar(gate[i]), u = scalar(up[i]);
        o[i] = c10::BFloat16(g / (1.f + std::exp(-g)) * u).x;
      }
    }
  });
}

at::Tensor silu_mul_bf16(const at::Tensor& gate_up) {
  TORCH_CHECK((gate_up.scalar_type() == at::kBFloat16 || gate_up.scalar_type() == at::kFloat) &&
                  gate_up.size(-1) % 2 == 0,
              "gate_up must be bfloat16 or float32 with an even last dimension");
  const at::Tensor in = gate_up.contiguous();
  const int64_t F = in.size(-1) / 2, M = in.numel() / std::max<int64_t>(2 * F, 1);
  std::vector<int64_t> shape(in.sizes().begin(), in.sizes().end());
  shape.back() = F;
  at::Tensor out = at::empty(shape, in.options().dtype(at::kBFloat16));
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  if (in.scalar_type() == at::kFloat)
    silu_mul_rows(in.data_ptr<float>(), M, F, dst);
  else
    silu_mul_rows(reinterpret_cast<const uint16_t*>(in.data_ptr<at::BFloat16>()), M, F, dst);
  return out;
}

// A prefill's SiLU(x Wgate^T) * (x Wup^T), rounded once to bf16 [M, F], as the down product's input: on
// AMX tiles both products stay in the tiles (matmul_gated); elsewhere the two products, then silu_mul_bf16.
at::Tensor gated_product(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, int64_t gate_qtype,
                         int64_t up_qtype, int64_t K) {
  check_packed(gate, gate_qtype, K);
  check_packed(up, up_qtype, K);
  TORCH_CHECK(gate.size(0) == up.size(0), "gate and up must have as many rows");
  check_rows(x, K);
  const int64_t M = x.size(0), F = 8 * gate.size(0);
  at::Tensor out = at::empty({M, F}, x.options().dtype(at::kBFloat16));
  if (M == 0 || F == 0) return out;
#if defined(__AMX_BF16__)
  if (F % 16 == 0 && tiles_fit(M, {32})) {
    matmul_gated(reinterpret_cast<const uint16_t*>(prepare(x.contiguous(), true).bf16.data_ptr<at::BFloat16>()), M,
                 K, product_of(gate, gate_qtype, nullptr), product_of(up, up_qtype, nullptr),
                 reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), F);
    return out;
  }
#endif
  const at::Tensor both = matmul_stacked(x, {gate, up}, {gate_qtype, up_qtype}, K);
  silu_mul_rows(both.data_ptr<float>(), M, F, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

// One layer's weights, checked once when the stack is built: q, k, v, o, gate, up, down (repacked), their
// biases in the same order (empty where none)
struct LayerWeights {
  at::Tensor norm1, norm2;
  double eps;
  std::vector<at::Tensor> weights, biases;
  std::vector<int64_t> qtypes;
};

// A step's activations, allocated once for all its layers
struct StepBuffers {
  at::Tensor h, q, k, v, y, o, gate, up;
  StepBuffers(int64_t B, int64_t H, int64_t Q, int64_t KV, int64_t F, const at::TensorOptions& options)
      : h(at::empty({B, H}, options)), q(at::empty({B, Q}, options)), k(at::empty({B, KV}, options)),
        v(at::empty({B, KV}, options)), y(at::empty({B, Q}, options)), o(at::empty({B, H}, options)),
        gate(at::empty({B, F}, options)), up(at::empty({B, F}, options)) {}
};

// Where a step's rows read and write the paged cache (the engine's slots, tables and positions)
struct StepRows {
  const float *cos, *sin;
  const int64_t *slots, *table, *position;
  int64_t blocks, block_size;
};

// The model's decode layers, their weights listed once: a step is one call, not one call a layer (each
// call's dozen tensors and lists crossed from Python at ~75 us: 2 ms of a 1.5B batch-1 token).
class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(int64_t n_heads, int64_t n_kv, int64_t head_dim) : n_heads_(n_heads), n_kv_(n_kv), hd_(head_dim) {
    TORCH_CHECK(attend_for(head_dim), "the fused decode step takes head sizes 16, 32, 64, 128 and 256, not ", head_dim);
    TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0, n_heads, " query heads do not share ", n_kv, " KV heads evenly");
  }

  void add_layer(at::Tensor norm1, at::Tensor norm2, double eps, std::vector<at::Tensor> weights,
                 std::vector<int64_t> qtypes, std::vector<at::Tensor> biases) {
    TORCH_CHECK(weights.size() == 7 && qtypes.size() == 7 && biases.size() == 7, "seven matrices: q k v o gate up down");
    const int64_t H = norm1.numel(), Q = n_heads_ * hd_, KV = n_kv_ * hd_, F = 8 * weights[4].size(0);
    const int64_t widths[7] = {Q, KV, KV, H, F, F, H};
    const int64_t inputs[7] = {H, H, H, Q, H, H, F};
    for (int i = 0; i < 7; ++i) {
      check_packed(weights[i], qtypes[i], inputs[i]);
      TORCH_CHECK(8 * weights[i].size(0) == widths[i], "matrix ", i, " has ", 8 * weights[i].size(0), " rows, not ",
                  widths[i]);
      TORCH_CHECK(!biases[i].numel() || (biases[i].scalar_type() == at::kFloat && biases[i].is_contiguous() &&
                                         biases[i].numel() == widths[i]),
                  "matrix ", i, "'s bias must be a contiguous float32 vector of ", widths[i]);
    }
    for (const at::Tensor& norm : {norm1, norm2})
      TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.is_contiguous() && norm.numel() == H,
                  "the norms' weights must be contiguous float32 vectors of the same size");
    TORCH_CHECK(layers_.empty() || (layers_[0].norm1.numel() == H && layers_[0].weights[4].size(0) == F / 8),
                "every layer must have the same hidden and intermediate sizes (a step's buffers serve them all)");
    layers_.push_back({norm1, norm2, eps, std::move(weights), std::move(biases), std::move(qtypes)});
  }

  // x [B, H] float32 -> the last layer's output; k_pools/v_pools: float32 [layers, blocks, block_size, n_kv, hd]
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pools,
                     const at::Tensor& v_pools, const at::Tensor& write_index, const at::Tensor& tables,
                     const at::Tensor& positions, int64_t block_size) {
    TORCH_CHECK(!layers_.empty(), "the stack has no layers");
    const int64_t H = layers_[0].norm1.numel();
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == H, "x must be float32 [B, ", H, "]");
    const int64_t B = x.size(0), Q = n_heads_ * hd_, KV = n_kv_ * hd_;
    const int64_t L = static_cast<int64_t>(layers_.size());
    for (const at::Tensor& pool : {k_pools, v_pools})
      TORCH_CHECK(pool.scalar_type() == at::kFloat && pool.is_contiguous() && pool.dim() == 5 && pool.size(0) == L &&
                      pool.size(2) == block_size && pool.size(3) == n_kv_ && pool.size(4) == hd_,
                  "the KV pools must be contiguous float32 [", L, ", blocks, ", block_size, ", ", n_kv_, ", ", hd_, "]");
    TORCH_CHECK(tables.scalar_type() == at::kLong && write_index.scalar_type() == at::kLong &&
                    positions.scalar_type() == at::kLong && tables.dim() == 2 && tables.size(0) == B &&
                    write_index.numel() == B && positions.numel() == B,
                "int64 tables [B, blocks], slots [B] and positions [B]");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.numel() == B * hd_ &&
                    sin.numel() == B * hd_,
                "cos and sin must be float32 [B, ", hd_, "]");
    at::Tensor out = x.contiguous().clone();
    if (B == 0) return out;
    StepBuffers buf(B, H, Q, KV, 8 * layers_[0].weights[4].size(0), x.options());
    const at::Tensor cos_rows = cos.contiguous(), sin_rows = sin.contiguous(), slots = write_index.contiguous(),
                     table = tables.contiguous(), position = positions.contiguous();
    const StepRows rows{cos_rows.data_ptr<float>(), sin_rows.data_ptr<float>(), slots.data_ptr<int64_t>(),
                        table.data_ptr<int64_t>(), position.data_ptr<int64_t>(), table.size(1), block_size};
    const int64_t pool_stride = k_pools.stride(0);
    for (int64_t i = 0; i < L; ++i)
      layer_forward(layers_[i], out, buf, rows, k_pools.data_ptr<float>() + i * pool_stride,
                    v_pools.data_ptr<float>() + i * pool_stride);
    return out;
  }

 private:
  // x <- the layer's output, in place
  void layer_forward(const LayerWeights& w, at::Tensor& x, StepBuffers& buf, const StepRows& rows, float* k_all,
                     float* v_all) const {
    const int64_t B = x.size(0), H = x.size(1), Q = n_heads_ * hd_, KV = n_kv_ * hd_, F = buf.gate.size(1);
    const int64_t n_heads = n_heads_, n_kv = n_kv_, hd = hd_;
    const int64_t widths[7] = {Q, KV, KV, H, F, F, H};
    // matrices i (reading the same activations a) into ys, one parallel loop
    const bool tiles = tiles_fit(B, {Q, KV, H, F});
    auto product = [&](const at::Tensor& a, std::initializer_list<int> ids, std::initializer_list<float*> ys) {
      std::vector<Product> ps;
      auto y = ys.begin();
      for (int i : ids) ps.push_back(product_of(w.weights[i], w.qtypes[i], *y++));
      matmul_packed_together(prepare(a, tiles), ps);
    };
    auto bias_of = [&](int i) -> const float* { return w.biases[i].numel() ? w.biases[i].data_ptr<float>() : nullptr; };
    // matrix i's bias on its output y's rows (Qwen2's q, k and v have one: the row loop after q/k/v adds theirs)
    auto bias_on = [&](int i, float* y) {
      if (const float* bias = bias_of(i))
        at::parallel_for(0, B, ROWS_GRAIN, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) add_bias(y + b * widths[i], bias, widths[i]);
        });
    };
    const float *bq = bias_of(0), *bk = bias_of(1), *bv = bias_of(2);
    float *xo = x.data_ptr<float>(), *hp = buf.h.data_ptr<float>(), *op = buf.o.data_ptr<float>();
    float *qp = buf.q.data_ptr<float>(), *kp = buf.k.data_ptr<float>(), *vp = buf.v.data_ptr<float>();

    rms_norm(xo, w.norm1.data_ptr<float>(), w.eps, B, H, hp);
    product(buf.h, {0, 1, 2}, {qp, kp, vp});
    at::parallel_for(0, B, ROWS_GRAIN, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float *qb = qp + b * Q, *kb = kp + b * KV, *vb = vp + b * KV;
        if (bq) add_bias(qb, bq, Q);
        if (bk) add_bias(kb, bk, KV);
        if (bv) add_bias(vb, bv, KV);
        rotate(qb, n_heads, hd, rows.cos + b * hd, rows.sin + b * hd);
        rotate(kb, n_kv, hd, rows.cos + b * hd, rows.sin + b * hd);
        std::memcpy(k_all + rows.slots[b] * KV, kb, KV * sizeof(float));
        std::memcpy(v_all + rows.slots[b] * KV, vb, KV * sizeof(float));
      }
    });
    float* yp = buf.y.data_ptr<float>();
    const int64_t group = n_heads / n_kv;
    const Attend attend = attend_for(hd);
    // rows of a long context and a riding prompt's short ones share a step: the threads take each other's
    // leftover (row, KV head) pairs rather than wait for the slower half
    parallel_shares(B * n_kv, [&](int64_t i, int64_t) {
      const int64_t b = i / n_kv, g = i % n_kv;
      attend(qp + b * Q + g * group * hd, k_all, v_all, rows.table + b * rows.blocks, rows.position[b] + 1,
             rows.block_size, n_kv, g, group, yp + b * Q + g * group * hd);
    });
    product(buf.y, {3}, {op});
    bias_on(3, op);
    x.add_(buf.o);

    rms_norm(xo, w.norm2.data_ptr<float>(), w.eps, B, H, hp);
#if defined(__AMX_BF16__)
    if (tiles && !w.biases[4].numel() && !w.biases[5].numel()) {  // SiLU-times-up straight from the tiles, in bf16
      at::Tensor gated = at::empty({B, F}, x.options().dtype(at::kBFloat16));
      matmul_gated(reinterpret_cast<const uint16_t*>(prepare(buf.h, true).bf16.data_ptr<at::BFloat16>()), B, H,
                   product_of(w.weights[4], w.qtypes[4], nullptr), product_of(w.weights[5], w.qtypes[5], nullptr),
                   reinterpret_cast<uint16_t*>(gated.data_ptr<at::BFloat16>()), F);
      product(gated, {6}, {op});
      bias_on(6, op);
      x.add_(buf.o);
      return;
    }
#endif
    float *gp = buf.gate.data_ptr<float>(), *up = buf.up.data_ptr<float>();
    product(buf.h, {4, 5}, {gp, up});
    bias_on(4, gp);
    bias_on(5, up);
    silu_mul(gp, up, B * F);
    product(buf.gate, {6}, {op});
    bias_on(6, op);
    x.add_(buf.o);
  }

  int64_t n_heads_, n_kv_, hd_;
  std::vector<LayerWeights> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWEN2_NS, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<int64_t, int64_t, int64_t>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward);
  m.def("silu_mul_bf16(Tensor gate_up) -> Tensor", &silu_mul_bf16);
  m.def("gated_product(Tensor x, Tensor gate, Tensor up, int gate_qtype, int up_qtype, int k) -> Tensor", &gated_product);
}
