"""A decode step's layers as one compiled call (qwen2/quant/kernels/decode_layer.cpp).

A batch-1 decode step of the 0.5B model runs ~2,200 small torch ops around its 169 matrix
products, and at 2-5 us each they cost as much as the products (bench/RESULTS.md). Where a model
allows it, `Transformer.body` hands a decode step's layers to `FusedDecode` instead: one call runs
them all, each layer's RMSNorm, q/k/v, rotary, the paged KV write, attention, o, the residual,
RMSNorm, gate/up, SiLU and down. It takes what that kernel covers and nothing else: dense layers,
full attention (no sliding window, no DCA), every matrix int8-repacked (qwen2.quant.blocks),
float32, a paged cache.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen2.model import Context, PagedKVCache, Transformer
from qwen2.quant.blocks import BlockLinear, compiled_ops

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_NONE = torch.empty(0)  # a layer's missing bias
HEAD_SIZES = (16, 32, 64, 128, 256)  # the attention's register-held heads (decode_layer.cpp: attend_for)


def _linears(block: nn.Module) -> list[nn.Module]:
    """The layer's seven matrices, in decode_layer's order."""
    return [getattr(block.self_attn, n) for n in PROJECTIONS] + [getattr(block.mlp, n) for n in MLP]


def fusable(model: Transformer) -> bool:
    """Whether every layer is one the fused call computes exactly as Block.forward does."""
    config = model.config
    if model.dca is not None or model.model.norm.weight.dtype != torch.float32 or config.head_dim not in HEAD_SIZES:
        return False
    for i, block in enumerate(model.model.layers):
        if config.layer_window(i) is not None or not all(hasattr(block.mlp, name) for name in MLP):
            return False
        if not all(isinstance(m, BlockLinear) and m.activations == "int8" for m in _linears(block)):
            return False
    return True


class FusedDecode:
    """Runs the layers of a one-token-per-row forward over a paged float32 cache (`applies` says when).

    The layers' weights are handed to the compiled stack once, here (rebuilding the lists at every step
    cost ~4% of a batch-1 token, and handing them over at every call ~4% more): the loader builds this
    last, and nothing replaces a layer's modules after it."""

    def __init__(self, model: Transformer):
        self.model = model
        config = model.config
        stack_class = getattr(torch.classes, compiled_ops().name).DecodeStack
        self.stack = stack_class(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        for block in model.model.layers:
            linears = _linears(block)
            self.stack.add_layer(block.input_layernorm.weight, block.post_attention_layernorm.weight,
                                 block.input_layernorm.eps, [m.packed for m in linears], [m.qtype for m in linears],
                                 [m.bias if m.bias is not None else _NONE for m in linears])

    @classmethod
    def for_model(cls, model: Transformer) -> FusedDecode | None:
        return cls(model) if fusable(model) else None

    def applies(self, x: torch.Tensor, cache: object) -> bool:
        """Whether a forward of `x` (B, T, H) over `cache` is a decode step this call computes."""
        return (x.shape[1] == 1 and isinstance(cache, PagedKVCache) and cache.k.dtype == torch.float32
                and x.device.type == "cpu" and self.model.dca is None
                and not (torch.is_grad_enabled() and x.requires_grad))

    def __call__(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, _, H = x.shape
        cache, (flat, tables) = ctx.cache, ctx.where
        h = self.stack.forward(x.reshape(B, H), ctx.cos[:, 0], ctx.sin[:, 0], cache.k, cache.v, flat, tables,
                               ctx.positions[:, 0], cache.block_size)
        return h.view(B, 1, H)
