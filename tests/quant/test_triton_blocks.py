"""A GGUF file's own blocks on CUDA through our Triton kernels (qwen2.quant.triton_blocks), against
gguf-py's decoding and our CPU kernels on the same bytes.

On a CUDA machine the kernels run compiled on the GPU; elsewhere in Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set by tests/conftest.py before Triton loads). Speed is measured on a
GPU by bench/gpu_check.py (part "gguf"), never here.
"""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="Triton is a dev dependency (pip install -e '.[dev]'); no wheel here")

from gguf import GGMLQuantizationType, dequantize  # noqa: E402

from qwen2.config import Qwen2Config  # noqa: E402
from qwen2.loading import _read_and_build  # noqa: E402
from qwen2.model import Transformer  # noqa: E402
from qwen2.planner import linear_bytes  # noqa: E402
from qwen2.quant import CUDA_BLOCK_TYPES  # noqa: E402
from qwen2.quant import triton_blocks as kernels  # noqa: E402
from qwen2.quant.blocks import BlockEmbedding, BlockLinear  # noqa: E402
from qwen2.quant.kernels import BLOCKS, TYPE_NAMES  # noqa: E402
from qwen2.weights.gguf import load_gguf  # noqa: E402
from qwen2.weights.gguf_export import export_gguf  # noqa: E402
from tests.gpu_compile import cubin_sizes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before Triton loads"
TYPES = [pytest.param(t, id=TYPE_NAMES[t]) for t in CUDA_BLOCK_TYPES]
# where each type's float16 fields lie in its block (random bytes there could be NaN or infinity)
HALVES = {2: (0,), 6: (0,), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}
# Many rows multiply tiles: on the GPU float32 activations are multiplied exactly as well ("ieee")
TILE_TOLERANCE = 1e-5


def random_blocks(qtype: int, rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Rows of random bytes in `qtype`'s blocks, every quant and scale bit pattern possible, their
    float16 fields finite halves in (-1, 1)."""
    rng = np.random.default_rng(seed)
    per_block, block_bytes = BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(rows, columns // per_block, block_bytes), dtype=np.uint8)
    for at in HALVES[qtype]:
        half = rng.uniform(-1, 1, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, at:at + 2] = half.view(np.uint8).reshape(*raw.shape[:2], 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def reference(blocks: torch.Tensor, qtype: int, columns: int) -> torch.Tensor:
    """gguf-py's decoding of the same bytes, float64."""
    w = dequantize(blocks.numpy(), GGMLQuantizationType(qtype))
    return torch.from_numpy(w.astype(np.float64)).view(blocks.shape[0], columns)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("qtype", TYPES)
def test_every_type_decodes_to_gguf_pys_weights_bit_for_bit(qtype):
    blocks = random_blocks(qtype, 7, 768)
    got = kernels.dequantize_rows(blocks.to(DEVICE), qtype, 768)
    assert got.dtype == torch.float32 and torch.equal(got.double().cpu(), reference(blocks, qtype, 768))


# columns whose groups the kernel's steps along K tile, and (blocks of 32 weights) columns they do not
@pytest.mark.parametrize("qtype, n, k", [pytest.param(t, 40, 768, id=f"{TYPE_NAMES[t]}-768") for t in CUDA_BLOCK_TYPES]
                         + [pytest.param(t, 36, 352, id=f"{TYPE_NAMES[t]}-352") for t in CUDA_BLOCK_TYPES
                            if BLOCKS[t][0] == 32])
def test_one_row_is_the_decoded_weights_product_to_float32_rounding(qtype, n, k):
    blocks = random_blocks(qtype, n, k)
    x = torch.randn(1, k)
    y = kernels.blocks_matmul(x.to(DEVICE), blocks.to(DEVICE), qtype, k)
    assert y.shape == (1, n) and y.dtype == torch.float32
    assert rel_err(y, x.double() @ reference(blocks, qtype, k).T) < 1e-5


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [2, 19])
def test_many_rows_multiply_decoded_tiles_with_float32_sums(qtype, rows):
    blocks = random_blocks(qtype, 72, 512, seed=1)
    x = torch.randn(rows, 512)
    y = kernels.blocks_matmul(x.to(DEVICE), blocks.to(DEVICE), qtype, 512)
    assert y.shape == (rows, 72) and rel_err(y, x.double() @ reference(blocks, qtype, 512).T) < TILE_TOLERANCE


@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_activations_come_back_in_bf16_within_its_rounding(rows):
    blocks = random_blocks(12, 48, 512, seed=4)
    x = torch.randn(rows, 512).bfloat16()
    y = kernels.blocks_matmul(x.to(DEVICE), blocks.to(DEVICE), 12, 512)
    assert y.dtype == torch.bfloat16 and rel_err(y, x.double() @ reference(blocks, 12, 512).T) < 1e-2


@pytest.mark.parametrize("config", kernels.GEMV_CONFIGS, ids=str)
def test_every_one_row_configuration_the_tuner_may_pick(config):
    block_n, span, _ = config
    for qtype in (6, 14):  # groups of 32 and of 16
        blocks = random_blocks(qtype, 36, 1280, seed=2)
        x = torch.randn(1, 1280)
        y = kernels.blocks_matmul(x.to(DEVICE), blocks.to(DEVICE), qtype, 1280,
                                  config=dict(BLOCK_N=block_n, SPAN=span))
        assert rel_err(y, x.double() @ reference(blocks, qtype, 1280).T) < 1e-5


@pytest.mark.parametrize("config", kernels.MATMUL_CONFIGS, ids=str)
def test_every_many_rows_configuration_the_tuner_may_pick(config):
    block_m, block_n, block_k, _, _ = config
    blocks = random_blocks(12, 72, 768, seed=3)
    x = torch.randn(20, 768)
    y = kernels.blocks_matmul(x.to(DEVICE), blocks.to(DEVICE), 12, 768,
                              config=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k))
    assert rel_err(y, x.double() @ reference(blocks, 12, 768).T) < TILE_TOLERANCE


@pytest.fixture(scope="module")
def default_blocks(default_gguf):
    """The default model's (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) matrices as its file holds them."""
    _, state, _ = load_gguf(default_gguf, keep=frozenset(CUDA_BLOCK_TYPES))
    return state


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                  "model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_default_models_matrices_equal_our_cpu_block_layers(default_blocks, name, rows):
    b = default_blocks[f"{name}.weight"]
    part = b.data[:48]  # a matrix's first rows: each row is its own blocks, and the interpreter is slow
    bias = default_blocks.get(f"{name}.bias")
    bias = None if bias is None else bias[:48]
    cpu = BlockLinear(part.clone(), b.qtype, b.shape[1], bias)
    ours = kernels.TritonBlockLinear(part.to(DEVICE), b.qtype, b.shape[1], None if bias is None else bias.to(DEVICE))
    x = torch.randn(rows, b.shape[1])
    torch.testing.assert_close(ours(x.to(DEVICE)).cpu(), cpu(x), rtol=1e-5, atol=1e-5)


def test_the_default_models_types_all_have_a_kernel(default_blocks):
    types = {b.qtype for b in default_blocks.values() if hasattr(b, "qtype")}
    assert types == {6, 8, 12, 14}  # Q5_0, Q8_0, Q4_K, Q6_K: nothing of the file falls back to float


def test_embedding_rows_are_decoded_on_lookup(default_blocks):
    b = default_blocks["model.embed_tokens.weight"]
    cpu = BlockEmbedding(b.data, b.qtype, b.shape[1])
    ours = kernels.TritonBlockEmbedding(b.data.to(DEVICE), b.qtype, b.shape[1], torch.bfloat16)
    tokens = torch.tensor([[0, 151935, 9707], [13, 13, 100]])  # the first row, the last, a repeat
    got = ours(tokens.to(DEVICE))
    assert got.shape == (2, 3, 896) and got.dtype == torch.bfloat16
    assert torch.equal(got.cpu(), cpu(tokens).bfloat16())
    assert ours.weight.shape == (151936, 896) and ours.weight.dtype == torch.bfloat16  # the model reads these


@pytest.mark.parametrize("rows", [1, 5])
def test_a_stack_computes_its_layers_outputs_side_by_side_and_they_still_run_alone(rows):
    sizes = (64, 16, 16)  # q, k and v of 4 query heads and 1 KV head of 16
    layers = [kernels.TritonBlockLinear(random_blocks(6, n, 256, seed=i).to(DEVICE), 6, 256,
                                        None if i == 2 else torch.randn(n, device=DEVICE))
              for i, n in enumerate(sizes)]
    x = torch.randn(rows, 256, device=DEVICE)
    alone = [layer(x) for layer in layers]
    stack = kernels.TritonBlockLinear.stack(layers)
    assert stack.out_features == 96 and layers[1].blocks.data_ptr() == stack.blocks[64].data_ptr()  # views
    torch.testing.assert_close(stack(x), torch.cat(alone, dim=-1), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(layer(x), y) for layer, y in zip(layers, alone))
    other = kernels.TritonBlockLinear(random_blocks(8, 16, 256).to(DEVICE), 8, 256)
    assert kernels.TritonBlockLinear.stack([layers[0], other]) is None  # Q5_0 beside Q8_0


def test_what_the_kernels_cannot_take_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no Triton kernel for Q4_1 blocks; these types have one: Q8_0, Q6_K"):
        kernels.dequantize_rows(torch.zeros(2, 20, dtype=torch.uint8), 3, 32)
    with pytest.raises(ValueError, match="expected uint8 rows of 68 bytes holding 64 Q8_0 weights"):
        kernels.TritonBlockLinear(torch.zeros(2, 70, dtype=torch.uint8), 8, 64)


def test_no_rows_give_no_rows():
    blocks = random_blocks(8, 16, 64).to(DEVICE)
    assert kernels.blocks_matmul(torch.empty(0, 64, device=DEVICE), blocks, 8, 64).shape == (0, 16)


@pytest.mark.parametrize("type", ["q8_0", "q4_k"])
def test_a_gguf_loads_onto_these_layers_with_the_logits_of_its_exact_cpu_path(type, byte_tokenizer, tmp_path):
    # the loader's own path for CUDA (its block_kernels="triton"), here on the interpreter's CPU tensors
    config = Qwen2Config(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path / "m.gguf"
    counts = export_gguf(config, Transformer(config).state_dict(), byte_tokenizer, path, type)
    assert counts[type.upper()] == 15  # 14 projections and the embedding, the output head tied to it
    exact, _ = _read_and_build(path, "gguf-f32", torch.float32, torch.device("cpu"), None)
    ours, _ = _read_and_build(path, "gguf", torch.float32, torch.device(DEVICE), None, "triton")
    layers = [m for m in ours.modules() if isinstance(m, kernels.TritonBlockLinear)]
    assert len(layers) == 15 and isinstance(ours.model.embed_tokens, kernels.TritonBlockEmbedding)
    assert ours.lm_head.blocks.data_ptr() == ours.model.embed_tokens.blocks.data_ptr()  # one table, shared
    # what the memory planner sizes each matrix as is what the device holds
    assert all(m.blocks.numel() == linear_bytes(m.out_features, m.in_features, False, type, "float32") for m in layers)
    floats = [t for t in (*ours.parameters(), *ours.buffers()) if t.is_floating_point() and t.dim() == 2]
    assert not floats  # no float matrix: the norms and biases are vectors, the rotary tables are buffers of 1 dim
    tokens = torch.tensor([[1, 200, 319, 7, 42, 3]])
    with torch.no_grad():
        want, got = exact(tokens), ours(tokens.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_the_engine_decodes_a_gguf_on_these_layers_as_on_its_exact_cpu_path(byte_tokenizer, tmp_path):
    from qwen2.engine.engine import Engine
    from qwen2.engine.sampling import SamplingParams
    from qwen2.engine.triton_decode import TritonDecode

    config = Qwen2Config(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():  # sharper logits than the default init, so greedy tokens vary
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.2)
    path = tmp_path / "m.gguf"
    export_gguf(config, model.state_dict(), byte_tokenizer, path, "q4_k")

    def greedy(net: Transformer) -> list[list[int]]:
        engine = Engine(net, byte_tokenizer, max_concurrency=2, max_seq_len=64, prefill_chunk=32, static_decode=False)
        generator = torch.Generator().manual_seed(1)
        requests = [engine.submit(torch.randint(0, 320, (n,), generator=generator).tolist(),
                                  SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)) for n in (5, 17)]
        while engine.has_work:
            engine.step()
        return [r.output for r in requests]

    exact, _ = _read_and_build(path, "gguf-f32", torch.float32, torch.device("cpu"), None)
    ours, _ = _read_and_build(path, "gguf", torch.float32, torch.device(DEVICE), None, "triton")
    ours.decode_step = TritonDecode(ours)  # as --kernels triton attaches it
    with torch.inference_mode():
        want, got = greedy(exact), greedy(ours)
    assert got == want and len({t for row in want for t in row}) > 3  # tokens that vary, not one repeated


COMPILE = """
from qwen2.quant import CUDA_BLOCK_TYPES
from qwen2.quant import triton_blocks as kernels

for qtype in CUDA_BLOCK_TYPES:
    shared = dict(QTYPE=qtype, GROUP=kernels.group_size(qtype))
    for arch in (80, 90) if qtype == 12 else (90,):  # A100 for one type, H100/H200 for all
        sizes[f"gemv {qtype} sm_{arch}"] = cubin_bytes(kernels._blocks_gemv, ["*bf16", "*u8", "*bf16"] + ["i32"] * 3,
                                                       dict(shared, BLOCK_N=8, SPAN=256), 4, arch)
        sizes[f"matmul {qtype} sm_{arch}"] = cubin_bytes(
            kernels._blocks_matmul, ["*bf16", "*u8", "*bf16"] + ["i32"] * 5,
            dict(shared, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, DOT=tl.bfloat16), 4, arch)
        sizes[f"rows {qtype} sm_{arch}"] = cubin_bytes(kernels._blocks_rows, ["*u8", "*bf16", "i32", "i32"],
                                                       dict(shared, GROUPS=8), 4, arch)
"""


def test_the_kernels_compile_to_machine_code_for_the_gpus_we_measure_on():
    sizes = cubin_sizes(COMPILE)
    assert len(sizes) == 3 * 7 and all(size > 1000 for size in sizes.values()), sizes
