"""A GGUF file's own blocks on CUDA through Triton kernels: the file's bytes go to the device as
they are (uint8 rows, one a weight row) and each tile of weights is decoded from them inside the
product, so a Q4_K_M model takes its file's size on the GPU and no float copy of a matrix exists.

Every type splits a row into groups of weights that share their scale: 32 (Q4_0, Q5_0, Q8_0, and
the sub-blocks of Q4_K and Q5_K) or 16 (Q6_K). `_decode` turns (row, group, place in the group)
into the weight, reading the group's scale bytes and the weight's quant bits where ggml's layout
puts them (ggml-common.h; reference/qwen2.md 8.2):
- Q8_0: f16 d, 32 int8 q; w = d q
- Q4_0: f16 d, 16 bytes of nibbles (weight i in the low nibble of byte i, i + 16 in the high); w = d (q - 8)
- Q5_0: f16 d, 32 high bits, Q4_0's nibbles; w = d (q - 16), q 5 bits
- Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks, 128 bytes of nibbles
  (sub-blocks 2j and 2j + 1 in the low and high nibbles of bytes 32j..32j + 31); w = d sc q - dmin m
- Q5_K: Q4_K with a fifth bit: 32 bytes whose bit j is sub-block j's
- Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16 weights), f16 d

Two kernels, as for our int4 (triton_int4.py): one activation row (decode) sums decoded tiles
times x along K in float32; more rows multiply decoded tiles on the tensor cores (tl.dot) in the
activations' dtype. Block sizes are tuned per shape at first use on the GPU; without CUDA the
kernels run in Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) at fixed ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType
from torch import Tensor, nn

from qwen2.quant import CUDA_BLOCK_TYPES
from qwen2.quant.blocks import BlockEmbedding
from qwen2.quant.kernels import BLOCKS, TYPE_NAMES
from qwen2.quant.triton_products import Kernel, product
from qwen2.weights.gguf import Blocks

Q6_K = 14


def group_size(qtype: int) -> int:
    """Weights that share one scale in `qtype`'s blocks."""
    return 16 if qtype == Q6_K else 32


@triton.jit
def _half(p):
    """The float16 at byte pointer p (little-endian), as float32."""
    bits = tl.load(p).to(tl.uint16) | (tl.load(p + 1).to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _unsigned(q, OFFSET: tl.constexpr):
    """q - OFFSET as float32 for an integer 0 <= q < 2^23, with no int-to-float conversion (a
    quarter of the FMA's rate on NVIDIA GPUs): q becomes the low mantissa bits of 2^23."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _scale_min(p, j):
    """Sub-block j's 6-bit scale and min from the 12 bytes at p (Q4_K, Q5_K): the first four
    sub-blocks' are bytes j and j + 4; the last four's low bits are byte j + 4's nibbles and
    their high bits the top two of bytes j - 4 and j."""
    a = tl.load(p + j)
    b = tl.load(p + j + 4)
    c = tl.load(p + tl.where(j >= 4, j - 4, j))
    first = j < 4
    scale = tl.where(first, a & 63, (b & 15) | ((c >> 6) << 4))
    least = tl.where(first, b & 63, (b >> 4) | ((a >> 6) << 4))
    return _unsigned(scale, 0), _unsigned(least, 0)


@triton.jit
def _decode(row, g, i, QTYPE: tl.constexpr):
    """The float32 weights at place i of group g of the rows whose first byte `row` points to
    (broadcastable tensors: a per-group value is loaded once per group where g varies alone)."""
    if QTYPE == 8:  # Q8_0: an int8 q is its byte with the top bit flipped, less 128
        block = row + g * 34
        w = _half(block) * _unsigned(tl.load(block + 2 + i) ^ 0x80, 128)
    elif QTYPE == 2:  # Q4_0
        block = row + g * 18
        byte = tl.load(block + 2 + i % 16)
        w = _half(block) * _unsigned(tl.where(i < 16, byte & 15, byte >> 4), 8)
    elif QTYPE == 6:  # Q5_0
        block = row + g * 22
        high = (tl.load(block + 2 + i // 8) >> (i % 8)) & 1
        byte = tl.load(block + 6 + i % 16)
        w = _half(block) * _unsigned(tl.where(i < 16, byte & 15, byte >> 4) | (high << 4), 16)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K: 8 sub-blocks of 32 a block of 256
        j = g % 8
        block = row + g // 8 * (144 if QTYPE == 12 else 176)
        scale, least = _scale_min(block + 4, j)
        quants = 16 if QTYPE == 12 else 48
        byte = tl.load(block + quants + 32 * (j // 2) + i)
        q = tl.where(j % 2 == 0, byte & 15, byte >> 4)
        if QTYPE == 13:
            q |= ((tl.load(block + 16 + i) >> j) & 1) << 4
        w = _half(block) * scale * _unsigned(q, 0) - _half(block + 2) * least
    else:  # Q6_K: 16 groups of 16 a block of 256; group s lies in half s // 8, quarter (s % 8) // 2
        s = g % 16
        block = row + g // 16 * 210
        half = s // 8
        quarter = (s % 8) // 2
        at = 16 * (s % 2) + i  # place in the quarter's run of 32
        low = tl.load(block + 64 * half + 32 * (quarter % 2) + at)
        low = tl.where(quarter < 2, low & 15, low >> 4)
        high = (tl.load(block + 128 + 32 * half + at) >> (2 * quarter)) & 3
        scale = _unsigned(tl.load(block + 192 + s) ^ 0x80, 128)  # int8
        w = _half(block + 208) * scale * _unsigned(low | (high << 4), 32)
    return w


@triton.jit
def _blocks_gemv(x_ptr, w_ptr, y_ptr, N, K, ROW_BYTES, QTYPE: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, SPAN: tl.constexpr):
    GROUPS: tl.constexpr = SPAN // GROUP  # a step along K: SPAN weights of each row
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows and groups past the matrix read its last ones (no masks in the decoding) and are not kept
    row = w_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None, None] * ROW_BYTES
    at = tl.arange(0, GROUP)[None, None, :]
    n_groups = K // GROUP
    # each thread sums its own products along K; the one sum across threads comes at the end
    acc = tl.zeros([BLOCK_N, GROUPS, GROUP], dtype=tl.float32)
    for g0 in range(0, n_groups, GROUPS):
        g = g0 + tl.arange(0, GROUPS)[None, :, None]
        x = tl.load(x_ptr + g * GROUP + at, mask=g < n_groups, other=0.0).to(tl.float32)
        acc += _decode(row, tl.minimum(g, n_groups - 1), at, QTYPE) * x
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _blocks_matmul(x_ptr, w_ptr, y_ptr, M, N, K, ROW_BYTES, M_BUCKET, QTYPE: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    # M_BUCKET is not read: it keys the autotuner's choice by the rows' order of magnitude. DOT: the
    # tiles' dtype in the product (the activations'; float32 is multiplied exactly, not as tf32)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * ROW_BYTES
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
        k_in = tl.minimum(kk, K - 1)[None, :]
        w = _decode(row, k_in // GROUP, k_in % GROUP, QTYPE)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(a.to(DOT), tl.trans(w.to(DOT)), input_precision="ieee")
    out = y_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _blocks_rows(w_ptr, y_ptr, K, ROW_BYTES, QTYPE: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)[:, None]
    at = tl.arange(0, GROUP)[None, :]
    n_groups = K // GROUP
    row = w_ptr + tl.program_id(0).to(tl.int64) * ROW_BYTES
    w = _decode(row, tl.minimum(g, n_groups - 1), at, QTYPE)
    out = y_ptr + tl.program_id(0).to(tl.int64) * K + g * GROUP + at
    tl.store(out, w.to(y_ptr.dtype.element_ty), mask=g < n_groups)


# (BLOCK_N, SPAN, warps): a program's rows and the weights of each it decodes a step along K. A
# thread's share of a step (BLOCK_N x SPAN / threads) is best at 16-32 weights: the loop's cost in
# the sm_90 SASS falls from ~19 instructions a weight at 8 (Q4_K) to ~13 at 32
GEMV_CONFIGS = [(8, 256, 4), (16, 128, 4), (16, 256, 4), (32, 256, 4), (16, 512, 8), (32, 256, 8)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
MATMUL_CONFIGS = [(16, 32, 128, 4, 2), (16, 64, 64, 4, 2), (32, 64, 64, 4, 2), (64, 64, 64, 4, 3),
                  (64, 128, 64, 4, 3), (128, 128, 32, 8, 3)]
GEMV = Kernel(_blocks_gemv, [triton.Config(dict(BLOCK_N=n, SPAN=k), num_warps=w) for n, k, w in GEMV_CONFIGS],
              ["N", "K", "QTYPE"], dict(BLOCK_N=64, SPAN=256))
TILES = Kernel(_blocks_matmul, [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                                for m, n, k, w, s in MATMUL_CONFIGS], ["N", "K", "M_BUCKET", "QTYPE"],
               dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128))
ROWS_GROUPS = 8  # groups a program of the row decoder writes


def _check(blocks: Tensor, qtype: int, columns: int) -> None:
    if qtype not in CUDA_BLOCK_TYPES:
        names = ", ".join(TYPE_NAMES[t] for t in CUDA_BLOCK_TYPES)
        name = {t.value: t.name for t in GGMLQuantizationType}.get(qtype, f"type {qtype}")
        raise ValueError(f"no Triton kernel for {name} blocks; these types have one: {names}")
    per_block, block_bytes = BLOCKS[qtype]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.stride(1) != 1 or columns % per_block \
            or blocks.shape[1] != columns // per_block * block_bytes:
        raise ValueError(f"expected uint8 rows of {columns // per_block * block_bytes} bytes holding {columns} "
                         f"{TYPE_NAMES[qtype]} weights, got {blocks.dtype} {tuple(blocks.shape)}")


def blocks_matmul(x: Tensor, blocks: Tensor, qtype: int, in_features: int,
                  config: dict[str, int] | None = None) -> Tensor:
    """x (M, K) @ W.T -> (M, N) in x's dtype, W held as the GGUF blocks `blocks` (uint8 (N, bytes
    a row), rows one stride apart). `config` fixes the block sizes (tests); on CUDA they are
    otherwise tuned per shape."""
    _check(blocks, qtype, in_features)
    return _product(x, blocks, qtype, config)


def _product(x: Tensor, blocks: Tensor, qtype: int, config: dict[str, int] | None = None) -> Tensor:
    return product(x, (blocks,), blocks.shape[0], (blocks.stride(0),), GEMV, TILES, config, QTYPE=qtype,
                   GROUP=group_size(qtype))


def dequantize_rows(blocks: Tensor, qtype: int, columns: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Every row of `blocks` (uint8 (R, bytes a row)) decoded: (R, columns) in `dtype`."""
    _check(blocks, qtype, columns)
    y = torch.empty(blocks.shape[0], columns, dtype=dtype, device=blocks.device)
    if blocks.shape[0]:
        groups = columns // group_size(qtype)
        _blocks_rows[(blocks.shape[0], triton.cdiv(groups, ROWS_GROUPS))](
            blocks, y, columns, blocks.stride(0), QTYPE=qtype, GROUP=group_size(qtype), GROUPS=ROWS_GROUPS)
    return y


class TritonBlockLinear(nn.Module):
    """y = x @ W.T + bias with W held as GGUF blocks on the device, multiplied by our Triton kernels."""

    def __init__(self, blocks: Tensor, qtype: int, in_features: int, bias: Tensor | None = None):
        super().__init__()
        _check(blocks, qtype, in_features)
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        # the blocks were checked once, at construction, not at every step
        y = _product(x.reshape(-1, self.in_features), self.blocks, self.qtype)
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def stack(cls, layers: list[TritonBlockLinear]) -> TritonBlockLinear | None:
        """One layer whose outputs are `layers`' one after another (q/k/v, gate/up: one product
        instead of several), or None where their types or inputs differ. The layers keep working on
        their own: their blocks become row views of the stack's, so no weight is held twice."""
        first = layers[0]
        if any(m.qtype != first.qtype or m.in_features != first.in_features for m in layers):
            return None
        whole = torch.cat([m.blocks for m in layers])
        biases = [m.bias for m in layers]
        bias = None
        if any(b is not None for b in biases):
            like = next(b for b in biases if b is not None)
            bias = torch.cat([like.new_zeros(m.out_features) if b is None else b.detach()
                              for b, m in zip(biases, layers)])
        stacked = cls(whole, first.qtype, first.in_features, bias)
        start = 0
        for m in layers:
            m.blocks, start = whole[start:start + m.out_features], start + m.out_features
        return stacked

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {TYPE_NAMES[self.qtype]}, "
                f"bias={self.bias is not None}, kernel=triton")


class TritonBlockEmbedding(BlockEmbedding):
    """Token embedding rows decoded on lookup from GGUF blocks on the device."""

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.blocks.index_select(0, tokens.reshape(-1))  # a few rows' bytes, then decoded
        return dequantize_rows(rows, self.qtype, self.embedding_dim).to(self.dtype).view(*tokens.shape, -1)


def attach_triton_blocks(model: nn.Module, blocks: dict[str, Blocks], dtype: torch.dtype,
                         device: torch.device | str) -> None:
    """Replace the modules owning each named weight ("...q_proj.weight") with Triton block layers
    on `device`, in place: each matrix's bytes copied there once (a tied output head and the
    embedding share theirs). Biases already loaded on the Linear carry over."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    embed = blocks.get("model.embed_tokens.weight")
    if tied and embed is not None and "lm_head.weight" not in blocks:
        blocks = {**blocks, "lm_head.weight": embed}
    on_device: dict[int, Tensor] = {}
    for name, b in blocks.items():
        owner_name, _, leaf = name.rpartition(".")
        if leaf != "weight":
            raise ValueError(f"{name}: only weight matrices are held as blocks")
        parent_name, _, child = owner_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if id(b.data) not in on_device:
            on_device[id(b.data)] = b.data.to(device)
        data = on_device[id(b.data)]
        if isinstance(old, nn.Embedding):
            setattr(parent, child, TritonBlockEmbedding(data, b.qtype, b.shape[1], dtype))
        else:
            setattr(parent, child, TritonBlockLinear(data, b.qtype, b.shape[1], getattr(old, "bias", None)))
