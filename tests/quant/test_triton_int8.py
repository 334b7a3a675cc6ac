"""Our Triton int8 kernels (qwen2.quant.triton_int8), which Int8Linear runs on CUDA, against the float
weights of their own integers.

On a CUDA machine they run compiled on the GPU; elsewhere in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set by tests/conftest.py before Triton loads). Speed is bench/gpu_check.py's.
"""
import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is a dev dependency (pip install -e '.[dev]'); no wheel here")

from qwen2.quant import triton_int8 as kernels  # noqa: E402
from qwen2.quant.int_linear import Int8Linear, quantize_int8  # noqa: E402
from tests.gpu_compile import cubin_sizes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before Triton loads"


def int8_weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, scale of a random (n, k) matrix on the device, and the float64 matrix they stand for."""
    torch.manual_seed(seed)
    q, scale = quantize_int8(torch.randn(n, k))
    return q.to(DEVICE), scale.to(DEVICE), q.double() * scale.double()[:, None]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


# shapes the blocks tile and shapes they do not (masks along N and K); float32 in, float32 sums (measured
# ~1e-7; the bound leaves room for another CPU's summation order in the interpreter)
@pytest.mark.parametrize("n, k", [(64, 512), (37, 200)])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_the_product_is_the_float_weights_product_to_float32_rounding(n, k, rows):
    q, scale, w = int8_weights(n, k)
    x = torch.randn(rows, k)
    y = kernels.int8_matmul(x.to(DEVICE), q, scale)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert rel_err(y, x.double() @ w.T) < 1e-5


@pytest.mark.parametrize("config", kernels.GEMV_CONFIGS, ids=str)
def test_every_one_row_configuration_the_tuner_may_pick(config):
    block_n, block_k, _ = config
    q, scale, w = int8_weights(40, 1100, seed=1)
    x = torch.randn(1, 1100)
    y = kernels.int8_matmul(x.to(DEVICE), q, scale, config=dict(BLOCK_N=block_n, BLOCK_K=block_k))
    assert rel_err(y, x.double() @ w.T) < 1e-5


@pytest.mark.parametrize("config", kernels.MATMUL_CONFIGS, ids=str)
def test_every_many_rows_configuration_the_tuner_may_pick(config):
    block_m, block_n, block_k, _, _ = config
    q, scale, w = int8_weights(72, 320, seed=2)
    x = torch.randn(20, 320)
    y = kernels.int8_matmul(x.to(DEVICE), q, scale, config=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k))
    assert rel_err(y, x.double() @ w.T) < 1e-5


def test_bf16_activations_come_back_in_bf16_within_its_rounding():
    q, scale, w = int8_weights(48, 256, seed=3)
    x = torch.randn(5, 256).bfloat16()
    y = kernels.int8_matmul(x.to(DEVICE), q, scale)
    assert y.dtype == torch.bfloat16 and rel_err(y, x.double() @ w.T) < 1e-2


def test_what_is_not_one_int8_matrix_and_its_scales_is_refused():
    with pytest.raises(ValueError, match=r"expected int8 \(N, K\) contiguous and N scales"):
        kernels.int8_matmul(torch.randn(1, 8), torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="expected int8"):
        kernels.int8_matmul(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


@pytest.mark.skipif(DEVICE != "cuda", reason="Int8Linear takes these kernels for weights on CUDA; on the CPU "
                                              "its own (torch's) run, tested in test_int_linear.py")
def test_int8_linear_on_cuda_runs_them_on_its_own_integers():
    linear = torch.nn.Linear(256, 48, device=DEVICE)
    layer = Int8Linear(linear)
    x = torch.randn(3, 256, device=DEVICE)
    w = layer.weight.double() * layer.scales.double()[:, None]
    want = x.double() @ w.T + linear.bias.double()
    assert rel_err(layer(x), want.cpu()) < 1e-5


COMPILE = """
from qwen2.quant import triton_int8 as kernels

for arch in (80, 90):  # A100, H100/H200
    sizes[f"gemv sm_{arch}"] = cubin_bytes(kernels._int8_gemv, ["*bf16", "*i8", "*bf16", "*bf16", "i32", "i32"],
                                           dict(BLOCK_N=8, BLOCK_K=512), 4, arch)
    sizes[f"matmul sm_{arch}"] = cubin_bytes(kernels._int8_matmul, ["*bf16", "*i8", "*bf16", "*bf16"] + ["i32"] * 4,
                                             dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, DOT=tl.bfloat16), 4, arch)
"""


def test_the_kernels_compile_to_machine_code_for_the_gpus_we_measure_on():
    sizes = cubin_sizes(COMPILE)
    assert len(sizes) == 4 and all(size > 1000 for size in sizes.values()), sizes
