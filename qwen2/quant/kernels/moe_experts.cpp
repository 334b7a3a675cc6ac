// An MoE layer's routed experts for a few rows in one call, on int8-repacked weights:
//
//   y[b] = sum_j weights[b, j] * down_e(SiLU(gate_e(x_b)) * up_e(x_b)),  e = chosen[b, j]
//
// It exists for the time around the products: as torch ops (sort, gather, one int8 product per
// expert and matrix, each rounding its input and opening a parallel region, scatter, weighted sum)
// a decode step of top-8 experts of 608 x 896 spent more time around the products than in them.
// Here each row of x is rounded to int8 once and each (row, slot)'s SiLU(g) * u once, and one
// parallel region runs every (expert, group of 8 weight rows) of gate and up, one every group of
// down. Pairs that chose the same expert go through its weights together, 4 at a time. The result
// is the loop's to the bit, but where the loop's product of 16 or more rows of one expert took AMX
// bf16 tiles, which round the activations to bf16 instead of int8.

#include "int8_matmul.h"

#include <numeric>
#include <vector>

namespace {

struct Matrix {
  const uint8_t* data;
  int64_t group_bytes, qtype;
};

// One parallel region over every (segment, matrix, group of 8 rows): the pairs rows[starts[s] ..
// starts[s+1]) against matrices[count s + m], into out[P m + pair] at column 8 g.
void products(const std::vector<int64_t>& starts, const std::vector<Matrix>& matrices, int64_t count, int64_t K,
              int64_t groups, const Activations* rows, const std::vector<float*>& out) {
  const int64_t P = starts.back(), segments = starts.size() - 1, per_segment = count * groups;
  at::parallel_for(0, segments * per_segment, grain_groups(matrices[0].group_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = i / per_segment, m = i % per_segment / groups, g = i % groups;
      const Matrix& w = matrices[count * s + m];
      const int64_t first = starts[s];
      DISPATCH_INT(w.qtype, dot_rows, w.data + g * w.group_bytes, K, rows + first, out.data() + P * m + first,
                   starts[s + 1] - first, 8 * g);
    }
  });
}

// experts: gate, up and down of expert 0, then of expert 1, ... (repacked); qtypes: theirs, in that order
at::Tensor moe_experts_int8(const at::Tensor& x, const at::Tensor& chosen, const at::Tensor& weights,
                            at::TensorList experts, at::IntArrayRef qtypes) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous float32 [B, H]");
  TORCH_CHECK(chosen.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat && chosen.dim() == 2 &&
                  chosen.sizes() == weights.sizes() && chosen.size(0) == x.size(0),
              "chosen (int64) and weights (float32) must be [B, k]");
  TORCH_CHECK(experts.size() % 3 == 0 && qtypes.size() == experts.size(),
              "three matrices per expert (gate, up, down) and a qtype for each");
  const at::Tensor ids = chosen.contiguous(), w = weights.contiguous();
  const int64_t B = x.size(0), H = x.size(1), k = chosen.size(1), P = B * k, E = experts.size() / 3;
  if (P == 0) return at::zeros({B, H}, x.options());
  const int64_t* expert = ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(expert[p] >= 0 && expert[p] < E, "expert ", expert[p], " chosen of ", E);

  // the (row, slot) pairs by expert; a segment: the pairs of one expert
  std::vector<int64_t> order(P), starts;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return expert[a] < expert[b]; });
  const int64_t F = 8 * experts[3 * expert[order[0]]].size(0);
  std::vector<Matrix> gate_up, down;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t e = expert[order[i]];
    if (i && e == expert[order[i - 1]]) continue;
    starts.push_back(i);
    const int64_t widths[3] = {F, F, H}, inputs[3] = {H, H, F};
    for (int j = 0; j < 3; ++j) {
      const at::Tensor& t = experts[3 * e + j];
      check_packed(t, qtypes[3 * e + j], inputs[j]);
      TORCH_CHECK(8 * t.size(0) == widths[j], "expert ", e, "'s matrix ", j, " has ", 8 * t.size(0), " rows, not ",
                  widths[j]);
      (j < 2 ? gate_up : down).push_back({t.data_ptr<uint8_t>(), t.size(1), qtypes[3 * e + j]});
    }
  }
  starts.push_back(P);

  const Rows xq = prepare(x, false);
  at::Tensor gate = at::empty({P, F}, x.options()), up = at::empty({P, F}, x.options());
  at::Tensor out = at::empty({P, H}, x.options());
  std::vector<Activations> x_rows(P);
  std::vector<float*> to_gate_up(2 * P), to_out(P);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t p = order[i];
    x_rows[i] = xq.view().row(p / k, H / 32);
    to_gate_up[i] = gate.data_ptr<float>() + p * F, to_gate_up[P + i] = up.data_ptr<float>() + p * F;
    to_out[i] = out.data_ptr<float>() + p * H;
  }
  products(starts, gate_up, 2, H, F / 8, x_rows.data(), to_gate_up);
  // torch's own SiLU and product, so the int8 rounding that follows sees the loop's values to the bit
  const Rows hq = prepare(at::silu_(gate).mul_(up), false);
  std::vector<Activations> h_rows(P);
  for (int64_t i = 0; i < P; ++i) h_rows[i] = hq.view().row(order[i], F / 32);
  products(starts, down, 1, F, H / 8, h_rows.data(), to_out);

  // the k slots weighed and summed by the torch ops the loop's caller uses: the same float sums
  return at::mul(out.view({B, k, H}), w.unsqueeze(-1)).sum(1);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(QWEN2_NS, m) {
  m.def("moe_experts_int8(Tensor x, Tensor chosen, Tensor weights, Tensor[] experts, int[] qtypes) -> Tensor",
        &moe_experts_int8);
}
