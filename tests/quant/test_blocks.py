"""Block layers: a model run on GGUF's own quantized blocks computes with the file's weights.

The oracle is the same file dequantized to float32 by gguf-py (what `--quant none` loads), run
through the plain float model. With float32 activations (gguf-f32) logits agree to float32
rounding; with int8 activations (the default) the layer equals the float product of its
int8-rounded activations, and a model's logits move by that rounding only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from qwen2.errors import OptionError
from qwen2.loading import load_model
from qwen2.quant.blocks import (
    Q4_K,
    Q8_0,
    BlockEmbedding,
    BlockLinear,
    bf16_gemm_is_fast,
    dequantize,
    encode_q8_0,
    kernels_available,
    make_blocks,
)
from tests.conftest import tiny_config
from tests.weights.test_gguf_export import MOE, SMALL, random_state

pytestmark = pytest.mark.skipif(not kernels_available(), reason="the GGUF kernels cannot be built on this machine")


def test_q8_0_blocks_are_the_bytes_ggml_writes():
    import numpy as np

    from qwen2.weights.gguf_export import encode

    torch.manual_seed(0)
    w = torch.randn(300, 256) * torch.rand(300, 1) * 3
    w[0, :32] = 0  # a block of zeros: scale 0, every value 0
    w[1, :32] = torch.arange(32) - 15.5  # max 16.5 -> d = 16.5/127: values that land near .5
    w[2, :32] = torch.tensor([127.0, 0.5, 1.5, -2.5, -0.5] + [0.0] * 27)  # d = 1: exact halves round away from 0
    gguf_bytes = np.ascontiguousarray(encode("w", w, Q.Q8_0)).reshape(300, -1)
    ours = encode_q8_0(w, rows=128)  # row blocks that do not divide the rows
    assert ours.shape == gguf_bytes.shape and torch.equal(ours, torch.from_numpy(gguf_bytes))
    assert ours[2, 2:7].view(torch.int8).tolist() == [127, 1, 2, -3, -1]


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def round_to_int8_per_32(x: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel multiplies: each run of 32 rounded to int8 with scale max|x| / 127."""
    runs = x.reshape(*x.shape[:-1], -1, 32)
    amax = runs.abs().amax(-1, keepdim=True)
    q = torch.round(runs * torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0))
    return (q * (amax / 127)).reshape(x.shape)


def agreement_and_kl(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()
    return top1, kl


@pytest.mark.parametrize("qtype", [Q8_0, Q4_K])
def test_int8_activations_equal_float_on_int8_rounded_inputs(qtype):
    torch.manual_seed(0)
    w, bias = torch.randn(80, 512), torch.randn(80)
    b = make_blocks(w, qtype)
    layer = BlockLinear(b.data, b.qtype, 512, bias, activations="int8")
    assert layer.activations == "int8" and not hasattr(layer, "blocks")  # repacked, the file's rows let go
    decoded = dequantize(b.data, b.qtype, 512)
    assert torch.equal(layer.weight_tile(0, 80), decoded)  # every weight kept exactly
    for rows in (1, 3, 4, 9, 16, 32):
        x = torch.randn(rows, 512)
        torch.testing.assert_close(layer(x), F.linear(round_to_int8_per_32(x), decoded, bias), rtol=1e-5, atol=1e-4)
    x = torch.randn(40, 512)  # many rows: GEMMs on tiles, bf16 on bf16 hardware
    want = F.linear(x, decoded, bias)
    if bf16_gemm_is_fast():
        torch.testing.assert_close(layer(x), want, rtol=0.02, atol=0.02 * want.abs().max().item())
    else:
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_rows_not_in_groups_of_8_keep_float32_activations():
    b = make_blocks(torch.randn(12, 64), Q8_0)
    layer = BlockLinear(b.data, b.qtype, 64, activations="int8")
    assert layer.activations == "float32"
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ dequantize(b.data, Q8_0, 64).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q8_0, Q4_K])
def test_the_kernel_and_the_tile_path_both_equal_float_on_the_decoded_weights(qtype):
    torch.manual_seed(0)
    w, bias = torch.randn(80, 512), torch.randn(80)
    b = make_blocks(w, qtype)
    layer = BlockLinear(b.data, b.qtype, 512, bias)  # float32 activations
    decoded = dequantize(b.data, b.qtype, 512)
    assert (decoded - w).abs().max() < (0.02 if qtype == Q8_0 else 0.3)  # a real encoding of w
    for rows in (1, 3, 9, 33):  # 33 rows take the dequantize-a-tile + GEMM path
        x = torch.randn(rows, 512)
        torch.testing.assert_close(layer(x), F.linear(x, decoded, bias), rtol=1e-5, atol=1e-4)
    assert layer(torch.randn(2, 5, 512, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_q4_k_falls_back_to_q8_0_where_256_does_not_divide_the_rows():
    assert make_blocks(torch.randn(4, 96), Q4_K).qtype == Q8_0 and make_blocks(torch.randn(4, 256), Q4_K).qtype == Q4_K


def test_the_embedding_decodes_only_the_looked_up_rows():
    w = torch.randn(300, 64)
    b = make_blocks(w, Q8_0)
    embed = BlockEmbedding(b.data, b.qtype, 64)
    ids = torch.tensor([[5, 299, 5], [0, 1, 2]])
    assert torch.equal(embed(ids), dequantize(b.data, Q8_0, 64)[ids])
    assert embed.weight.shape == (300, 64) and embed.weight.stride() == (0, 0)  # a stand-in, no values


def test_a_tied_embedding_looks_its_rows_up_in_the_heads_repacked_table():
    from qwen2.quant.blocks import compiled_ops

    w = torch.randn(296, 64)
    b = make_blocks(w, Q8_0)
    packed = compiled_ops().repack(b.data, Q8_0, 64)
    embed = BlockEmbedding(packed, Q8_0, 64, packed=True)
    ids = torch.tensor([[5, 295, 5], [0, 8, 7]])
    assert torch.equal(embed(ids), dequantize(b.data, Q8_0, 64)[ids])
    assert embed.weight.shape == (296, 64)


@pytest.mark.parametrize("rows", [1, 16, 100])
def test_the_output_heads_logits_stay_float32_at_any_row_count(rows):
    from qwen2.model import Transformer
    from qwen2.quant.blocks import blocks_from_float, compiled_ops

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=512)).eval()
    blocks_from_float(model, Q8_0, activations="int8")
    head = model.lm_head
    x = torch.randn(rows, 64)  # 16 and more: bf16 tiles on AMX, or past the rows where other layers take a bf16 GEMM
    logits = head(x)
    w = compiled_ops().dequantize_packed(head.packed, Q8_0, 64).double()
    want = x.double() @ w.T
    # within what rounding the inputs costs (bf16: 2^-9 of each factor; int8: half a step of the row's largest)
    bound = (x.double().abs() @ w.abs().T) * 2 ** -7 + x.abs().amax(1, keepdim=True).double() / 254 * w.abs().sum(1)
    assert logits.dtype == torch.float32 and ((logits.double() - want).abs() <= bound + 1e-6).all()
    assert (logits != logits.bfloat16().float()).float().mean() > 0.9  # not rounded to bf16 on the way out
    assert model.model.layers[0].mlp.up_proj.int8_max_rows == 32


@pytest.fixture(scope="module")
def small_q4_k_gguf(tmp_path_factory, byte_tokenizer):
    """A model with 256-wide rows written as Q4_K (96-wide ones as Q5_0): the default file's mix of types."""
    from qwen2.weights.gguf_export import export_gguf

    config = tiny_config(**SMALL)
    path = tmp_path_factory.mktemp("q4k") / "small.gguf"
    export_gguf(config, random_state(config), byte_tokenizer, path, "q4_k")
    return path


def test_a_gguf_in_gguf_f32_mode_gives_the_float32_logits_of_its_decoded_weights(small_q4_k_gguf):
    blocks, _ = load_model(small_q4_k_gguf, quant="gguf-f32")
    floats, _ = load_model(small_q4_k_gguf, quant="none", dtype="float32")
    kinds = {m.extra_repr().split(", ")[2] for m in blocks.modules() if isinstance(m, BlockLinear)}
    assert kinds == {"Q4_K", "Q5_0"}, kinds
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    ids = list(range(3, 40))
    torch.testing.assert_close(logits(blocks, ids), logits(floats, ids), rtol=1e-4, atol=1e-4)


def test_auto_on_a_gguf_is_its_blocks_with_int8_activations_near_the_float_logits(small_q4_k_gguf):
    auto, _ = load_model(small_q4_k_gguf)
    int8, _ = load_model(small_q4_k_gguf, quant="gguf")
    floats, _ = load_model(small_q4_k_gguf, quant="none", dtype="float32")
    assert auto.model.norm.weight.dtype == torch.float32
    assert {m.activations for m in auto.modules() if isinstance(m, BlockLinear)} == {"int8"}
    for ids in ([5, 9, 11], list(range(3, 40))):  # the int8 kernel (few rows) and the tile path
        assert torch.equal(logits(auto, ids), logits(int8, ids))
        top1, kl = agreement_and_kl(logits(int8, ids), logits(floats, ids))
        assert top1 >= 0.9 and kl < 0.01, (len(ids), top1, kl)


def test_moe_experts_stay_blocks_and_the_router_float(tmp_path, byte_tokenizer):
    from qwen2.weights.gguf_export import export_gguf

    config = tiny_config(**SMALL, **MOE)
    path = tmp_path / "moe.gguf"
    export_gguf(config, random_state(config), byte_tokenizer, path, "q8_0")
    net, _ = load_model(path, quant="gguf-f32")
    moe = net.model.layers[0].mlp
    assert isinstance(moe.experts["0"].gate_proj, BlockLinear) and isinstance(moe.shared_expert.up_proj, BlockLinear)
    assert type(moe.gate) is torch.nn.Linear and moe.gate.weight.dtype == torch.float32
    floats, _ = load_model(path, quant="none", dtype="float32")
    ids = list(range(3, 30))
    torch.testing.assert_close(logits(net, ids), logits(floats, ids), rtol=1e-4, atol=1e-4)
    int8, _ = load_model(path, quant="gguf")
    assert isinstance(int8.model.layers[0].mlp.experts["0"].down_proj, BlockLinear)
    top1, kl = agreement_and_kl(logits(int8, ids[:5]), logits(floats, ids[:5]))
    assert top1 >= 0.8 and kl < 0.01


@pytest.mark.parametrize("mode", ["q8_0", "q4_k"])
def test_an_hf_checkpoint_runs_on_blocks_made_at_load_and_cached(tiny_hf, mode):
    first, _ = load_model(tiny_hf, quant=mode)
    assert isinstance(first.model.layers[0].mlp.down_proj, BlockLinear)
    assert isinstance(first.model.embed_tokens, BlockEmbedding)
    assert first.lm_head.packed is first.model.embed_tokens.packed  # tied: one table, repacked
    floats, _ = load_model(tiny_hf, quant="none", dtype="float32")
    ids = list(range(100, 140))
    # quantization changes the logits a little, not the model
    got, want = logits(first, ids), logits(floats, ids)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    second, _ = load_model(tiny_hf, quant=mode)  # mapped from the on-disk cache the first load wrote
    assert torch.equal(logits(second, ids), got)
    assert second.lm_head.packed is second.model.embed_tokens.packed


def test_auto_on_an_hf_checkpoint_is_q8_0_blocks(tiny_hf):
    net, _ = load_model(tiny_hf)
    assert {m.qtype for m in net.modules() if isinstance(m, BlockLinear)} == {int(Q.Q8_0)}


def test_gguf_mode_on_an_hf_checkpoint_says_what_to_use(tiny_hf):
    with pytest.raises(OptionError, match="q8_0 or q4_k"):
        load_model(tiny_hf, quant="gguf")


def test_without_the_kernels_auto_falls_back_to_torchs_int8(monkeypatch, small_q4_k_gguf):
    from qwen2 import quant

    monkeypatch.setattr(quant, "_kernels", lambda: False)
    assert quant.resolve_quant("auto", "cpu", small_q4_k_gguf) == "int8"
    assert quant.resolve_quant("auto", "cpu", small_q4_k_gguf.parent) == "int8"
    with pytest.raises(OptionError, match="needs our compiled kernels"):
        quant.resolve_quant("gguf", "cpu", small_q4_k_gguf)
