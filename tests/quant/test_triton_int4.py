"""Our Triton int4 kernels (qwen2.quant.triton_int4) against float references of their own integers.

On a CUDA machine they run compiled on the GPU; elsewhere in Triton's interpreter, which runs the
same kernel code on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py before Triton loads).
Every block-size configuration the GPU's tuner may pick is run once, so a configuration that
computes something else cannot be chosen there. Speed is measured on a GPU by
bench/gpu_check.py (part "int4"), never here.
"""
import copy
import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is a dev dependency (pip install -e '.[dev]'); no wheel here")

from qwen2.config import Qwen2Config  # noqa: E402
from qwen2.model import KVCache, Transformer  # noqa: E402
from qwen2.quant import cuda_int4  # noqa: E402
from qwen2.quant import triton_int4 as kernels  # noqa: E402
from qwen2.quant.int_linear import Int4Linear, quantize_int4  # noqa: E402
from tests.gpu_compile import cubin_sizes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before Triton loads"
# Many rows multiply tiles: on the GPU rounded to bf16 for the tensor cores (2^-9 a value); the
# interpreter keeps them float32 (its bf16 casts truncate, unlike the GPU's), so float32 sums remain.
TILE_TOLERANCE = 1e-2 if DEVICE == "cuda" else 1e-5


def int4_weights(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, scale, zero of a random (n, k) matrix, and the float64 matrix they stand for."""
    torch.manual_seed(seed)
    q, scale, zero = quantize_int4(torch.randn(n, k), group)
    w = (q.double() - 8).view(n, -1, group) * scale.double()[..., None] + zero.double()[..., None]
    return q, scale, zero, w.view(n, k)


def packed(n: int, k: int, group: int, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    q, scale, zero, w = int4_weights(n, k, group, seed)
    scale, zero = (t.bfloat16().T.contiguous() for t in (scale, zero))  # (K / group, N), as the words
    on = [t.to(DEVICE) for t in (kernels.pack_words(q), scale, zero)]
    return tuple(on), w


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


def test_a_word_holds_eight_inputs_the_first_in_the_low_bits():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 0, 0, 0, 0, 0, 0, 0, 9]], dtype=torch.uint8)
    words = kernels.pack_words(torch.cat([q, q.flip(1)]))  # (K / 8, N): an output's words down a column
    assert words.dtype == torch.int32 and words.shape == (2, 2)
    assert words[0, 0].item() == 0xF7654321 - 2**32  # the top nibble lands in the sign bit
    assert words[1, 0].item() == 0x90000000 - 2**32
    assert words[0, 1].item() == 0x00000009 and words[1, 1].item() == 0x1234567F
    shifts = torch.arange(0, 32, 4)
    assert torch.equal((words[:, 0, None] >> shifts & 0xF).view(1, 16).to(torch.uint8), q)
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.pack_words(torch.zeros(2, 12, dtype=torch.uint8))


@pytest.mark.parametrize("n, k, group", [(40, 256, 64), (64, 512, 128), (24, 96, 32), (8, 512, 256)])
def test_one_row_is_the_float_weights_product_to_float32_rounding(n, k, group):
    weights, w = packed(n, k, group)
    x = torch.randn(1, k, device=DEVICE)  # float32 in, float32 sums: nothing rounded to bf16
    y = kernels.int4_matmul(x, *weights, group)
    assert y.shape == (1, n) and y.dtype == torch.float32
    assert rel_err(y, x.double().cpu() @ w.T) < 1e-5


@pytest.mark.parametrize("rows", [2, 16, 37])
@pytest.mark.parametrize("n, k, group", [(40, 256, 64), (24, 96, 32)])
def test_many_rows_multiply_dequantized_tiles_with_float32_sums(rows, n, k, group):
    weights, w = packed(n, k, group)
    x = torch.randn(rows, k, device=DEVICE)
    y = kernels.int4_matmul(x, *weights, group)
    assert y.shape == (rows, n) and rel_err(y, x.double().cpu() @ w.T) < TILE_TOLERANCE


# shapes the blocks tile along both, along N only, along K only, along neither: masks on either side
@pytest.mark.parametrize("n, k", [(64, 2048), (64, 640), (36, 2048), (36, 640)])
@pytest.mark.parametrize("config", kernels.GEMV_CONFIGS, ids=str)
def test_every_one_row_configuration_the_tuner_may_pick(config, n, k):
    block_n, block_k, _, _ = config
    weights, w = packed(n, k, 128, seed=1)
    x = torch.randn(1, k, device=DEVICE)
    y = kernels.int4_matmul(x, *weights, 128, config=dict(BLOCK_N=block_n, BLOCK_K=block_k))
    assert rel_err(y, x.double().cpu() @ w.T) < 1e-5


@pytest.mark.parametrize("n, k", [(128, 512), (72, 320)])
@pytest.mark.parametrize("config", kernels.MATMUL_CONFIGS[::2], ids=str)
def test_every_many_rows_configuration_the_tuner_may_pick(config, n, k):
    block_m, block_n, block_k, _, _ = config
    weights, w = packed(n, k, 64, seed=2)  # groups of 64: tiles within one group and tiles across two
    x = torch.randn(20, k, device=DEVICE)
    y = kernels.int4_matmul(x, *weights, 64, config=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k))
    assert rel_err(y, x.double().cpu() @ w.T) < TILE_TOLERANCE


@pytest.mark.parametrize("rows", [1, 6])
def test_the_layer_equals_the_cpu_int4_layer_on_the_same_act_order_integers(rows):
    q, scale, zero, _ = int4_weights(48, 256, 64, seed=3)
    perm = torch.randperm(256)  # GPTQ desc_act: stored column j is input perm[j]
    bias = torch.randn(48)
    cpu = Int4Linear.from_int4(q, scale, zero, 64, bias, perm)
    ours = kernels.TritonInt4Linear(q.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), 64, bias.to(DEVICE),
                                    perm.to(DEVICE))
    x = torch.randn(2, rows, 256)
    y = ours(x.to(DEVICE))
    assert y.shape == (2, rows, 48) and y.dtype == x.dtype
    assert rel_err(y, cpu(x).double()) < 0.01  # both round x to bf16; they differ in rounding after that
    assert not any(t.is_floating_point() and t.shape == (48, 256) for t in ours.buffers())  # no float matrix


@pytest.mark.parametrize("rows", [1, 5])
def test_a_stack_computes_its_layers_outputs_side_by_side_and_they_still_run_alone(rows):
    sizes = (64, 16, 16)  # q, k and v of 4 query heads and 1 KV head of 16
    layers = []
    for i, n in enumerate(sizes):
        q, scale, zero, _ = int4_weights(n, 128, 32, seed=i)
        bias = None if i == 2 else torch.randn(n)  # v without a bias, as a stacked zero
        layers.append(kernels.TritonInt4Linear(*(t.to(DEVICE) for t in (q, scale, zero)), 32,
                                               None if bias is None else bias.to(DEVICE)))
    x = torch.randn(rows, 128, device=DEVICE)
    alone = [layer(x) for layer in layers]
    stack = kernels.TritonInt4Linear.stack(layers)
    assert stack.out_features == 96 and all(layer.qweight.data_ptr() != 0 for layer in layers)
    assert layers[1].qweight.data_ptr() == stack.qweight[:, 64:].data_ptr()  # a view: no weight held twice
    # the same sums, each column's maybe in another order: the GPU's tuner may pick other blocks for
    # the wider matrix, and the interpreter's tile products (BLAS) may treat a column by its place in
    # the tile, which differs in the stack; the bf16 output then rounds a step apart at most
    torch.testing.assert_close(stack(x), torch.cat(alone, dim=-1), rtol=2 ** -7, atol=1e-3)
    assert all(torch.equal(layer(x), y) for layer, y in zip(layers, alone))


def test_no_rows_give_no_rows():
    weights, _ = packed(16, 128, 32)
    assert kernels.int4_matmul(torch.empty(0, 128, device=DEVICE), *weights, 32).shape == (0, 16)


def test_layers_that_differ_in_their_inputs_do_not_stack():
    q, scale, zero, _ = int4_weights(16, 128, 32)
    plain = kernels.TritonInt4Linear(q, scale, zero, 32)
    assert kernels.TritonInt4Linear.stack([plain, kernels.TritonInt4Linear(q, scale, zero, 32,
                                                                           input_perm=torch.randperm(128))]) is None
    q2, scale2, zero2, _ = int4_weights(16, 256, 32)
    assert kernels.TritonInt4Linear.stack([plain, kernels.TritonInt4Linear(q2, scale2, zero2, 32)]) is None


def test_the_cuda_int4_kernel_is_chosen_by_name():
    q, scale, zero, _ = int4_weights(16, 128, 32)
    assert isinstance(cuda_int4.cuda_int4_linear(q, scale, zero, 32, kernel="triton"), kernels.TritonInt4Linear)
    with pytest.raises(ValueError, match="unknown CUDA int4 kernel 'marlin'"):
        cuda_int4.cuda_int4_linear(q, scale, zero, 32, kernel="marlin")


def test_a_layer_whose_inputs_do_not_split_into_groups_is_refused():
    with pytest.raises(ValueError, match="multiple of group_size"):
        kernels.TritonInt4Linear(torch.zeros(8, 96, dtype=torch.uint8), torch.ones(8, 3), torch.zeros(8, 3), 64)


def int4_layers(model: Transformer, make) -> Transformer:
    """A copy of `model` with every Linear replaced by `make(q, scale, zero, group_size, bias)` of the
    same integers."""
    model = copy.deepcopy(model)
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
        q, scale, zero = quantize_int4(linear.weight.detach(), 32)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(q, scale, zero, 32, linear.bias))
    return model


def test_a_qwen2_model_on_these_layers_has_the_logits_of_the_cpu_int4_layers():
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = Transformer(config).eval()
    cpu = int4_layers(dense, Int4Linear.from_int4)
    ours = int4_layers(dense, kernels.TritonInt4Linear).to(DEVICE)
    assert sum(isinstance(m, kernels.TritonInt4Linear) for m in ours.modules()) == 2 * 7 + 1
    tokens = torch.randint(0, 256, (1, 10))
    prompt, step, position = tokens[:, :9], tokens[:, 9:], torch.tensor([[9]])
    with torch.no_grad():  # a prompt (9 rows: the tiles), then a cached step of one row (the GEMV)
        cache = KVCache(config, 1, 16)
        want = [cpu(prompt, cache=cache), cpu(step, position, cache=cache)]
        cache = KVCache(config, 1, 16, device=DEVICE)
        got = [ours(prompt.to(DEVICE), cache=cache), ours(step.to(DEVICE), position.to(DEVICE), cache=cache)]
    for ours_logits, cpu_logits in zip(got, want):
        assert rel_err(ours_logits, cpu_logits.double()) < 0.01  # both round activations to bf16


COMPILE = """
from qwen2.quant import triton_int4 as kernels

pointers = ["*bf16", "*i32", "*bf16", "*bf16", "*bf16"]
gemv = (kernels._int4_gemv, pointers + ["i32"] * 3, dict(GROUP=128, BLOCK_N=8, BLOCK_K=1024), 4)
matmul = (kernels._int4_matmul, pointers + ["i32"] * 5,
          dict(GROUP=128, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, DOT=tl.bfloat16), 4)
for even in (True, False):  # every load unmasked, and masked
    for arch in (80, 90):  # A100, H100/H200
        kernel, types, constants, warps = gemv
        sizes[f"gemv even={even} sm_{arch}"] = cubin_bytes(kernel, types, dict(constants, EVEN_N=even, EVEN_K=even),
                                                           warps, arch)
        kernel, types, constants, warps = matmul
        sizes[f"matmul even={even} sm_{arch}"] = cubin_bytes(kernel, types, dict(constants, EVEN=even), warps, arch)
"""


def test_both_kernels_compile_to_machine_code_for_the_gpus_we_measure_on():
    sizes = cubin_sizes(COMPILE)
    assert len(sizes) == 8 and all(size > 1000 for size in sizes.values()), sizes
