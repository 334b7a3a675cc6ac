"""A prefill's layers as a few large bfloat16 products, for int8-repacked block models on bf16 hardware.

Many rows at once are compute-bound, and on CPUs with AMX or AVX512-BF16 bf16 products run 2-5x the
float32 rate. The model's own layers already multiply in bf16 there, but they pay for it around every
product: each matrix multiplied alone (q, k and v three times, gate and up twice), its input cast to
bf16 and its output back to float32, and SiLU-times-up on float32 copies. Here a layer multiplies
q/k/v as one product and gate/up as another, and computes SiLU-times-up in one compiled pass whose
bf16 output the down product reads. With AMX the products are our kernels' bf16 tiles, which decode
the repacked blocks as they multiply and give float32; elsewhere each matrix is decoded to bf16 into
one scratch matrix for torch's GEMM. The residual stream, the norms, rotary and the KV cache stay
float32, and so does attention's accuracy: torch's bf16 attention ran 2.5x faster at 512 rows but put
one early position of a Wikipedia window at KL 7.3 from float32 (bench/RESULTS.md), so with AMX it runs
on our tiles with each operand split into bf16 parts (attention_tiles.cpp), elsewhere in float32. The
exact mode (`--quant gguf-f32`) never comes here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.model import Context, Transformer
from qwen2.quant.blocks import (
    INT8_KERNEL_MAX_ROWS,
    TILE_MIN_ROWS,
    BlockLinear,
    bf16_gemm_is_fast,
    compiled_ops,
    many_rows_on_tiles,
    scratch_buffer,
)
from qwen2.quant.fused_decode import fusable


def bf16_product(x: torch.Tensor, linears: list[BlockLinear]) -> torch.Tensor:
    """x (bf16, ..., K) times the matrices of `linears` stacked along their outputs, no bias: our tiles'
    float32 result where the CPU has AMX; else one GEMM (bf16 result) on the matrices decoded to bf16
    into this thread's scratch buffer."""
    K = linears[0].in_features
    if many_rows_on_tiles():
        y = compiled_ops().matmul_stacked(x.reshape(-1, K), [m.packed for m in linears], [m.qtype for m in linears], K)
        return y.view(*x.shape[:-1], -1)
    rows = sum(m.out_features for m in linears)
    buffer = scratch_buffer(rows * K, torch.bfloat16)
    start = 0
    for m in linears:
        compiled_ops().dequantize_packed(m.packed, m.qtype, K, True, buffer[start * K:(start + m.out_features) * K])
        start += m.out_features
    return F.linear(x, buffer[:rows * K].view(rows, K))


def silu_gated(h: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    """SiLU(h Wgate) * (h Wup) in bf16, the down product's input: with AMX both products stay in our tiles
    (a 512-row prefill's float32 gate/up would be 20 MB); else one GEMM of both, then one compiled pass."""
    if many_rows_on_tiles():
        gate, up, K = mlp.gate_proj, mlp.up_proj, h.shape[-1]
        out = compiled_ops().gated_product(h.reshape(-1, K), gate.packed, up.packed, gate.qtype, up.qtype, K)
        return out.view(*h.shape[:-1], -1)
    return compiled_ops().silu_mul_bf16(bf16_product(h, [mlp.gate_proj, mlp.up_proj]))


def attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The layer's attention output (B, T, nh*hd) in bf16, o_proj's input: with AMX, on our tiles at near
    float32 accuracy (attention_tiles.cpp), where every key sits at its position (a cache, or a chunk from 0)
    and no window applies; else the model's own float32 attention."""
    B, T, _ = q.shape
    if (many_rows_on_tiles() and attn.window is None and attn.head_dim % 64 == 0 and T >= TILE_MIN_ROWS
            and (ctx.cache is not None or ctx.masks[None] is None)):
        q, k, v = attn.rotate_and_cache(q, k, v, ctx)
        y = compiled_ops().attention_tiles(q, k, v, ctx.positions, attn.head_dim ** -0.5)
        return y.view(B, T, -1).bfloat16()
    return attn.attend(q, k, v, ctx).bfloat16()


class FusedPrefill:
    """Runs the layers of a prompt chunk's forward (`applies` says which)."""

    def __init__(self, model: Transformer):
        self.model = model
        # from the rows where the products take bf16 tiles (AMX: 16; a shorter chunk's own layers stay int8) or
        # elsewhere beat the int8 kernel
        self.min_rows = TILE_MIN_ROWS if many_rows_on_tiles() else INT8_KERNEL_MAX_ROWS + 1

    @classmethod
    def for_model(cls, model: Transformer) -> FusedPrefill | None:
        if not (fusable(model) and bf16_gemm_is_fast()):
            return None
        unbiased = all(m.bias is None for b in model.model.layers
                       for m in (b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj))
        return cls(model) if unbiased else None

    def applies(self, x: torch.Tensor, cache: object) -> bool:
        """Whether a forward of `x` (B, T, H) is a many-row one this path computes (more rows than a
        decode batch: those take the fused decode or the model's own layers)."""
        B, T, _ = x.shape
        return (T > 1 and B * T >= self.min_rows and x.dtype == torch.float32 and x.device.type == "cpu"
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
        x = x + bf16_product(attention(attn, q, k, v, ctx), [attn.o_proj])
        norm = block.post_attention_layernorm
        h = F.rms_norm(x, x.shape[-1:], norm.weight, norm.eps).bfloat16()
        return x + bf16_product(silu_gated(h, mlp), [mlp.down_proj])
