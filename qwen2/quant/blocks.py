"""Linear layers and the embedding computed directly on GGUF's quantized blocks.

A GGUF file stores each matrix as rows of blocks (Q5_0, Q8_0, Q4_K, Q6_K, ...). `BlockLinear`
keeps those bytes as they are, memory-mapped from the file, and multiplies with our compiled
kernels (qwen2.quant.kernels): the result equals dequantize-then-matmul in float32, so a model run
this way computes with exactly the file's weights, at a fraction of the float model's memory
traffic. Many rows at once (a prefill) dequantize a tile of weight rows at a time into a GEMM
instead, which is faster above BLOCK_KERNEL_MAX_ROWS rows.

`attach_blocks(model, blocks)` swaps the named weights' modules of a built model for these
layers (from outside the model, as quant.py does); `make_blocks(w, qtype)` encodes a float
matrix (an HF checkpoint asked to run quantized) as Q8_0 or Q4_K blocks with gguf-py's and our
GGUF writer's encoders. Not covered: CUDA (the loader keeps GGUF's own blocks on CPU only).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2.quant.kernels import BLOCKS, TYPE_NAMES, gguf_ops
from qwen2.weights.gguf import Blocks

# Rows (batch x tokens) up to which the block kernel beats dequantize + GEMM (bench/quant_kernels.py,
# Q5_0 4864x896, one thread: 16 rows 3.2 ms vs 4.0 ms; 32 rows 6.2 ms vs 5.2 ms).
BLOCK_KERNEL_MAX_ROWS = 16
_TILE_WEIGHTS = 1 << 20  # dequantize ~1M weights at a time, so the float tile is still in cache for the GEMM
Q8_0, Q4_K = 8, 12


@functools.lru_cache(maxsize=1)
def _ops() -> tuple:
    ops = gguf_ops()
    if ops is None:
        raise RuntimeError("GGUF block layers need the compiled kernels (qwen2.quant.kernels.gguf_ops)")
    return ops.matmul, ops.dequantize


def kernels_available() -> bool:
    """Whether this machine can run the block layers (the kernels built, or build now)."""
    return gguf_ops() is not None


def dequantize(blocks: Tensor, qtype: int, columns: int) -> Tensor:
    """Rows of blocks (uint8 [rows, bytes]) -> float32 [rows, columns]."""
    return _ops()[1](blocks, qtype, columns)


class BlockLinear(nn.Module):
    """y = x @ W.T + bias with W held as GGUF blocks (`blocks`: uint8 [out, bytes per row])."""

    def __init__(self, blocks: Tensor, qtype: int, in_features: int, bias: Tensor | None = None):
        super().__init__()
        n_block, block_bytes = BLOCKS[qtype]
        if in_features % n_block or blocks.shape[1] != in_features // n_block * block_bytes:
            raise ValueError(f"{blocks.shape[1]} bytes per row do not hold {in_features} {TYPE_NAMES[qtype]} weights")
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if x.shape[0] <= BLOCK_KERNEL_MAX_ROWS:
            y = _ops()[0](x if dtype == torch.float32 else x.float(), self.blocks, self.qtype, self.in_features)
            y = y if dtype == torch.float32 else y.to(dtype)
        else:
            step = max(16, _TILE_WEIGHTS // self.in_features)
            y = torch.cat([F.linear(x, dequantize(self.blocks[i : i + step], self.qtype, self.in_features).to(dtype))
                           for i in range(0, self.out_features, step)], dim=-1)
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {TYPE_NAMES[self.qtype]}, bias={self.bias is not None}"


class BlockEmbedding(nn.Module):
    """Token embedding rows decoded on lookup from GGUF blocks (no float copy of the table)."""

    def __init__(self, blocks: Tensor, qtype: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qtype, self.embedding_dim, self.dtype = qtype, dim, dtype
        self.register_buffer("blocks", blocks)

    @property
    def weight(self) -> Tensor:
        """A stand-in holding no values (a zero-stride view): the dtype, device and shape that code
        asking the embedding what the model computes in expects. Never compute with it."""
        return torch.zeros((), dtype=self.dtype, device=self.blocks.device).expand(self.blocks.shape[0],
                                                                                   self.embedding_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.blocks.index_select(0, tokens.reshape(-1))
        return dequantize(rows, self.qtype, self.embedding_dim).to(self.dtype).view(*tokens.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.blocks.shape[0]} x {self.embedding_dim}, {TYPE_NAMES[self.qtype]}"


def attach_blocks(model: nn.Module, blocks: dict[str, Blocks], dtype: torch.dtype) -> None:
    """Replace the modules owning each named weight ("...q_proj.weight") with block layers, in place.

    A tied lm_head shares the embedding's blocks. Biases already loaded on the Linear carry over.
    """
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    embed = blocks.get("model.embed_tokens.weight")
    if tied and embed is not None and "lm_head.weight" not in blocks:
        blocks = {**blocks, "lm_head.weight": embed}
    for name, b in blocks.items():
        owner_name, _, leaf = name.rpartition(".")
        parent_name, _, child = owner_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if leaf != "weight" or b.shape[1] != b.data.shape[1] // BLOCKS[b.qtype][1] * BLOCKS[b.qtype][0]:
            raise ValueError(f"{name}: {b.data.shape[1]} bytes per row do not hold {b.shape[1]} "
                             f"{TYPE_NAMES.get(b.qtype, b.qtype)} weights")
        if isinstance(old, nn.Embedding):
            setattr(parent, child, BlockEmbedding(b.data, b.qtype, b.shape[1], dtype))
        else:
            setattr(parent, child, BlockLinear(b.data, b.qtype, b.shape[1], getattr(old, "bias", None)))


def make_blocks(w: Tensor, qtype: int) -> Blocks:
    """A float matrix [out, in] encoded as Q8_0 or Q4_K blocks (Q8_0 where Q4_K's 256 don't divide in)."""
    from gguf import GGMLQuantizationType

    from qwen2.weights.gguf_export import encode

    if qtype == Q4_K and w.shape[1] % 256:
        qtype = Q8_0
    raw = encode("weight", w, GGMLQuantizationType(qtype))
    return Blocks(qtype, torch.from_numpy(np.ascontiguousarray(raw).reshape(w.shape[0], -1)), tuple(w.shape))


def _float_weights(model: nn.Module) -> list[str]:
    """The weights block layers take: every Linear's and the embedding's, not the MoE routers'."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and not name.endswith(
                ("mlp.gate", "shared_expert_gate"))):
            names.append(f"{name}.weight")
    return names


@torch.no_grad()
def blocks_from_float(model: nn.Module, qtype: int, empty: bool = False) -> nn.Module:
    """Encode every eligible float matrix as blocks (Q4_K falls back to Q8_0 row by row shape), in place.

    empty=True makes the layers with uninitialised bytes, for a saved state dict to be loaded into.
    """
    blocks = {}
    for name in _float_weights(model):
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue  # attach_blocks shares the embedding's
        w = model.get_parameter(name)
        if empty:
            t = Q8_0 if qtype == Q4_K and w.shape[1] % 256 else qtype
            n_block, block_bytes = BLOCKS[t]
            data = torch.empty(w.shape[0], w.shape[1] // n_block * block_bytes, dtype=torch.uint8, device="cpu")
            blocks[name] = Blocks(t, data, tuple(w.shape))
        else:
            blocks[name] = make_blocks(w, qtype)
    attach_blocks(model, blocks, next(p.dtype for p in model.parameters() if p.is_floating_point()))
    return model
