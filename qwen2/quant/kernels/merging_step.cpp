// One OnDARE step (qwen2/train/merging_optimizer.py) over a parameter in one pass: decoupled weight
// decay, AdamW's moments and update, the update's Bernoulli(p) mask, tau's mask, and the merge.
//
// As torch ops the step took ~10 passes over every parameter and two draws of a uniform per entry
// from the CPU generator: a 0.5B model's step cost three times AdamW's. Here each entry is read and
// written once, and its masks are a hash of its index (hash32 below, the same the torch path
// computes), so every thread count and every split of the work keep the same entries.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

namespace {

// Chris Wellons' lowbias32: a full-avalanche 32-bit hash; keep = (hash32(index ^ key) >> 8) < threshold
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline __m256i hash8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// all ones in the lanes whose entry is kept (the hash's top 24 bits below the threshold, at most 2^24)
inline __m256 kept8(__m256i index, uint32_t key, int32_t threshold) {
  const __m256i h = _mm256_srli_epi32(hash8(_mm256_xor_si256(index, _mm256_set1_epi32(static_cast<int>(key)))), 8);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(threshold), h));
}

// x, grad, m, v (and tau, or an empty tensor): contiguous float32 of one size. The scalars are the
// torch path's, in its order: x *= decay; m += (1 - beta1) (g - m); v = beta2 v + (1 - beta2) g g;
// delta = m scale / (sqrt(v) / root + eps); x += keep(delta) (1 - alpha) + keep'(tau) alpha.
// `offset`: the index of x's first entry in the whole parameter (an FSDP2 shard's place in it).
void ondare_step_(at::Tensor& x, const at::Tensor& grad, at::Tensor& m, at::Tensor& v, const at::Tensor& tau,
                  double decay, double beta1, double beta2, double scale, double root, double eps, double alpha,
                  int64_t offset, int64_t threshold, int64_t key_update, int64_t key_tau) {
  const int64_t n = x.numel();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &grad, &m, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n && t->device().is_cpu(),
                "x, grad, m and v must be contiguous float32 CPU tensors of one size");
  }
  const bool merge = tau.numel() > 0 && alpha != 0;
  TORCH_CHECK(!merge || (tau.scalar_type() == at::kFloat && tau.is_contiguous() && tau.numel() == n),
              "tau must be contiguous float32 of x's size");
  TORCH_CHECK(offset >= 0 && offset + n <= (int64_t{1} << 32), "a parameter may hold at most 2^32 entries");
  TORCH_CHECK(threshold >= 0 && threshold <= (1 << 24), "threshold must be in [0, 2^24]");
  float* xp = x.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const float* tp = merge ? tau.data_ptr<float>() : nullptr;
  const float f_decay = decay, b1 = 1 - beta1, b2 = beta2, c2 = 1 - beta2, f_scale = scale, f_root = root,
              f_eps = eps, keep_delta = 1 - alpha, keep_tau = alpha;
  const uint32_t k_update = static_cast<uint32_t>(key_update), k_tau = static_cast<uint32_t>(key_tau);
  const int32_t limit = static_cast<int32_t>(threshold);
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
    const __m256 vdecay = _mm256_set1_ps(f_decay), vb1 = _mm256_set1_ps(b1), vb2 = _mm256_set1_ps(b2),
                 vc2 = _mm256_set1_ps(c2), vscale = _mm256_set1_ps(f_scale), vroot = _mm256_set1_ps(f_root),
                 veps = _mm256_set1_ps(f_eps), vkd = _mm256_set1_ps(keep_delta), vkt = _mm256_set1_ps(keep_tau);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      const __m256 g = _mm256_loadu_ps(gp + i);
      __m256 mi = _mm256_loadu_ps(mp + i);
      mi = _mm256_fmadd_ps(vb1, _mm256_sub_ps(g, mi), mi);  // torch's vectorised lerp
      const __m256 vi =
          _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(vp + i), vb2), _mm256_mul_ps(_mm256_mul_ps(vc2, g), g));
      _mm256_storeu_ps(mp + i, mi);
      _mm256_storeu_ps(vp + i, vi);
      const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), vroot), veps);
      const __m256 delta = _mm256_div_ps(_mm256_mul_ps(mi, vscale), denom);
      const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(offset + i)), lanes);
      __m256 update = _mm256_mul_ps(_mm256_and_ps(delta, kept8(index, k_update, limit)), vkd);
      if (merge) {
        const __m256 t = _mm256_and_ps(_mm256_loadu_ps(tp + i), kept8(index, k_tau, limit));
        update = _mm256_add_ps(update, _mm256_mul_ps(t, vkt));
      }
      _mm256_storeu_ps(xp + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(xp + i), vdecay), update));
    }
    for (; i < i1; ++i) {
      const float g = gp[i];
      const float mi = std::fma(b1, g - mp[i], mp[i]);
      const float vi = vp[i] * b2 + c2 * g * g;
      mp[i] = mi;
      vp[i] = vi;
      const float delta = mi * f_scale / (std::sqrt(vi) / f_root + f_eps);
      const uint32_t index = static_cast<uint32_t>(offset + i);
      float update = (static_cast<int32_t>(hash32(index ^ k_update) >> 8) < limit ? delta : 0.f) * keep_delta;
      if (merge && static_cast<int32_t>(hash32(index ^ k_tau) >> 8) < limit) update += tp[i] * keep_tau;
      xp[i] = xp[i] * f_decay + update;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWEN2_NS, m) {
  m.def("ondare_step_(Tensor(a!) x, Tensor grad, Tensor(b!) m, Tensor(c!) v, Tensor tau, float decay, float beta1, "
        "float beta2, float scale, float root, float eps, float alpha, int offset, int threshold, int key_update, "
        "int key_tau) -> ()",
        &ondare_step_);
}
