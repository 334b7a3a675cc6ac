"""Weight-only int8 on CUDA through our Triton kernels: Int8Linear's own integers (int8 (N, K), one
scale per output) read in place, so a step reads a byte a weight and no float tile is made.

One activation row: each program sums x . q along K for a few outputs, q turned into a float with
no int-to-float conversion (the byte, top bit flipped, as the low mantissa bits of 2^23), and the
output's scale applied once at the end. More rows: tiles of q converted to the activations' dtype
(exact: |q| <= 127) into `tl.dot`, the scales applied to the sums. Tuned per shape at first use
on the GPU; in Triton's interpreter without CUDA (TRITON_INTERPRET=1, tests/conftest.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen2.quant.triton_products import Kernel, product


@triton.jit
def _int8_gemv(x_ptr, q_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=ok, other=0)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        biased = (q.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int32) | 0x4B000000  # 2^23 + q + 128
        acc += (biased.to(tl.float32, bitcast=True) - 8388736.0) * x[None, :]
    scale = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * scale).to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _int8_matmul(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, M_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    # M_BUCKET is not read: it keys the autotuner's choice by the rows' order of magnitude
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
        q = tl.load(q_ptr + rn.to(tl.int64)[:, None] * K + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :],
                    other=0)
        acc += tl.dot(a.to(DOT), tl.trans(q.to(DOT)), input_precision="ieee")
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    out = y_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, (acc * scale[None, :]).to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# (BLOCK_N, BLOCK_K, warps): a thread loads 16 neighbouring bytes of a row at a time
GEMV_CONFIGS = [(4, 512, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
MATMUL_CONFIGS = [(16, 32, 128, 4, 3), (16, 64, 128, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3),
                  (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)]
GEMV = Kernel(_int8_gemv, [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w) for n, k, w in GEMV_CONFIGS],
              ["N", "K"], dict(BLOCK_N=16, BLOCK_K=128))
TILES = Kernel(_int8_matmul, [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                              for m, n, k, w, s in MATMUL_CONFIGS], ["N", "K", "M_BUCKET"],
               dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64))


def int8_matmul(x: Tensor, q: Tensor, scales: Tensor, config: dict[str, int] | None = None) -> Tensor:
    """x (M, K) @ (q * scales[:, None]).T -> (M, N) in x's dtype, for q int8 (N, K) contiguous and
    one scale an output. `config` fixes the block sizes (tests); on CUDA they are otherwise tuned
    per shape."""
    if q.dtype != torch.int8 or not q.is_contiguous() or scales.shape != (q.shape[0],):
        raise ValueError(f"expected int8 (N, K) contiguous and N scales, got {q.dtype} {tuple(q.shape)} and "
                         f"{tuple(scales.shape)}")
    return product(x, (q, scales), q.shape[0], (), GEMV, TILES, config)
