"""Checkpoints that arrive quantized: GPTQ-Int4 and AWQ folders on our int4 kernel.

qwen2.weights.gptq_awq reads and unpacks the checkpoint's integers, and qwen2.loading builds the
network as for any checkpoint; `attach_int4` then makes each packed Linear an
`Int4Linear` holding those same integers, with scale = s and zero = (8 - z) * s in the kernel's
w = (q - 8) * scale + zero convention (bf16: |error| <= s / 16 per weight, see gptq_awq). GPTQ's
desc_act groups gather inputs out of order: the layer's columns are stored group by group and it
gathers x the same way at run time (one index_select per layer; folding the gather into the previous
layer is not done). Norms, embeddings, lm_head and biases stay float in the model's dtype.

On CUDA the same integers go to the GPU's int4 kernel (qwen2.quant.cuda_int4), packed on the CPU
one matrix at a time, so no float copy reaches the device. Float fallback (correct, not compact): a
layer the kernels can't take (out_features % 16, groups of uneven size, a group size no kernel size
divides; on CUDA also in_features % 128) becomes a float Linear of its dequantized weight. The
result is not cached on disk.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from qwen2.quant.cuda_int4 import cuda_int4_linear, cuda_int4_ok
from qwen2.quant.int_linear import INT4_GROUP_SIZES, Int4Linear
from qwen2.weights.gptq_awq import UnpackedLinear, dequantize

log = logging.getLogger(__name__)


def to_int4_linear(layer: UnpackedLinear, group_size: int, bias: Tensor | None,
                   device: torch.device | str = "cpu", cuda_kernel: str = "tinygemm") -> nn.Module | None:
    """The layer on `device`'s int4 kernel (on CUDA `cuda_kernel`, see qwen2.quant.cuda_int4), or None
    where the kernel can't take it (shape or uneven groups)."""
    n, k = layer.q.shape
    size = k if group_size == -1 else group_size
    groups = layer.scales.shape[0]
    if k % size or torch.bincount(layer.g_idx, minlength=groups).ne(size).any():
        return None
    # A group larger than the kernel allows is the same scale repeated over kernel-sized groups.
    kernel_group = next((g for g in sorted(INT4_GROUP_SIZES, reverse=True) if size % g == 0), None)
    if kernel_group is None or n % 16:
        return None
    perm = torch.sort(layer.g_idx, stable=True).indices  # inputs gathered group by group
    identity = torch.equal(perm, torch.arange(k))
    q = layer.q if identity else layer.q[:, perm]
    scale = layer.scales.T  # (N, G)
    zero = (8 - layer.zeros.T.float()) * scale  # the weight at q = 8
    repeat = size // kernel_group
    scale, zero = scale.repeat_interleave(repeat, 1), zero.repeat_interleave(repeat, 1)
    perm = None if identity else perm
    if torch.device(device).type == "cuda":
        if not cuda_int4_ok(n, k, kernel_group):
            return None
        return cuda_int4_linear(q.to(device), scale.to(device), zero.to(device), kernel_group, bias,
                                None if perm is None else perm.to(device), cuda_kernel)
    return Int4Linear.from_int4(q, scale, zero, kernel_group, bias, perm)


@torch.no_grad()
def attach_int4(model: nn.Module, packed: dict[str, UnpackedLinear], group_size: int, dtype: torch.dtype,
                cuda_kernel: str = "tinygemm") -> None:
    """Swap each packed Linear of a built model (named by its weight, as load_checkpoint(...,
    keep_packed=True) returns them) for the int4 kernel's layer on its own integers (on CUDA
    `cuda_kernel`'s), keeping the Linear's bias; float where the kernel can't run it (see the
    module docstring)."""
    fallbacks, device = [], torch.device("cpu")
    for name, unpacked in packed.items():
        prefix = name.removesuffix(".weight")
        linear = model.get_submodule(prefix)
        device = linear.weight.device
        layer = to_int4_linear(unpacked, group_size, linear.bias, device, cuda_kernel)
        if layer is None:
            fallbacks.append(prefix)
            layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
            layer.weight = nn.Parameter(dequantize(unpacked, dtype).to(device), requires_grad=False)
            layer.bias = linear.bias
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(device))
    if fallbacks:
        log.info("%d of %d packed layers run dequantized to float (%s), e.g. %s", len(fallbacks), len(packed),
                 "the int4 kernel can't take their shape", fallbacks[0])
