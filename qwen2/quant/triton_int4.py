"""Int4 weights on CUDA through our own Triton kernels: the weights stay 4-bit in memory and each
tile is dequantized inside the matrix product, so no float copy of a matrix ever exists.

Layout (GPTQ's own): `qweight` int32 (K / 8, N), one word holding eight consecutive inputs of one
output (input 8i + j in bits 4j..4j+3), neighbouring outputs' words side by side, so a warp's loads
of one word row are one contiguous run; `scales` and `zeros` bf16 (K / group, N), w = (q - 8) *
scale + zero: the convention of Int4Linear and CudaInt4Linear, so the same integers (ours, GPTQ's,
AWQ's) load into either.

Two kernels, tuned per shape at first use on the GPU (triton.autotune):
- one activation row (batch-1 decode, bound by the bytes of weights read): each program streams a
  few outputs' words along K. Within a word the sum is x . (q - 8); the scale and zero are applied
  once a word, s * x . (q - 8) + z * sum x, so a weight costs a mask-and-or, a subtraction and an
  FMA, and no int-to-float conversion (a lower-throughput instruction than the FMA on NVIDIA GPUs);
  a thread's inputs serve the four neighbouring outputs whose words it loads as one vector.
- more rows (batched decode, prefill): a (K, N) tile unpacked to bf16 and multiplied on the tensor
  cores (tl.dot) with float32 accumulation.

Without CUDA the kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set before Triton is
first imported (tests/conftest.py does), at a configuration the caller fixes. The interpreter's bf16
casts truncate where the GPU rounds, so it multiplies the tiles in float32 (`DOT`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from qwen2.quant.cuda_int4 import Int4Layer
from qwen2.quant.triton_products import Kernel, product

WORD = 8  # int4 values in an int32


@triton.jit
def _int4_gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, STRIDE, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # EVEN_N, EVEN_K: the blocks tile N (K) exactly. A mask that varies along N would keep the compiler
    # from loading a thread's neighbouring outputs' words as one vector; one along K does not
    if EVEN_N:
        col_ok = tl.full([BLOCK_N], 1, tl.int1)
    else:
        col_ok = cols < N
    # a thread holds a word of several neighbouring outputs: the input it multiplies is loaded once
    # for all of them; each thread sums along K, and the one sum across threads comes at the end
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        word = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        if EVEN_K:
            word_ok = tl.full([BLOCK_K // 8], 1, tl.int1)
        else:
            word_ok = word < K // 8
        ok = word_ok[:, None] & col_ok[None, :]
        packed = tl.load(w_ptr + word[:, None] * STRIDE + cols[None, :], mask=ok, other=0)
        at = (word * 8 // GROUP)[:, None] * STRIDE + cols[None, :]
        s = tl.load(s_ptr + at, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
        xq = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        for half in tl.static_range(2):
            bits = packed >> (16 * half)
            for j in tl.static_range(4):
                x = tl.load(x_ptr + word * 8 + 4 * half + j, mask=word_ok, other=0.0).to(tl.float32)
                xs += x
                # q - 8 with no int-to-float conversion: the nibble, left at bit 4j, becomes the
                # low mantissa bits of 2^(23 - 4j), whose last bit is then worth 1, so the float is
                # 2^(23 - 4j) + q exactly
                magic = (150 - 4 * j) << 23
                q = ((bits & (0xF << (4 * j))) | magic).to(tl.float32, bitcast=True)
                xq += (q - ((1 << (23 - 4 * j)) + 8.0)) * x[:, None]
        acc += s * xq + z * xs[:, None]
    tl.store(y_ptr + cols, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _int4_matmul(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, STRIDE, M_BUCKET, GROUP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                 DOT: tl.constexpr = tl.bfloat16):
    # M_BUCKET is not read: it keys the autotuner's choice by the rows' order of magnitude.
    # DOT: the tiles' dtype in the product, bf16 for the tensor cores; float32 in the interpreter,
    # whose bf16 products and casts are not the GPU's (it truncates)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        ok = k_ok[:, None] & (rn < N)[None, :]
        # each word is read for its 8 inputs from the cache; the shift picks one input's nibble
        words = w_ptr + (kk // 8)[:, None] * STRIDE + rn[None, :]
        packed = tl.load(words) if EVEN else tl.load(words, mask=ok, other=0)
        nibble = ((packed >> ((kk % 8) * 4)[:, None]) & 0xF) | 0x4B000000  # 2^23 + q as a float
        if BLOCK_K <= GROUP:  # both powers of two: the tile lies in one group, one scale per output
            at = (k0 // GROUP) * STRIDE + rn
            col_ok = rn < N
        else:
            at = (kk // GROUP)[:, None] * STRIDE + rn[None, :]
            col_ok = ok
        if EVEN:
            s = tl.load(s_ptr + at).to(tl.float32)
            z = tl.load(z_ptr + at).to(tl.float32)
        else:
            s = tl.load(s_ptr + at, mask=col_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=col_ok, other=0.0).to(tl.float32)
        w = ((nibble.to(tl.float32, bitcast=True) - 8388616.0) * s + z).to(DOT)  # (BK, BN)
        acc += tl.dot(a.to(DOT), w)
    out = y_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# (BLOCK_N, BLOCK_K, warps, stages): each thread takes 4 neighbouring outputs (one 16-byte load) and
# the rest of the warp spreads along K. A thread's loads are not pipelined across iterations, so
# what keeps HBM busy is the bytes all threads load in one: long K blocks (several 16-byte loads a
# thread) over programs of few outputs. Each runs at 5.6-6.8 instructions a weight in its loop
# (sm_90 SASS, no register spills)
GEMV_CONFIGS = [(n, k, w, 2) for n, k, w in [(8, 512, 2), (8, 1024, 2), (8, 1024, 4), (8, 2048, 4), (16, 512, 2),
                                             (16, 1024, 4), (16, 2048, 8), (32, 1024, 8)]]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): narrow tiles with long K blocks for a batch's few rows
# (programs spread over N alone, each wanting many bytes in flight), wide ones for a prompt's many
MATMUL_CONFIGS = [(m, n, k, w, s) for m, n, k, w in [(16, 16, 256, 4), (32, 32, 256, 4), (16, 32, 128, 4),
                                                     (32, 64, 128, 4), (64, 64, 64, 4), (64, 128, 64, 4),
                                                     (128, 128, 32, 8), (128, 64, 64, 4)] for s in (2, 3)]
GEMV_EVEN = {"EVEN_N": lambda meta: meta["N"] % meta["BLOCK_N"] == 0,
             "EVEN_K": lambda meta: meta["K"] % meta["BLOCK_K"] == 0}


def _even(meta: dict) -> bool:
    """The many-row kernel's one flag: the blocks tile N and K both."""
    return all(even(meta) for even in GEMV_EVEN.values())


GEMV = Kernel(_int4_gemv, [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                           for n, k, w, s in GEMV_CONFIGS], ["N", "K"], dict(BLOCK_N=4, BLOCK_K=64), GEMV_EVEN)
TILES = Kernel(_int4_matmul, [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                              for m, n, k, w, s in MATMUL_CONFIGS], ["N", "K", "M_BUCKET"],
               dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), {"EVEN": _even})


def int4_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                config: dict[str, int] | None = None) -> Tensor:
    """x (M, K) @ W.T -> (M, N) in x's dtype, W the int4 matrix of `qweight` (K / 8, N) with its
    `scales` and `zeros` (K / group_size, N), all three with one row stride (columns of a wider
    stack, see TritonInt4Linear.stack). `config` fixes the block sizes (tests); on CUDA they are
    otherwise tuned per shape."""
    stride = qweight.stride(0)
    if not (qweight.stride(1) == scales.stride(1) == zeros.stride(1) == 1 and scales.stride(0) == zeros.stride(0)
            == stride):
        raise ValueError("qweight, scales and zeros must share one row stride, their columns contiguous")
    return product(x, (qweight, scales, zeros), qweight.shape[1], (stride,), GEMV, TILES, config, GROUP=group_size)


def pack_words(q: Tensor) -> Tensor:
    """q (N, K) in 0..15 -> int32 (K / 8, N), input 8i + j of an output in bits 4j..4j+3 of its word i."""
    n, k = q.shape
    if k % WORD:
        raise ValueError(f"int4 words hold 8 inputs: in_features must be a multiple of 8, got {k}")
    shifts = torch.arange(0, 4 * WORD, 4, device=q.device, dtype=torch.int64)
    words = (q.to(torch.int64).view(n, k // WORD, WORD) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
    return words.T.contiguous()


class TritonInt4Linear(Int4Layer):
    """An int4 layer multiplied by our Triton kernels."""

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None = None,
                 input_perm: Tensor | None = None):
        """q (N, K) in 0..15 and scale, zero (N, K / group_size), on the target device.
        input_perm (K,): the layer computes x[..., input_perm] @ W.T (GPTQ desc_act, see Int4Linear)."""
        n, k = q.shape
        if k % group_size or group_size % WORD:
            raise ValueError(f"in_features ({k}) must be a multiple of group_size ({group_size}), itself a "
                             f"multiple of {WORD}")
        super().__init__(n, k, group_size, bias, input_perm)
        self.register_buffer("qweight", pack_words(q))
        self.register_buffer("scales", scale.to(torch.bfloat16).T.contiguous())
        self.register_buffer("zeros", zero.to(torch.bfloat16).T.contiguous())

    def product(self, x: Tensor) -> Tensor:
        return int4_matmul(x, self.qweight, self.scales, self.zeros, self.group_size)

    @classmethod
    def stack(cls, layers: list[TritonInt4Linear]) -> TritonInt4Linear | None:
        """One layer whose outputs are `layers`' one after another (q/k/v, gate/up: one product
        instead of several), or None where they differ in inputs, groups or input order. The layers
        keep working on their own: their buffers become column views of the stack's, so no weight
        is held twice."""
        first = layers[0]
        if any(m.in_features != first.in_features or m.group_size != first.group_size or m.input_perm is not None
               for m in layers):
            return None
        stacked = cls.__new__(cls)
        Int4Layer.__init__(stacked, sum(m.out_features for m in layers), first.in_features, first.group_size,
                           None, None)
        for name in ("qweight", "scales", "zeros"):
            whole = torch.cat([getattr(m, name) for m in layers], dim=1)
            stacked.register_buffer(name, whole)
            start = 0
            for m in layers:
                setattr(m, name, whole[:, start:start + m.out_features])
                start += m.out_features
        biases = [m.bias for m in layers]
        if any(b is not None for b in biases):
            like = next(b for b in biases if b is not None)
            stacked.bias = nn.Parameter(torch.cat([like.new_zeros(m.out_features) if b is None else b.detach()
                                                   for b, m in zip(biases, layers)]), requires_grad=False)
        return stacked

    def extra_repr(self) -> str:
        return super().extra_repr() + ", kernel=triton"
