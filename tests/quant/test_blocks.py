"""Block layers: a model run on GGUF's own quantized blocks computes with exactly the file's weights.

The oracle is the same file dequantized to float32 by gguf-py (what `--quant none` loads), run
through the plain float model; logits agree to float32 rounding, not to a quantization error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from qwen2.errors import OptionError
from qwen2.loading import load_model
from qwen2.quant.blocks import Q4_K, Q8_0, BlockEmbedding, BlockLinear, dequantize, kernels_available, make_blocks
from tests.conftest import tiny_config
from tests.weights.test_gguf_export import MOE, SMALL, random_state

pytestmark = pytest.mark.skipif(not kernels_available(), reason="the GGUF kernels cannot be built on this machine")


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


@pytest.mark.parametrize("qtype", [Q8_0, Q4_K])
def test_the_kernel_and_the_tile_path_both_equal_float_on_the_decoded_weights(qtype):
    torch.manual_seed(0)
    w, bias = torch.randn(80, 512), torch.randn(80)
    b = make_blocks(w, qtype)
    layer = BlockLinear(b.data, b.qtype, 512, bias)
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


@pytest.fixture(scope="module")
def small_q4_k_gguf(tmp_path_factory, byte_tokenizer):
    """A model with 256-wide rows written as Q4_K (96-wide ones as Q5_0): the default file's mix of types."""
    from qwen2.weights.gguf_export import export_gguf

    config = tiny_config(**SMALL)
    path = tmp_path_factory.mktemp("q4k") / "small.gguf"
    export_gguf(config, random_state(config), byte_tokenizer, path, "q4_k")
    return path


def test_a_gguf_in_gguf_mode_gives_the_float32_logits_of_its_decoded_weights(small_q4_k_gguf):
    blocks, _ = load_model(small_q4_k_gguf, quant="gguf")
    floats, _ = load_model(small_q4_k_gguf, quant="none", dtype="float32")
    kinds = {m.extra_repr().split(", ")[2] for m in blocks.modules() if isinstance(m, BlockLinear)}
    assert kinds == {"Q4_K", "Q5_0"}, kinds
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    ids = list(range(3, 40))
    torch.testing.assert_close(logits(blocks, ids), logits(floats, ids), rtol=1e-4, atol=1e-4)
    # auto on a GGUF on CPU means exactly this, in float32
    auto, _ = load_model(small_q4_k_gguf)
    assert auto.model.norm.weight.dtype == torch.float32
    assert torch.equal(logits(auto, ids), logits(blocks, ids))


def test_moe_experts_stay_blocks_and_the_router_float(tmp_path, byte_tokenizer):
    from qwen2.weights.gguf_export import export_gguf

    config = tiny_config(**SMALL, **MOE)
    path = tmp_path / "moe.gguf"
    export_gguf(config, random_state(config), byte_tokenizer, path, "q8_0")
    net, _ = load_model(path, quant="gguf")
    moe = net.model.layers[0].mlp
    assert isinstance(moe.experts["0"].gate_proj, BlockLinear) and isinstance(moe.shared_expert.up_proj, BlockLinear)
    assert type(moe.gate) is torch.nn.Linear and moe.gate.weight.dtype == torch.float32
    floats, _ = load_model(path, quant="none", dtype="float32")
    ids = list(range(3, 30))
    torch.testing.assert_close(logits(net, ids), logits(floats, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["q8_0", "q4_k"])
def test_an_hf_checkpoint_runs_on_blocks_made_at_load_and_cached(tiny_hf, mode):
    first, _ = load_model(tiny_hf, quant=mode)
    assert isinstance(first.model.layers[0].mlp.down_proj, BlockLinear)
    assert isinstance(first.model.embed_tokens, BlockEmbedding)
    assert first.lm_head.blocks is first.model.embed_tokens.blocks  # tied: one table
    floats, _ = load_model(tiny_hf, quant="none", dtype="float32")
    ids = list(range(100, 140))
    # quantization changes the logits a little, not the model
    got, want = logits(first, ids), logits(floats, ids)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    second, _ = load_model(tiny_hf, quant=mode)  # mapped from the on-disk cache the first load wrote
    assert torch.equal(logits(second, ids), got)
    assert second.lm_head.blocks is second.model.embed_tokens.blocks


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
