"""Linear layers and the embedding computed directly on GGUF's quantized blocks.

A GGUF file stores each matrix as rows of blocks (Q5_0, Q8_0, Q4_K, Q6_K, ...). `BlockLinear`
multiplies with our compiled kernels (qwen2.quant.kernels) in one of two activation formats:

- "int8" (the default): the blocks are repacked once, at load, into groups of 8 rows whose
  integers VNNI multiplies 8 rows at a time, and activations are rounded per run of 32 to int8
  as llama.cpp does (bench/RESULTS.md has the fidelity); every byte of the file's weights is kept.
- "float32": the file's rows as they are, memory-mapped, decoded to float32 in the kernel: the
  result equals dequantize-then-matmul, so the model computes with exactly the file's weights.

Many rows at once (a prefill): on CPUs with AMX the int8 layers' kernels take 16 rows or more on
bf16 tiles, decoding the blocks as they multiply; elsewhere above the kernels' row limits a tile of
weight rows at a time is dequantized into a GEMM.

`attach_blocks(model, blocks)` swaps the named weights' modules of a built model for these
layers (from outside the model, as quant.py does); `make_blocks(w, qtype)` encodes a float
matrix (an HF checkpoint asked to run quantized) as Q8_0 or Q4_K blocks with gguf-py's and our
GGUF writer's encoders. On CUDA a GGUF's blocks run through our Triton kernels instead (triton_blocks.py).
"""

from __future__ import annotations

import functools
import sys
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2.quant.kernels import BLOCKS, TYPE_NAMES, cpu_flags, gguf_ops
from qwen2.weights.gguf import Blocks

# Rows (batch x tokens) up to which the block kernels beat dequantize + GEMM (bench/quant_kernels.py,
# Q5_0 4864x896, one thread: float32 activations 16 rows 3.2 ms vs 4.0 ms; 32 rows 6.2 ms vs 5.2 ms).
BLOCK_KERNEL_MAX_ROWS = 16
# Without AMX, rows up to which the int8 kernel beats dequantize + bf16 GEMM (AVX512-BF16 EPYC, default model).
# With AMX the kernels take every row count: from 16 rows they decode the blocks straight into bf16 tiles.
INT8_KERNEL_MAX_ROWS = 32
TILE_MIN_ROWS = 16  # int8_matmul.h's: from this many rows AMX multiplies on bf16 tiles
# Many rows: a matrix up to this many weights is dequantized whole for one GEMM (bf16 tiles of ~1M weights,
# with their results concatenated, took 1.6x as long on the default model's gate/up); larger ones (an
# output head) go in tiles of ~1M weights, so a prefill never holds a float copy of the vocabulary.
_WHOLE_WEIGHTS = 1 << 24
_TILE_WEIGHTS = 1 << 20
Q8_0, Q4_K = 8, 12
ACTIVATIONS = ("int8", "float32")
# Types the int8 kernel takes -> (weights per record, header bytes, bytes per run of 32), gguf_int8.cpp's layout
PACKED = {2: (32, 16, 128), 6: (32, 16, 160), 8: (32, 16, 256), 12: (256, 160, 128), 13: (256, 160, 160),
          14: (256, 144, 192)}


@functools.lru_cache(maxsize=1)
def compiled_ops():  # noqa: ANN201 (a torch op namespace)
    """The compiled kernels of this CPU's widest ISA (qwen2.quant.kernels), or an error saying they are missing."""
    ops = gguf_ops()
    if ops is None:
        raise RuntimeError("GGUF block layers need the compiled kernels (qwen2.quant.kernels.gguf_ops)")
    return ops


def kernels_available() -> bool:
    """Whether this machine can run the block layers (the kernels built, or build now)."""
    return gguf_ops() is not None


def bf16_gemm_is_fast() -> bool:
    """Whether torch's bfloat16 GEMMs run on bf16 hardware here (AMX tiles or AVX512-BF16, through
    oneDNN): then many-row products of int8-activation layers take bf16 tiles, at 2-5x the float32 rate."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def many_rows_on_tiles() -> bool:
    """Whether the kernels multiply many rows themselves here, on AMX bf16 tiles that decode the repacked
    blocks as they go (float32 out): faster than dequantize + GEMM at every row count (bench/RESULTS.md)."""
    return bool(compiled_ops().tiles())


def dequantize(blocks: Tensor, qtype: int, columns: int) -> Tensor:
    """Rows of blocks (uint8 [rows, bytes]) -> float32 [rows, columns]."""
    return compiled_ops().dequantize(blocks, qtype, columns)


def packable(qtype: int, rows: int, columns: int) -> bool:
    """Whether the int8 kernel takes this matrix: its type, and rows in whole groups of 8."""
    return qtype in PACKED and rows % 8 == 0 and columns % PACKED[qtype][0] == 0


def packed_shape(qtype: int, rows: int, columns: int) -> tuple[int, int]:
    """The repacked matrix's shape: one row of bytes per group of 8 weight rows."""
    per_record, header, run = PACKED[qtype]
    return rows // 8, columns // per_record * (header + per_record // 32 * run)


_scratch_buffers = threading.local()


def scratch_buffer(numel: int, dtype: torch.dtype) -> Tensor:
    """This thread's buffer of at least `numel` elements: the whole matrices a prefill dequantizes,
    one after another, reuse it instead of paying a fresh allocation's page faults each time."""
    buffer = getattr(_scratch_buffers, str(dtype), None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_scratch_buffers, str(dtype), buffer)
    return buffer


class BlockLinear(nn.Module):
    """y = x @ W.T + bias with W held as GGUF blocks.

    `blocks`: the file's rows (uint8 [out, bytes per row]); with activations="int8" they are
    repacked here (`packed=True`: they already are, e.g. read back from the quantized cache).
    A matrix the int8 kernel does not take (F16, rows not a multiple of 8) keeps float32."""

    def __init__(self, blocks: Tensor, qtype: int, in_features: int, bias: Tensor | None = None,
                 activations: str = "float32", packed: bool = False):
        super().__init__()
        n_block, block_bytes = BLOCKS[qtype]
        out_features = blocks.shape[0] * 8 if packed else blocks.shape[0]
        expected = packed_shape(qtype, out_features, in_features)[1] if packed else in_features // n_block * block_bytes
        if in_features % n_block or blocks.shape[1] != expected:
            raise ValueError(f"{blocks.shape[1]} bytes per row do not hold {in_features} {TYPE_NAMES[qtype]} weights")
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {activations!r}")
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.activations = activations if packable(qtype, out_features, in_features) else "float32"
        if self.activations == "int8":
            self.register_buffer("packed", blocks if packed else compiled_ops().repack(blocks, qtype, in_features))
        else:
            self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.int8_max_rows = INT8_KERNEL_MAX_ROWS  # the output head's is unbounded (attach_blocks)

    def weight_tile(self, start: int, stop: int, bf16: bool = False, scratch: bool = False) -> Tensor:
        """Rows [start, stop) of the weight, float32 (exact) or bfloat16; packed: start and stop multiples of 8.
        `scratch` (repacked matrices): written into this thread's reused buffer, valid until its next scratch tile."""
        if self.activations == "int8":
            groups = self.packed[start // 8 : stop // 8]
            dtype = torch.bfloat16 if bf16 else torch.float32
            into = scratch_buffer((stop - start) * self.in_features, dtype) if scratch else None
            return compiled_ops().dequantize_packed(groups, self.qtype, self.in_features, bf16, into)
        tile = dequantize(self.blocks[start:stop], self.qtype, self.in_features)
        return tile.bfloat16() if bf16 else tile

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        rows = x.shape[0]
        if self.activations == "int8" and (rows <= self.int8_max_rows or many_rows_on_tiles()):
            y = compiled_ops().matmul_int8(x.float(), self.packed, self.qtype, self.in_features).to(dtype)
        elif self.activations == "float32" and rows <= BLOCK_KERNEL_MAX_ROWS:
            y = compiled_ops().matmul(x.float(), self.blocks, self.qtype, self.in_features).to(dtype)
        else:  # many rows: GEMMs on dequantized weights, bf16 where the hardware has it and activations are not exact
            bf16 = dtype == torch.bfloat16 or (self.activations == "int8" and bf16_gemm_is_fast())
            xt = x.to(torch.bfloat16 if bf16 else dtype)
            if self.out_features * self.in_features <= _WHOLE_WEIGHTS:
                y = F.linear(xt, self.weight_tile(0, self.out_features, bf16, scratch=True)).to(dtype)
            else:
                step = max(16, _TILE_WEIGHTS // self.in_features // 8 * 8)
                y = torch.cat([F.linear(xt, self.weight_tile(i, min(i + step, self.out_features), bf16))
                               for i in range(0, self.out_features, step)], dim=-1).to(dtype)
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {TYPE_NAMES[self.qtype]}, "
                f"bias={self.bias is not None}, {self.activations} activations")


class BlockEmbedding(nn.Module):
    """Token embedding rows decoded on lookup from GGUF blocks (no float copy of the table).

    `packed=True`: the table is a repacked one (a tied output head's, shared): a lookup decodes
    each token's group of 8 rows and keeps its own."""

    def __init__(self, blocks: Tensor, qtype: int, dim: int, dtype: torch.dtype = torch.float32, packed: bool = False):
        super().__init__()
        self.qtype, self.embedding_dim, self.dtype = qtype, dim, dtype
        self.register_buffer("packed" if packed else "blocks", blocks)
        self.rows = blocks.shape[0] * 8 if packed else blocks.shape[0]

    @property
    def weight(self) -> Tensor:
        """A stand-in holding no values (a zero-stride view): the dtype, device and shape that code
        asking the embedding what the model computes in expects. Never compute with it."""
        table = self.packed if hasattr(self, "packed") else self.blocks
        return torch.zeros((), dtype=self.dtype, device=table.device).expand(self.rows, self.embedding_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        flat = tokens.reshape(-1)
        if hasattr(self, "packed"):
            groups = self.packed.index_select(0, flat // 8)
            groups = compiled_ops().dequantize_packed(groups, self.qtype, self.embedding_dim)
            rows = groups[torch.arange(flat.shape[0]) * 8 + flat % 8]
        else:
            rows = dequantize(self.blocks.index_select(0, flat), self.qtype, self.embedding_dim)
        return rows.to(self.dtype).view(*tokens.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.rows} x {self.embedding_dim}, {TYPE_NAMES[self.qtype]}"


def attach_blocks(model: nn.Module, blocks: dict[str, Blocks], dtype: torch.dtype, activations: str = "float32",
                  packed: frozenset[str] = frozenset(), mapped: bool = False) -> None:
    """Replace the modules owning each named weight ("...q_proj.weight") with block layers, in place.

    A tied lm_head shares the embedding's blocks (and repacks them for int8 activations). Biases
    already loaded on the Linear carry over. `packed`: names whose data is already repacked.
    `mapped`: the blocks are a GGUF file's mapping, whose pages go back once repacked (a model
    would otherwise hold the file and its repacked copy both).
    """
    from qwen2.memory import drop_mapped_pages

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    embed = blocks.get("model.embed_tokens.weight")
    if tied and embed is not None and "lm_head.weight" not in blocks:
        blocks = {**blocks, "lm_head.weight": embed}
    share = tied and embed is not None
    # the head first: a tied embedding then looks its rows up in the head's repacked table
    for name in sorted(blocks, key=lambda n: n != "lm_head.weight"):
        b = blocks[name]
        owner_name, _, leaf = name.rpartition(".")
        parent_name, _, child = owner_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if leaf != "weight" or (name not in packed and
                                b.shape[1] != b.data.shape[1] // BLOCKS[b.qtype][1] * BLOCKS[b.qtype][0]):
            raise ValueError(f"{name}: {b.data.shape[1]} bytes per row do not hold {b.shape[1]} "
                             f"{TYPE_NAMES.get(b.qtype, b.qtype)} weights")
        head = getattr(model, "lm_head", None)
        if isinstance(old, nn.Embedding) and share and getattr(head, "activations", None) == "int8":
            setattr(parent, child, BlockEmbedding(head.packed, head.qtype, b.shape[1], dtype, packed=True))
        elif isinstance(old, nn.Embedding):
            setattr(parent, child, BlockEmbedding(b.data, b.qtype, b.shape[1], dtype))
        else:
            layer = BlockLinear(b.data, b.qtype, b.shape[1], getattr(old, "bias", None), activations, name in packed)
            if name == "lm_head.weight":
                # the logits are the model's output (scored by evals, sampled, returned as logprobs): a bf16
                # GEMM would round them to 0.125 at 18 and tie near-equal tokens; the kernels' stay float32
                layer.int8_max_rows = sys.maxsize
            setattr(parent, child, layer)
            if mapped and layer.activations == "int8" and name not in packed:
                drop_mapped_pages(b.data)


def make_blocks(w: Tensor, qtype: int) -> Blocks:
    """A float matrix [out, in] encoded as Q8_0 or Q4_K blocks (Q8_0 where Q4_K's 256 don't divide in)."""
    from gguf import GGMLQuantizationType

    from qwen2.weights.gguf_export import encode

    if qtype == Q4_K and w.shape[1] % 256:
        qtype = Q8_0
    if qtype == Q8_0:
        return Blocks(Q8_0, encode_q8_0(w), tuple(w.shape))
    raw = encode("weight", w, GGMLQuantizationType(qtype))
    return Blocks(qtype, torch.from_numpy(np.ascontiguousarray(raw).reshape(w.shape[0], -1)), tuple(w.shape))


@torch.no_grad()
def encode_q8_0(w: Tensor, rows: int = 4096) -> Tensor:
    """Q8_0 blocks of a float matrix [out, in] as (out, in / 32 * 34) bytes, bit for bit what ggml
    (and the gguf package) writes: per 32 values d = max|x| / 127 as float16, then round(x / d)
    half away from zero as int8. In torch, a block of rows at a time: the gguf package's numpy loop
    takes seconds for a 0.5B model, which online DPO pays each step it quantizes its policy."""
    out = torch.empty(w.shape[0], w.shape[1] // 32 * 34, dtype=torch.uint8)
    for start in range(0, w.shape[0], rows):
        x = w[start: start + rows].detach().to("cpu", torch.float32).reshape(-1, w.shape[1] // 32, 32)
        d = x.abs().amax(-1, keepdim=True) / 127
        scaled = x * torch.where(d == 0, 0.0, 1 / d)
        a = scaled.abs()
        whole = a.floor()
        q = scaled.sign() * (whole + (2 * (a - whole)).floor())
        blocks = out[start: start + rows].view(-1, w.shape[1] // 32, 34)
        blocks[..., :2] = d.to(torch.float16).view(torch.uint8)
        blocks[..., 2:] = q.to(torch.int8).view(torch.uint8)
    return out


def _float_weights(model: nn.Module) -> list[str]:
    """The weights block layers take: every Linear's and the embedding's, not the MoE routers'."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and not name.endswith(
                ("mlp.gate", "shared_expert_gate"))):
            names.append(f"{name}.weight")
    return names


@torch.no_grad()
def blocks_from_float(model: nn.Module, qtype: int, empty: bool = False, activations: str = "float32") -> nn.Module:
    """Encode every eligible float matrix as blocks (Q4_K falls back to Q8_0 row by row shape), in place.

    empty=True makes the layers with uninitialised bytes (repacked ones already in their repacked
    shape), for a saved state dict to be loaded into.
    """
    blocks, packed = {}, set()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name in _float_weights(model):
        if name == "lm_head.weight" and tied and not (empty and activations == "int8"):
            continue  # attach_blocks shares the embedding's (and repacks them for int8)
        w = model.get_parameter(name) if name != "lm_head.weight" or not tied else model.model.embed_tokens.weight
        t = Q8_0 if qtype == Q4_K and w.shape[1] % 256 else qtype
        if empty:
            n_block, block_bytes = BLOCKS[t]
            shape = (w.shape[0], w.shape[1] // n_block * block_bytes)
            if activations == "int8" and not name.endswith("embed_tokens.weight") and packable(t, *w.shape):
                shape = packed_shape(t, *w.shape)
                packed.add(name)
            blocks[name] = Blocks(t, torch.empty(shape, dtype=torch.uint8, device="cpu"), tuple(w.shape))
        else:
            blocks[name] = make_blocks(w, qtype)
    attach_blocks(model, blocks, next(p.dtype for p in model.parameters() if p.is_floating_point()), activations,
                  frozenset(packed))
    return model
