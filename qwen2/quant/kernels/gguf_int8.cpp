// Integer dot products on GGUF blocks repacked into groups of 8 rows: the ops (int8_matmul.h has
// the layout and the product).

#include "int8_matmul.h"

namespace {

// ---- repacking: the file's blocks -> records of 8 rows ---------------------------------

void scales_mins(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

int64_t block_bytes(int64_t t) {
  switch (t) {
    case Q4_0: return 18;
    case Q5_0: return 22;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: TORCH_CHECK(false, "GGUF type ", t, " has no integer kernel here");
  }
}

// One file block (one row's super-block) -> its weights as unsigned integers (Q8_0: int8), plus
// the header bytes of this row: f16 d (and dmin) copied, per-run scales as bytes.
template <int64_t T>
void unpack_block(const uint8_t* b, uint8_t* q, uint8_t* d, uint8_t* dmin, uint8_t* sc, uint8_t* mn) {
  if constexpr (T == Q4_0 || T == Q5_0 || T == Q8_0) {
    std::memcpy(d, b, 2);
    if constexpr (T == Q8_0) {
      std::memcpy(q, b + 2, 32);
      return;
    }
    const uint8_t* qs = b + (T == Q5_0 ? 6 : 2);
    uint32_t qh = 0;
    if (T == Q5_0) std::memcpy(&qh, b + 2, 4);
    for (int i = 0; i < 32; ++i) {
      const uint8_t nib = i < 16 ? qs[i] & 0x0F : qs[i - 16] >> 4;
      q[i] = nib | (((qh >> i) & 1) << 4);
    }
  } else if constexpr (T == Q4_K || T == Q5_K) {
    std::memcpy(d, b, 2);
    std::memcpy(dmin, b + 2, 2);
    scales_mins(b + 4, sc, mn);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
    for (int s = 0; s < 8; ++s)
      for (int p = 0; p < 32; ++p) {
        const uint8_t byte = qs[32 * (s / 2) + p];
        const uint8_t nib = s % 2 ? byte >> 4 : byte & 0x0F;
        q[32 * s + p] = T == Q5_K ? nib | (((qh[p] >> s) & 1) << 4) : nib;
      }
  } else {  // Q6_K: ql[128], qh[64], sc[16] (int8, one per 16 weights), d
    std::memcpy(d, b + 208, 2);
    std::memcpy(sc, b + 192, 16);
    for (int h = 0; h < 2; ++h)
      for (int part = 0; part < 4; ++part)
        for (int p = 0; p < 32; ++p) {
          const uint8_t lo = (b[64 * h + 32 * (part % 2) + p] >> (4 * (part / 2))) & 0x0F;
          const uint8_t hi = (b[128 + 32 * h + p] >> (2 * part)) & 3;
          q[32 * (4 * h + part) + p] = lo | (hi << 4);
        }
  }
}

template <int64_t T>
void repack_typed(const uint8_t* w, int64_t row_bytes, int64_t N, int64_t K, uint8_t* out, int64_t group_bytes) {
  constexpr Layout L = layout(T);
  constexpr int64_t runs = L.super / 32;
  const int64_t records = K / L.super, file_block = block_bytes(T);
  at::parallel_for(0, N / 8, 4, [&](int64_t g0, int64_t g1) {
    uint8_t q[8][256], d[8][2], dmin[8][2], sc[8][16], mn[8][8];
    for (int64_t g = g0; g < g1; ++g) {
      uint8_t* rec = out + g * group_bytes;
      for (int64_t s = 0; s < records; ++s, rec += L.header + runs * L.run) {
        for (int j = 0; j < 8; ++j)
          unpack_block<T>(w + (8 * g + j) * row_bytes + s * file_block, q[j], d[j], dmin[j], sc[j], mn[j]);
        std::memset(rec, 0, L.header + runs * L.run);
        for (int j = 0; j < 8; ++j) std::memcpy(rec + 2 * j, d[j], 2);
        if constexpr (T == Q4_K || T == Q5_K)
          for (int j = 0; j < 8; ++j) {
            std::memcpy(rec + 16 + 2 * j, dmin[j], 2);
            for (int r = 0; r < 8; ++r) rec[32 + 16 * r + j] = sc[j][r], rec[32 + 16 * r + 8 + j] = mn[j][r];
          }
        if constexpr (T == Q6_K)
          for (int j = 0; j < 8; ++j)
            for (int r = 0; r < 8; ++r) rec[16 + 16 * r + j] = sc[j][2 * r], rec[16 + 16 * r + 8 + j] = sc[j][2 * r + 1];
        for (int64_t r = 0; r < runs; ++r) {
          uint8_t* run = rec + L.header + r * L.run;
          for (int u = 0; u < 8; ++u)
            for (int j = 0; j < 8; ++j)
              for (int i = 0; i < 4; ++i) {
                const int p = 4 * j + i;  // byte p of unit u
                const uint8_t v = q[j][32 * r + 4 * u + i];
                if constexpr (T == Q8_0) {
                  run[32 * u + p] = v;
                  continue;
                }
                run[32 * (u % 4) + p] |= (v & 0x0F) << (u < 4 ? 0 : 4);
                if constexpr (T == Q5_0 || T == Q5_K) run[128 + 4 * u + p / 8] |= ((v >> 4) & 1) << (p % 8);
                if constexpr (T == Q6_K) run[128 + 32 * (u % 2) + p] |= (v >> 4) << (2 * (u / 2));
              }
        }
      }
    }
  });
}

template <int64_t T, class Out>
void dequantize_typed(const uint8_t* packed, int64_t group_bytes, int64_t N, int64_t K, Out* out) {
  constexpr Layout L = layout(T);
  constexpr int64_t runs = L.super / 32;
  // byte 4j+i of unit u -> gathered as dword j of each unit: row j's 32 weights in order
  const __m256i units = _mm256_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224);
  at::parallel_for(0, N / 8, 4, [&](int64_t g0, int64_t g1) {
    alignas(64) uint8_t q[256];
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* rec = packed + g * group_bytes;
      for (int64_t s = 0; s < K / L.super; ++s, rec += L.header + runs * L.run) {
        for (int64_t r = 0; r < runs; ++r) {
          ivec v[NV];
          decode_run<T>(rec + L.header + r * L.run, v);
          for (int i = 0; i < NV; ++i) std::memcpy(q + VB * i, &v[i], VB);
          __m256 scale[2], offset[2];  // per half run; the same twice but for Q6_K
          run_scales<T>(rec, r, scale, offset);
          if constexpr (T != Q6_K) scale[1] = scale[0], offset[1] = offset[0];
          alignas(32) float ws[2][8], wm[2][8];
          for (int h = 0; h < 2; ++h) _mm256_store_ps(ws[h], scale[h]), _mm256_store_ps(wm[h], offset[h]);
          for (int j = 0; j < 8; ++j) {
            const __m256i row = _mm256_i32gather_epi32(reinterpret_cast<const int*>(q + 4 * j), units, 1);
            Out* o = out + (8 * g + j) * K + s * L.super + 32 * r;
            // (d sc) q - m, in the order the file's dequantization computes it
#if defined(__AVX512F__)
            for (int h = 0; h < 2; ++h) {  // 16 weights at a time: a prefill decodes every weight per chunk
              const __m128i bytes = h ? _mm256_extracti128_si256(row, 1) : _mm256_castsi256_si128(row);
              const __m512i wide = T == Q8_0 ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
              store16(o + 16 * h, _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ws[h][j]), _mm512_cvtepi32_ps(wide)),
                                                _mm512_set1_ps(wm[h][j])));
            }
#else
            for (int part = 0; part < 4; ++part) {  // 8 weights at a time
              const __m128i bytes = _mm_cvtsi32_si128(_mm256_extract_epi32(row, 2 * part));
              const __m128i both = _mm_insert_epi32(bytes, _mm256_extract_epi32(row, 2 * part + 1), 1);
              const __m256i wide = T == Q8_0 ? _mm256_cvtepi8_epi32(both) : _mm256_cvtepu8_epi32(both);
              const int h = part / 2;
              store8(o + 8 * part, _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(ws[h][j]), _mm256_cvtepi32_ps(wide)),
                                                 _mm256_set1_ps(wm[h][j])));
            }
#endif
          }
        }
      }
    }
  });
}

// ---- the ops ------------------------------------------------------------------------------

at::Tensor repack(const at::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.stride(1) == 1,
              "weight must be a CPU uint8 matrix of blocks with contiguous rows");
  const int64_t G = group_bytes(qtype, K), N = w.size(0);
  TORCH_CHECK(N % 8 == 0, "repacking takes rows in groups of 8; this matrix has ", N);
  TORCH_CHECK(w.size(1) == K / layout(qtype).super * block_bytes(qtype), "weight rows hold ", w.size(1),
              " bytes, not K=", K, " weights of type ", qtype);
  at::Tensor out = at::empty({N / 8, G}, at::dtype(at::kByte));
  if (N) DISPATCH_INT(qtype, repack_typed, w.data_ptr<uint8_t>(), w.stride(0), N, K, out.data_ptr<uint8_t>(), G);
  return out;
}

at::Tensor dequantize_packed(const at::Tensor& p, int64_t qtype, int64_t K, bool bf16,
                             const c10::optional<at::Tensor>& into) {
  check_packed(p, qtype, K);
  const int64_t N = 8 * p.size(0);
  const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
  // `into`: a caller's buffer of at least N * K elements, reused between calls (a fresh one of
  // megabytes costs its page faults at every prefill)
  TORCH_CHECK(!into || (into->scalar_type() == dtype && into->is_contiguous() && into->numel() >= N * K),
              "into must be a contiguous buffer of ", N * K, " elements of the output type");
  at::Tensor out = into ? into->view(-1).narrow(0, 0, N * K).view({N, K}) : at::empty({N, K}, at::dtype(dtype));
  if (N == 0) return out;
  if (bf16) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    DISPATCH_INT(qtype, dequantize_typed, p.data_ptr<uint8_t>(), p.size(1), N, K, o);
  } else {
    DISPATCH_INT(qtype, dequantize_typed, p.data_ptr<uint8_t>(), p.size(1), N, K, out.data_ptr<float>());
  }
  return out;
}

at::Tensor matmul_int8(const at::Tensor& x, const at::Tensor& p, int64_t qtype, int64_t K) {
  check_packed(p, qtype, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  const int64_t M = x.size(0), N = 8 * p.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  matmul_packed_together(prepare(x, tiles_fit(M, {N})), {product_of(p, qtype, y.data_ptr<float>())});
  return y;
}

bool tiles() { return tiles_fit(32, {32}); }  // whether many rows take the bf16 tiles in this build, here

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWEN2_NS, m) {
  m.def("repack(Tensor w, int qtype, int k) -> Tensor", &repack);
  m.def("dequantize_packed(Tensor packed, int qtype, int k, bool bf16=False, Tensor? into=None) -> Tensor", &dequantize_packed);
  m.def("matmul_int8(Tensor x, Tensor packed, int qtype, int k) -> Tensor", &matmul_int8);
  m.def("tiles() -> bool", &tiles);
  m.def("matmul_stacked(Tensor x, Tensor[] packed, int[] qtypes, int k) -> Tensor", &matmul_stacked);
}
