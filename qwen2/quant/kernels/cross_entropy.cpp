// The training loss's softmax over the vocabulary, on bf16 logits, in three passes over a row.
//
// Under bf16 autocast the loss's logits come out of the product in bf16, 152k to a row. As torch ops,
// the negative log-likelihood and its gradient w (softmax - one_hot) took about ten passes over them
// (a float32 copy, max, subtract, exp, sum, log, subtract, exp, scale, a bf16 copy for the products
// that follow), a third of a small model's training step. Here a row is read twice (max, then the
// exponentials, kept in a float32 row in cache with their sum) and the bf16 gradient written once.

#include "int8_matmul.h"

namespace {

inline __m256 load_bf16(const uint16_t* p) {  // 8 bf16 -> 8 floats
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float bf16_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_bf16(float f) {  // to nearest even, as store8 and torch round
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// logits bf16 (R, V), targets int64 (R,) in [0, V), weights float32 (R,) -> nll float32 (R,), the
// unweighted logsumexp(l) - l[t]; the logits are overwritten with their gradient w (softmax(l) - one_hot(t))
// (a row's logits are all read before its gradient is written: no second (R, V) tensor)
at::Tensor softmax_cross_entropy_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights) {
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 && logits.dim() == 2 && logits.is_contiguous(),
              "logits must be contiguous bfloat16 (rows, vocabulary)");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.numel() == R, "targets must be int64, one a row");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.numel() == R, "weights must be float32, one a row");
  TORCH_CHECK(V > 0, "the vocabulary must not be empty");
  const at::Tensor t = targets.contiguous(), w = weights.contiguous();
  TORCH_CHECK(R == 0 || (t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < V), "targets must be in [0, V)");
  at::Tensor nll = at::empty({R}, weights.options());
  uint16_t* rows = reinterpret_cast<uint16_t*>(logits.data_ptr<at::BFloat16>());
  const int64_t* tp = t.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  float* np = nll.data_ptr<float>();
  const int64_t whole = V / 8 * 8;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> e;  // the row's exp(l - max): computed once, read back from cache
    e.resize(V);
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* l = rows + r * V;
      uint16_t* g = rows + r * V;
      __m256 top8 = _mm256_set1_ps(-INFINITY);
      for (int64_t i = 0; i < whole; i += 8) top8 = _mm256_max_ps(top8, load_bf16(l + i));
      float top = max8(top8);
      for (int64_t i = whole; i < V; ++i) top = std::max(top, bf16_float(l[i]));
      const __m256 m = _mm256_set1_ps(top);
      __m256 total8 = _mm256_setzero_ps();
      for (int64_t i = 0; i < whole; i += 8) {
        const __m256 x = exp8(_mm256_sub_ps(load_bf16(l + i), m));
        _mm256_storeu_ps(e.data() + i, x);
        total8 = _mm256_add_ps(total8, x);
      }
      float sum = sum8(total8);
      for (int64_t i = whole; i < V; ++i) sum += e[i] = std::exp(bf16_float(l[i]) - top);
      const float weight = wp[r], target = bf16_float(l[tp[r]]);  // read before the row is overwritten
      const __m256 scale = _mm256_set1_ps(weight / sum);
      for (int64_t i = 0; i < whole; i += 8) store8(g + i, _mm256_mul_ps(scale, _mm256_loadu_ps(e.data() + i)));
      for (int64_t i = whole; i < V; ++i) g[i] = float_bf16(weight / sum * e[i]);
      g[tp[r]] = float_bf16(weight * (e[tp[r]] / sum - 1.f));
      np[r] = top + std::log(sum) - target;
    }
  });
  return nll;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWEN2_NS, m) {
  m.def("softmax_cross_entropy_(Tensor(a!) logits, Tensor targets, Tensor weights) -> Tensor", &softmax_cross_entropy_);
}
