"""An MoE layer's routed experts as one compiled call (qwen2/quant/kernels/moe_experts.cpp).

With int8-repacked experts (qwen2.quant.blocks), a decode step's routed experts as torch ops are a
sort, a gather, an int8 product per chosen expert and matrix (each rounding its input and opening a
parallel region of its own, for a matrix of only 608 x 896 on the upcycled default model), a
scatter and a weighted sum: more time around the products than in them. Where every expert of a
layer is int8 blocks, the loader gives its MoE a `FusedExperts`, which computes the same from the
router's choice in one call for as many rows as the int8 kernel takes; the router, the top-k and
the shared expert stay the model's own code, and more rows (a prefill) take the per-expert loop.
"""

from __future__ import annotations

import torch

from qwen2.model import MLP, MoE, Transformer
from qwen2.quant.blocks import INT8_KERNEL_MAX_ROWS, BlockLinear, compiled_ops

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def fusable(moe: MoE) -> bool:
    """Whether the layer holds all its experts (not a shard), each an MLP of int8 block layers."""
    if len(moe.experts) < moe.num_experts or not all(type(m) is MLP for m in moe.experts.values()):
        return False
    return all(isinstance(m, BlockLinear) and m.activations == "int8" and m.bias is None
               for e in moe.experts.values() for m in (getattr(e, n) for n in PROJECTIONS))


class FusedExperts:
    """The routed experts of one MoE layer for a few float32 rows (`applies` says when)."""

    def __init__(self, moe: MoE):
        # the list the call takes, made once: building it from 3 x experts modules costs more than the call
        linears = [getattr(moe.experts[str(e)], n) for e in range(moe.num_experts) for n in PROJECTIONS]
        self.weights = [m.packed for m in linears]
        self.qtypes = [m.qtype for m in linears]

    def applies(self, x: torch.Tensor) -> bool:
        """Whether the call computes the experts for `x` (N, H) as the per-expert loop does."""
        return (x.shape[0] <= INT8_KERNEL_MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad))

    def __call__(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return compiled_ops().moe_experts_int8(x.contiguous(), chosen, weights, self.weights, self.qtypes)


def fuse_experts(model: Transformer) -> int:
    """Give each MoE layer whose experts the call takes a FusedExperts; returns how many."""
    layers = [block.mlp for block in model.model.layers if isinstance(block.mlp, MoE) and fusable(block.mlp)]
    for moe in layers:
        moe.fused_experts = FusedExperts(moe)
    return len(layers)
