// Greedy tokens: the index of each row's first largest logit, rows in parallel.
//
// A 32-row decode step draws its greedy tokens from 32 x 151,936 float32 logits at once; torch's
// max over them (with indices; argmax is slower still) took 1.5-2.5 ms on one thread's worth of
// work, a few % of the step. Here each row is read once for its largest value and once more up to
// where that value first occurs. A NaN counts as the largest, as torch.max has it.

#include "int8_matmul.h"

namespace {

int64_t first_max(const float* row, int64_t V) {
  __m256 top8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 x = _mm256_loadu_ps(row + i);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    top8 = _mm256_max_ps(top8, x);
  }
  float top = max8(top8);
  bool nan = _mm256_movemask_ps(nan8) != 0;
  for (; i < V; ++i) {
    nan = nan || std::isnan(row[i]);
    top = std::max(top, row[i]);
  }
  if (nan) return std::find_if(row, row + V, [](float x) { return std::isnan(x); }) - row;
  const __m256 wanted = _mm256_set1_ps(top);
  for (i = 0; i + 8 <= V; i += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), wanted, _CMP_EQ_OQ));
    if (hits) return i + __builtin_ctz(hits);
  }
  for (; i < V; ++i)
    if (row[i] == top) return i;
  return 0;  // every logit -inf: the first, as torch.max gives
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.size(1) > 0,
              "logits must be CPU float32 [rows, vocabulary]");
  const at::Tensor rows = logits.contiguous();
  const int64_t M = rows.size(0), V = rows.size(1);
  at::Tensor out = at::empty({M}, rows.options().dtype(at::kLong));
  const float* x = rows.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) o[m] = first_max(x + m * V, V);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWEN2_NS, m) { m.def("argmax_rows(Tensor logits) -> Tensor", &argmax_rows); }
