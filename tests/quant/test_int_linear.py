"""Weight-only int8/int4 layers and the quantize_model transform, on tiny random layers.

Tolerances are relative Frobenius errors ||y - y_float|| / ||y_float||. For N(0, 0.02) weights the
expected errors are ~0.5-1% for int8 (step max|w|/127 per row, plus bf16 activations) and ~8-10% for
int4 (step range/15 per group); bounds sit ~3x above that. Against the layer's own dequantized
weight only bf16 rounding remains (< 1%). A seed change could move these a little; a kernel or
packing change that breaks the math moves them by orders of magnitude.
"""
import pytest
import torch
from torch import nn

from qwen2.device import cpu_has_native_bf16, default_dtype
from qwen2.quant import int_linear as quant
from qwen2.quant.int_linear import Int4Linear, Int8Linear, quantize_model, unpack_int4


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def make_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=0.02)
    if bias:
        nn.init.normal_(lin.bias, std=0.02)
    return lin


class Tiny(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 128, tie: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.q_proj = make_linear(dim, dim, bias=True)
        self.o_proj = make_linear(dim, dim, bias=False, seed=1)
        self.lm_head = make_linear(dim, vocab, bias=False, seed=2)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        return self.lm_head(h + self.o_proj(self.q_proj(h)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])  # 40 > the kernels' row limit: the dequantize path
def test_int8_close_to_float(dtype, rows):
    lin = make_linear(256, 96)
    x = torch.randn(rows, 256)
    q = Int8Linear(lin)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert rel_err(y, lin(x)) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int4_close_to_float(dtype, group_size, rows):
    lin = make_linear(256, 80)  # 80 rows: one full 64-row packing block and a 16-row tail
    x = torch.randn(2, rows, 256)  # 3-D input, as the model passes it
    q = Int4Linear(lin, group_size)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, rows, 80)
    assert rel_err(y, lin(x)) < 0.25
    ref = x @ q.dequantize().T + lin.bias  # the layer's own weights: only bf16 rounding left
    assert rel_err(y, ref) < 0.01


def test_int4_unpack_inverts_packing():
    assert quant.int4_layout() is not None  # known layouts: AVX512, AVX2, scalar
    for n in (16, 80, 144):
        q = torch.randint(0, 16, (n, 64), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(unpack_int4(packed, n, *quant.int4_layout()), q.T.to(torch.uint8))


def test_int4_quantization_error_within_half_step():
    lin = make_linear(128, 32)
    q = Int4Linear(lin, 32)
    w = lin.weight.detach().reshape(32, 4, 32)
    half_step = (w.amax(-1) - w.amin(-1)) / 15 / 2
    err = (q.dequantize() - lin.weight.detach()).reshape(32, 4, 32).abs().amax(-1)
    assert (err <= half_step * 1.05 + 1e-6).all()  # 5% slack for bf16 scale/zero rounding


def test_int8_misaligned_input():
    lin = make_linear(256, 32)
    buf = torch.randn(2 * 256 + 8, dtype=torch.bfloat16)
    x = buf[3 : 3 + 2 * 256].view(2, 256)  # 6 bytes off: the raw kernel would segfault
    assert x.data_ptr() % 32
    assert rel_err(Int8Linear(lin)(x), lin(x.float())) < 0.02


@pytest.mark.parametrize("k, n", [(100, 32), (256, 40)])  # in % 128 != 0; out % 16 != 0
def test_int4_falls_back_to_int8(k, n):
    lin = make_linear(k, n)
    model = nn.Sequential(lin)
    ref_bias = lin.bias.detach().clone()
    x = torch.randn(3, k)
    ref = lin(x)
    quantize_model(model, "int4")
    assert isinstance(model[0], Int8Linear)
    assert torch.equal(model[0].bias, ref_bias)
    assert rel_err(model(x), ref) < 0.02  # k = 100 also exercises int8's dequantize path


@pytest.mark.parametrize("mode, cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantize_model_swaps_linears(mode, cls):
    model = Tiny()
    ids = torch.randint(0, 64, (2, 5))
    ref = model(ids)
    q_bias = model.q_proj.bias.detach().clone()
    quantize_model(model, mode)
    assert all(isinstance(getattr(model, n), cls) for n in ("q_proj", "o_proj", "lm_head"))
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert torch.equal(model.q_proj.bias, q_bias) and model.o_proj.bias is None
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert rel_err(model(ids), ref) < (0.02 if mode == "int8" else 0.25)


def test_quantize_model_skip_and_modes():
    model = quantize_model(Tiny(), "int4", skip=lambda name: name == "lm_head")
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.q_proj, Int4Linear)
    model = Tiny()
    assert quantize_model(model, "none") is model and isinstance(model.q_proj, nn.Linear)
    with pytest.raises(ValueError):
        quantize_model(Tiny(), "int3")


def test_tied_embedding_survives_lm_head_quantization():
    model = Tiny(tie=True)
    emb = model.embed_tokens.weight
    before = emb.detach().clone()
    ids = torch.randint(0, 64, (1, 4))
    ref = model(ids)
    quantize_model(model, "int4")
    assert isinstance(model.lm_head, Int4Linear)
    assert model.embed_tokens.weight is emb and emb.dtype == torch.float32
    assert torch.equal(emb, before)
    assert rel_err(model(ids), ref) < 0.25


def test_default_dtype():
    assert default_dtype("cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert isinstance(cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_dequantize_path_matches_kernel(cls, monkeypatch):
    """Above the kernels' row limit the layers dequantize in row blocks; both paths must agree."""
    monkeypatch.setattr(quant, "_DEQUANT_ELEMS", 64 * 128)  # 64-row blocks: 4 of them, the last partial
    lin = make_linear(128, 208)
    layer = cls(lin)
    x = torch.randn(80, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "INT8_KERNEL_MAX_ROWS", 10**6)
    monkeypatch.setattr(quant, "INT4_KERNEL_MAX_ROWS", 10**6)
    kernel = layer(x)
    monkeypatch.setattr(quant, "INT8_KERNEL_MAX_ROWS", 0)
    monkeypatch.setattr(quant, "INT4_KERNEL_MAX_ROWS", 0)
    assert rel_err(layer(x), kernel) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA int4 kernel needs a CUDA device")
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_cuda_int4_computes_its_own_integers(group_size, rows):
    from qwen2.quant.cuda_int4 import CudaInt4Linear

    lin = make_linear(512, 200).cuda()
    layer = quantize_model(nn.Sequential(lin), "int4", group_size)[0]
    assert isinstance(layer, CudaInt4Linear)
    q, scale, zero = quant.quantize_int4(lin.weight.detach(), group_size)
    w = ((q.float() - 8).view(200, -1, group_size) * scale.float()[..., None] + zero.float()[..., None]).view(200, 512)
    x = torch.randn(rows, 512, device="cuda")
    assert rel_err(layer(x), x.to(torch.bfloat16).float() @ w.T + lin.bias) < 0.01  # bf16 activations only
