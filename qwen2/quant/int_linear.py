"""Weight-only int8 / int4 quantization of `nn.Linear` layers, as a module transform.

`quantize_model(model, "int8" | "int4")` swaps every `nn.Linear` (lm_head included; embeddings are
`nn.Embedding` and stay float) for `Int8Linear` or `Int4Linear`, keeping the bias in float. Quantize
after the float weights are loaded.

- int8: per-output-channel symmetric, w ~= q * scale, q in [-127, 127].
  CPU kernel: `torch._weight_int8pack_mm` (needs in_features % 16 == 0 and 32-byte aligned input).
- int4: group-wise asymmetric along in_features, w ~= (q - 8) * scale + zero, q in [0, 15], stored
  in the layout of `torch._convert_weight_to_int4pack_for_cpu` for `torch._weight_int4pack_mm_for_cpu`
  (needs out_features % 16 == 0 and in_features % group_size == 0, group_size in 32/64/128/256).

Both CPU kernels are vectorized (AVX2/AVX512) for bf16 activations only; their fp32 paths are
scalar and 10-100x slower, so the layers run them in bf16 and cast back: they take and return the
model's compute dtype. They are GEMV-style kernels, right for decode but 2-3x slower than a oneDNN
GEMM at prefill, so above INT8/INT4_KERNEL_MAX_ROWS rows (batch * tokens) the layers dequantize the
weight, a block of rows at a time, and call F.linear in the model's dtype (crossovers measured with
bench/quant_kernels.py on a 2-core AVX512-BF16 EPYC: ~12 rows for int8, ~90 for int4).

On CUDA, int4 layers run torch's GPU int4 kernel (qwen2.quant.cuda_int4) and int8 layers our Triton
kernels (qwen2.quant.triton_int8), both on their integers in place. Not covered: MPS kernels; activation
quantization; GPTQ/AWQ checkpoints. A quantized model's state dict is cached on disk by
qwen2.loading (qwen2.weights.quantized), keyed by the int4 layout, which depends on the CPU's
vector width. Quantizing packs on CPU; the buffers may then move.
Fallbacks: a layer the int4 kernel can't take becomes int8; an int8 layer with in_features % 16 != 0
always dequantizes. A tied lm_head gets its own quantized copy; the embedding keeps its float weight.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4")
KERNEL_DTYPE = torch.bfloat16  # the only activation dtype both CPU kernels vectorize on x86
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Rows (batch * tokens) up to which the CPU kernels beat dequantize + F.linear (bench/quant_kernels.py).
INT8_KERNEL_MAX_ROWS = 8
INT4_KERNEL_MAX_ROWS = 64
_PACK_ROWS = 4096  # quantize in row chunks to bound fp32/int32 temporaries (int4 packs 64-row blocks)
_DEQUANT_ELEMS = 1 << 20  # dequantize ~1M weights at a time, so the float tile is still in cache for the GEMM


def quantize_int8(w: Tensor, dtype: torch.dtype = KERNEL_DTYPE) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: q int8 [N, K] and scale [N] (in `dtype`), w ~= q * scale[:, None]."""
    w = w.float()
    # Round the scale to its storage dtype first, so q is chosen for the scale the kernel will use.
    scale = (w.abs().amax(dim=1).clamp(min=1e-10) / 127).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: Tensor, group_size: int, dtype: torch.dtype = KERNEL_DTYPE) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric int4 in the tinygemm convention w ~= (q - 8) * scale + zero.

    Returns q int32 [N, K] in [0, 15], and scale, zero [N, K // group_size] in `dtype`.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)  # (N, G, gs)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)  # the value of q = 8, the middle of the range
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((g - z) / s + 8).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, zero


def int4_kernel_ok(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether `_weight_int4pack_mm_for_cpu` accepts this shape."""
    return group_size in INT4_GROUP_SIZES and out_features % 16 == 0 and in_features % group_size == 0


def unpack_int4(packed: Tensor, n: int, block: int, split: bool) -> Tensor:
    """Invert `_convert_weight_to_int4pack_for_cpu`: uint8 [N, K/2] -> q uint8 [K, N], transposed
    because that is what a GEMM reads without a copy and what dequantizing writes fastest.

    The packing goes in blocks of `block` rows, each stored (K, block/2): byte d of a full block holds
    rows d and d + block/2 when `split` (the AVX2/AVX512 kernels), rows 2d and 2d+1 otherwise and in
    the last, partial block. Low nibble first.
    """
    k = packed.shape[1] * 2
    words = packed.view(torch.int32)  # mask four bytes per element
    lo = (words & 0x0F0F0F0F).view(torch.uint8)  # (N, K/2)
    hi = ((words >> 4) & 0x0F0F0F0F).view(torch.uint8)
    out = torch.empty(k, n, dtype=torch.uint8, device=packed.device)
    full = n // block * block
    if full:
        nb = full // block
        src_lo = lo[:full].reshape(nb, k, block // 2).transpose(0, 1)  # (K, NB, block/2)
        src_hi = hi[:full].reshape(nb, k, block // 2).transpose(0, 1)
        dst = out[:, :full].view(k, nb, 2, block // 2) if split else out[:, :full].view(k, nb, block // 2, 2)
        if split:
            dst[:, :, 0], dst[:, :, 1] = src_lo, src_hi
        else:
            dst[..., 0], dst[..., 1] = src_lo, src_hi
    if n > full:
        dst = out[:, full:].view(k, (n - full) // 2, 2)
        dst[..., 0], dst[..., 1] = lo[full:].reshape(k, -1), hi[full:].reshape(k, -1)
    return out


@functools.lru_cache(maxsize=1)
def int4_layout() -> tuple[int, bool] | None:
    """The (block, split) layout this torch build packs int4 with on this CPU, found by a probe."""
    q = torch.randint(0, 16, (144, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    for block, split in ((64, True), (32, True), (32, False)):
        if torch.equal(unpack_int4(packed, 144, block, split), q.T.to(torch.uint8)):
            return block, split
    return None


def _chunked_linear(n: int, k: int, part: Callable[[int, int], Tensor]) -> Tensor:
    """Concatenate `part(start, stop)` (the outputs of weight rows start:stop) over row blocks."""
    step = max(64, _DEQUANT_ELEMS // k // 64 * 64)  # a multiple of 64 keeps int4 packing blocks whole
    if step >= n:
        return part(0, n)
    return torch.cat([part(i, min(i + step, n)) for i in range(0, n, step)], dim=-1)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Skips the dispatcher when t already has dtype: eager decode makes ~170 layer calls a token.
    return t if t.dtype == dtype else t.to(dtype)


def _finish(y: Tensor, shape: torch.Size, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    y = _as(y, dtype).view(*shape[:-1], y.shape[-1])
    return y if bias is None else y + _as(bias, dtype)


def _float_bias(linear: nn.Linear) -> nn.Parameter | None:
    if linear.bias is None:
        return None
    return nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 per output channel.

    `Int8Linear(linear)` quantizes a Linear; `Int8Linear(linear, empty=True)` only allocates
    (uninitialised, on the Linear's device) for a saved state dict to be loaded into.
    """

    def __init__(self, linear: nn.Linear, empty: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if empty:
            device = linear.weight.device
            q = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device)
            scale = torch.empty(self.out_features, dtype=KERNEL_DTYPE, device=device)
        else:
            parts = [quantize_int8(rows) for rows in torch.split(linear.weight.detach(), _PACK_ROWS)]
            q, scale = torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale)  # bf16, as the kernel wants scales in x's dtype
        self.bias = _float_bias(linear)
        self.kernel_ok = self.in_features % 16 == 0  # the AVX kernels step K by 16 with no tail loop

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if x.shape[0] <= INT8_KERNEL_MAX_ROWS and self.kernel_ok and self.weight.is_cpu:
            x = _as(x, KERNEL_DTYPE)
            # The kernel does aligned 32-byte loads of x's rows: a misaligned view would segfault.
            # (Not checked under torch.compile, which can't read pointers; its buffers are fresh.)
            if not torch.compiler.is_compiling() and x.data_ptr() % 32:
                x = x.clone()
            y = torch._weight_int8pack_mm(x, self.weight, _as(self.scales, KERNEL_DTYPE))
        elif self.weight.is_cuda:
            from qwen2.quant.triton_int8 import int8_matmul  # Triton comes with CUDA builds of torch

            y = int8_matmul(x, self.weight, self.scales)
        else:
            y = _chunked_linear(self.out_features, self.in_features, lambda a, b: (
                F.linear(x, self.weight[a:b].to(dtype)) * self.scales[a:b].to(dtype)))
        return _finish(y, shape, dtype, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W = (q - 8) * scale + zero per group of `group_size` inputs.

    `weight` is uint8 [N, K/2] in the CPU kernel's packed layout (on any device, so one unpacker
    serves); `scales_and_zeros` is bf16 [K/gs, N, 2].
    """

    def __init__(self, linear: nn.Linear, group_size: int = 128, empty: bool = False):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        if not int4_kernel_ok(n, k, group_size):
            raise ValueError(f"int4 needs out % 16 == 0 and in % group_size == 0, got {n}x{k}, gs={group_size}")
        w = linear.weight.detach()
        if w.device.type not in ("cpu", "meta") and int4_layout() is None:
            raise NotImplementedError("int4 off CPU needs the packed layout, which this torch build hides")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        if empty:  # see Int8Linear
            weight = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
            scales_and_zeros = torch.empty(k // group_size, n, 2, dtype=KERNEL_DTYPE, device=w.device)
        else:
            packed, sz = [], []
            for rows in torch.split(w, _PACK_ROWS):  # 4096 is a multiple of the 64-row packing block
                q, scale, zero = quantize_int4(rows.cpu(), group_size)
                packed.append(torch._convert_weight_to_int4pack_for_cpu(q, 1))  # innerKTiles: unused on CPU
                sz.append(torch.stack([scale, zero], dim=-1))  # (rows, G, 2)
            weight = torch.cat(packed).to(w.device)
            scales_and_zeros = torch.cat(sz).transpose(0, 1).contiguous().to(w.device)
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("input_perm", None)  # see from_int4
        self.bias = _float_bias(linear)

    @classmethod
    def from_int4(cls, q: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None = None,
                  input_perm: Tensor | None = None) -> Int4Linear:
        """Adopt weights quantized elsewhere (a GPTQ/AWQ checkpoint), on CPU: q [N, K] in 0..15 and
        scale, zero [N, K / group_size] with W = (q - 8) * scale + zero (rounded to bf16 here).

        input_perm [K]: the layer computes x[..., input_perm] @ W.T, for checkpoints whose groups gather
        inputs out of order (GPTQ desc_act): W's columns are stored in that gathered order.
        """
        n, k = q.shape
        layer = cls(nn.Linear(k, n, bias=bias is not None, device="meta"), group_size, empty=True)
        layer.weight = torch.cat([torch._convert_weight_to_int4pack_for_cpu(rows.to(torch.int32).contiguous(), 1)
                                  for rows in torch.split(q, _PACK_ROWS)])
        layer.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(KERNEL_DTYPE).contiguous()
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        layer.input_perm = input_perm
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> Tensor:
        """Weight rows start:stop (a multiple of 64 or the end) as `dtype`, shape [rows, K].

        A transposed view of a [K, rows] tensor, which F.linear takes as is.
        """
        stop = self.out_features if stop is None else stop
        n, k, gs = stop - start, self.in_features, self.group_size
        q = unpack_int4(self.weight[start:stop], n, *int4_layout()).to(dtype)  # (K, n)
        scale, zero = self.scales_and_zeros[:, start:stop].to(dtype).unbind(-1)  # (G, n) each
        scale = scale.contiguous()  # strided operands knock addcmul off its vectorized path (8x)
        # w = q * scale + (zero - 8 * scale)
        w = torch.addcmul((zero - 8 * scale)[:, None], q.view(k // gs, gs, n), scale[:, None])  # (G, gs, N)
        return w.view(k, n).T

    def forward(self, x: Tensor) -> Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if self.weight.is_cpu and (x.shape[0] <= INT4_KERNEL_MAX_ROWS or int4_layout() is None):
            y = torch._weight_int4pack_mm_for_cpu(
                _as(x, KERNEL_DTYPE), self.weight, self.group_size, _as(self.scales_and_zeros, KERNEL_DTYPE))
        else:
            y = _chunked_linear(self.out_features, self.in_features, lambda a, b: (
                F.linear(x, self.dequantize(dtype, a, b))))
        return _finish(y, shape, dtype, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def quantize_linear(linear: nn.Linear, mode: str, group_size: int = 128, empty: bool = False,
                    cuda_kernel: str = "tinygemm") -> nn.Module:
    """One Linear -> its quantized replacement (int4 falls back to int8 where the kernel can't run);
    on CUDA, int4 layers are quantized in place on `cuda_kernel`'s layout (qwen2.quant.cuda_int4)."""
    if mode == "int4" and linear.weight.is_cuda and not empty:
        from qwen2.quant.cuda_int4 import cuda_int4_ok, quantize_cuda_int4  # it builds on this module

        if cuda_int4_ok(linear.out_features, linear.in_features, group_size):
            return quantize_cuda_int4(linear, group_size, cuda_kernel)
    if mode == "int4":
        if int4_kernel_ok(linear.out_features, linear.in_features, group_size):
            return Int4Linear(linear, group_size, empty)
        log.info("int4 can't take %dx%d (group_size %d); using int8",
                 linear.out_features, linear.in_features, group_size)
    return Int8Linear(linear, empty)


@torch.no_grad()
def quantize_model(
    model: nn.Module, mode: str, group_size: int = 128, skip: Callable[[str], bool] | None = None,
    empty: bool = False, cuda_kernel: str = "tinygemm",
) -> nn.Module:
    """Swap every nn.Linear (by qualified name, unless `skip(name)`) for its int8/int4 version, in place.

    empty=True allocates the quantized modules without quantizing, to load a saved state dict into.
    cuda_kernel: the kernel int4 layers on CUDA run (qwen2.quant.cuda_int4.KERNELS).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {MODES}")
    if mode == "none":
        return model
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Linear) and not (skip is not None and skip(full)):
                # A new module, not an in-place edit: a Parameter tied to an embedding stays float there.
                setattr(parent, name, quantize_linear(child, mode, group_size, empty, cuda_kernel))
    return model
