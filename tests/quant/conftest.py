"""What the kernel tests share: every vector ISA build this CPU runs."""

import pytest

from qwen2.quant import blocks, fused_decode, fused_moe, fused_prefill
from qwen2.quant.kernels import available_isas, gguf_ops


@pytest.fixture(params=available_isas())
def isa(request, monkeypatch):
    """Every vector ISA this CPU runs: the block layers and the fused calls use that build's kernels."""
    ops = gguf_ops(request.param)
    for module in (blocks, fused_decode, fused_moe, fused_prefill):
        monkeypatch.setattr(module, "compiled_ops", lambda: ops)
    return request.param
