"""A prefill's layers as a few large bfloat16 GEMMs, for int8-repacked block models on bf16 hardware.

Many rows at once are compute-bound, and on CPUs with AMX or AVX512-BF16 torch's bf16 GEMM runs
2-5x the float32 rate. The model's own layers already multiply in bf16 there (BlockLinear's tile
path), but they pay for it around every product: each matrix is decoded and multiplied alone (q, k
and v three times, gate and up twice), its input cast to bf16 and its output back to float32, and
SiLU-times-up runs on float32 copies. Here a layer decodes q/k/v into one bf16 matrix and gate/up
into another (one GEMM each), keeps the GEMMs' bf16 outputs where the next product reads them in
bf16 anyway, and computes SiLU-times-up in one compiled pass. The residual stream, the norms, rotary,
the KV cache and attention stay float32: bf16 attention ran 2.5x faster at 512 rows but put one early
position of a Wikipedia window at KL 7.3 from float32 (bench/RESULTS.md). The exact mode
(`--quant gguf-f32`) never comes here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.model import Context, Transformer
from qwen2.quant.blocks import INT8_KERNEL_MAX_ROWS, BlockLinear, bf16_gemm_is_fast, compiled_ops, scratch_buffer
from qwen2.quant.fused_decode import fusable


def bf16_product(x: torch.Tensor, linears: list[BlockLinear]) -> torch.Tensor:
    """x (bf16, ..., K) times the matrices of `linears` stacked along their outputs, in one GEMM: each
    decoded to bf16 into its slice of this thread's scratch buffer. bf16 result, no bias."""
    K = linears[0].in_features
    rows = sum(m.out_features for m in linears)
    buffer = scratch_buffer(rows * K, torch.bfloat16)
    start = 0
    for m in linears:
        compiled_ops().dequantize_packed(m.packed, m.qtype, K, True, buffer[start * K:(start + m.out_features) * K])
        start += m.out_features
    return F.linear(x, buffer[:rows * K].view(rows, K))


class FusedPrefill:
    """Runs the layers of a forward of more rows than the int8 kernel takes (`applies` says when)."""

    def __init__(self, model: Transformer):
        self.model = model

    @classmethod
    def for_model(cls, model: Transformer) -> FusedPrefill | None:
        if not (fusable(model) and bf16_gemm_is_fast()):
            return None
        unbiased = all(b.self_attn.o_proj.bias is None and b.mlp.down_proj.bias is None for b in model.model.layers)
        return cls(model) if unbiased else None

    def applies(self, x: torch.Tensor, cache: object) -> bool:
        """Whether a forward of `x` (B, T, H) is a many-row one this path computes."""
        B, T, _ = x.shape
        return (T > 1 and B * T > INT8_KERNEL_MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and self.model.dca is None and not (torch.is_grad_enabled() and x.requires_grad))

    def __call__(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        for block in self.model.model.layers:
            x = self.layer(block, x, ctx)
        return x

    @staticmethod
    def layer(block: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        attn, mlp = block.self_attn, block.mlp
        norm = block.input_layernorm
        h = F.rms_norm(x, x.shape[-1:], norm.weight, norm.eps).bfloat16()
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        q, k, v = bf16_product(h, projections).float().split([m.out_features for m in projections], dim=-1)
        for part, m in zip((q, k, v), projections):
            if m.bias is not None:
                part += m.bias
        y = attn.attend(q, k, v, ctx).bfloat16()
        x = x + bf16_product(y, [attn.o_proj])
        norm = block.post_attention_layernorm
        h = F.rms_norm(x, x.shape[-1:], norm.weight, norm.eps).bfloat16()
        gate_up = bf16_product(h, [mlp.gate_proj, mlp.up_proj])
        return x + bf16_product(compiled_ops().silu_mul_bf16(gate_up), [mlp.down_proj])
