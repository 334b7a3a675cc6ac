"""Int4 weights kept compact on CUDA: torch's tinygemm kernel (`torch._weight_int4pack_mm`), or our
Triton kernels (qwen2.quant.triton_int4) where the caller names them (`kernel="triton"`).

The same group-wise convention as the CPU's Int4Linear, w = (q - 8) * scale + zero with q in 0..15,
in the GPU kernel's own tiled layout (`torch._convert_weight_to_int4pack`): half a byte a weight
plus a bf16 scale and zero per group, and no float copy of the matrix on the device at any time.
Activations run in bf16 (the kernel's dtype) and are cast back. The kernel needs an Ampere or later
GPU, out_features % 8 == 0 and in_features a multiple of the group size and of 16 * INNER_K_TILES.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qwen2.quant.int_linear import INT4_GROUP_SIZES, KERNEL_DTYPE, quantize_int4

INNER_K_TILES = 8  # the widest tiling the kernel offers: fewest loads per column of weights
# The CUDA int4 kernels: torch's tinygemm, and ours in Triton (dequantizing tile by tile inside the
# product). bench/gpu_check.py measures both; the faster on a lent GPU should be the default.
KERNELS = ("tinygemm", "triton")


def cuda_int4_ok(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the CUDA int4 kernel takes this shape."""
    return (group_size in INT4_GROUP_SIZES and out_features % 8 == 0 and in_features % group_size == 0
            and in_features % (16 * INNER_K_TILES) == 0)


def cuda_int4_linear(q: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None = None,
                     input_perm: Tensor | None = None, kernel: str = "tinygemm") -> nn.Module:
    """An int4 layer on `kernel` (one of KERNELS) from q (N, K) in 0..15 and scale, zero
    (N, K / group_size) on the target CUDA device (see CudaInt4Linear)."""
    if kernel == "triton":
        from qwen2.quant.triton_int4 import TritonInt4Linear  # Triton comes with CUDA builds of torch

        return TritonInt4Linear(q, scale, zero, group_size, bias, input_perm)
    if kernel != "tinygemm":
        raise ValueError(f"unknown CUDA int4 kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    return CudaInt4Linear(q, scale, zero, group_size, bias, input_perm)


@torch.no_grad()
def quantize_cuda_int4(linear: nn.Linear, group_size: int = 128, kernel: str = "tinygemm") -> nn.Module:
    """A float Linear on CUDA, quantized where it lies (one matrix's float32 temporaries at a time)
    onto `kernel`'s int4 layer."""
    q, scale, zero = quantize_int4(linear.weight, group_size)
    return cuda_int4_linear(q, scale, zero, group_size, linear.bias, kernel=kernel)  # the bias stays float


class Int4Layer(nn.Module):
    """y = x @ W.T + bias for W in int4 groups: what the CUDA int4 layers share around their kernel's
    product (the GPTQ act-order gather of x, bf16 activations cast back, the float bias)."""

    def __init__(self, n: int, k: int, group_size: int, bias: Tensor | None, input_perm: Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("input_perm", input_perm)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def product(self, x: Tensor) -> Tensor:
        """x (M, K) in bf16 @ W.T -> (M, N) in bf16."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        shape, dtype = x.shape, x.dtype
        y = self.product(x.reshape(-1, self.in_features).to(KERNEL_DTYPE))
        y = y.to(dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


class CudaInt4Linear(Int4Layer):
    """An int4 layer on torch's tinygemm kernel, on a CUDA device."""

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None = None,
                 input_perm: Tensor | None = None):
        """q [N, K] in 0..15 and scale, zero [N, K / group_size], on the target CUDA device.
        input_perm [K]: the layer computes x[..., input_perm] @ W.T (GPTQ desc_act, see Int4Linear)."""
        n, k = q.shape
        if not cuda_int4_ok(n, k, group_size):
            raise ValueError(f"the CUDA int4 kernel needs out % 8 == 0 and in % {16 * INNER_K_TILES} == 0 and "
                             f"in % group_size == 0, got {n}x{k}, group_size {group_size}")
        super().__init__(n, k, group_size, bias, input_perm)
        q = q.to(torch.uint8)
        pairs = (q[:, ::2] << 4) | q[:, 1::2]  # the kernel's byte: the even input in the high nibble
        self.register_buffer("weight", torch._convert_weight_to_int4pack(pairs.contiguous(), INNER_K_TILES))
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).to(KERNEL_DTYPE)
                             .contiguous())  # (K / group_size, N, 2)

    def product(self, x: Tensor) -> Tensor:
        return torch._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)
