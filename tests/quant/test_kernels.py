"""The GGUF block kernels: every block type, every vector ISA this CPU runs, odd shapes, 1 and 2 threads.

The oracle is gguf-py's own dequantizer (the code transformers loads GGUF files with) followed by
a float64 matmul. Blocks come from gguf-py's quantizer where it has one (Q4_0, Q5_0, Q8_0) and
otherwise from random bytes with sane float16 scales, which exercise every bit of the layout.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf import quants

from qwen2.quant.kernels import BLOCKS, available_isas, gguf_ops

ISAS = available_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="this CPU has no AVX2/FMA/F16C: the kernels are not built here")
TYPES = [Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # float16 fields inside a block


def make_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16).view(np.uint8).reshape(rows, -1)
    if qtype == Q.BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    if qtype in SCALE_OFFSETS:
        n_block, n_bytes = BLOCKS[int(qtype)]
        raw = rng.integers(0, 256, size=(rows, cols // n_block, n_bytes), dtype=np.uint8)
        for offset in SCALE_OFFSETS[qtype]:
            scale = (rng.random(raw.shape[:2]) * 0.02 + 0.001).astype(np.float16)
            raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
        return raw.reshape(rows, -1)
    return quants.quantize(values, qtype)


def reference(raw: np.ndarray, qtype: Q, cols: int) -> np.ndarray:
    return quants.dequantize(raw, qtype).reshape(raw.shape[0], cols).astype(np.float64)


def columns(qtype: Q) -> list[int]:
    n_block = BLOCKS[int(qtype)][0]
    return [77, 896] if n_block == 1 else [n_block, 3 * n_block if n_block == 256 else 896]


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=ISAS)
def ops(request):
    ops = gguf_ops(request.param)
    assert ops is not None, f"the {request.param} build failed on a CPU that runs it"
    return ops


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_py_exactly(ops, qtype):
    for cols in columns(qtype):
        raw = make_blocks(qtype, 37, cols)
        ours = ops.dequantize(torch.from_numpy(raw), int(qtype), cols)
        assert torch.equal(ours.double(), torch.from_numpy(reference(raw, qtype, cols)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_equals_dequantize_then_float64_matmul(ops, qtype, threads):
    with torch_threads(threads):
        for cols in columns(qtype):
            raw = make_blocks(qtype, 37, cols, seed=cols)
            w = torch.from_numpy(reference(raw, qtype, cols))
            for rows in (1, 2, 3, 4, 5, 7, 9):
                x = torch.randn(rows, cols)
                y = ops.matmul(x, torch.from_numpy(raw), int(qtype), cols).double()
                # float32 accumulation over `cols` terms: bound the error by the sum of |terms|
                bound = (x.double().abs() @ w.abs().T) * (cols * 2 ** -24 * 4) + 1e-30
                assert ((y - x.double() @ w.T).abs() <= bound).all(), (qtype.name, cols, rows)


INT8_TYPES = [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def rounded_to_int8(x: torch.Tensor) -> torch.Tensor:
    """The int8 kernel's activations in float64: per run of 32, round(x * 127 / max|x|) * max|x| / 127,
    in float32 as the kernel computes them (127 / amax as a true division: torch's `127 / t` takes
    t's reciprocal first, one rounding more, which moves ties)."""
    runs = x.view(x.shape[0], -1, 32)
    amax = runs.abs().amax(-1, keepdim=True)
    q = torch.round(runs * torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0))
    return (q.double() * (amax / 127).double()).view(x.shape)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_repacking_keeps_every_weight_exactly(ops, qtype):
    for cols in columns(qtype):
        raw = make_blocks(qtype, 40, cols, seed=cols + 1)
        packed = ops.repack(torch.from_numpy(raw), int(qtype), cols)
        want = torch.from_numpy(reference(raw, qtype, cols))
        assert torch.equal(ops.dequantize_packed(packed, int(qtype), cols).double(), want)
        assert torch.equal(ops.dequantize_packed(packed, int(qtype), cols, True), want.to(torch.bfloat16))
        buffer = torch.full((40 * cols + 7,), float("nan"), dtype=torch.bfloat16)  # a reused, larger scratch
        into = ops.dequantize_packed(packed, int(qtype), cols, True, buffer)
        assert torch.equal(into, want.to(torch.bfloat16)) and into.data_ptr() == buffer.data_ptr()
        with pytest.raises(RuntimeError, match="into must be"):
            ops.dequantize_packed(packed, int(qtype), cols, True, buffer[: 40 * cols - 1])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_int8_matmul_equals_float64_on_the_rounded_activations(ops, qtype, threads):
    with torch_threads(threads):
        for cols in columns(qtype):
            raw = make_blocks(qtype, 40, cols, seed=cols)
            w = torch.from_numpy(reference(raw, qtype, cols))
            packed = ops.repack(torch.from_numpy(raw), int(qtype), cols)
            for rows in (1, 2, 3, 4, 5, 7, 9, 16, 33):
                x = torch.randn(rows, cols) * torch.rand(rows, 1) * 10
                x[0, :32] = 0  # an all-zero run: scale 0, no division by it
                xq = rounded_to_int8(x)
                y = ops.matmul_int8(x, packed, int(qtype), cols).double()
                # exact int32 sums, float32 scaling and accumulation over the runs
                bound = (xq.abs() @ w.abs().T) * (cols / 32 * 2 ** -24 * 8) + 1e-30
                assert ((y - xq @ w.T).abs() <= bound).all(), (qtype.name, cols, rows)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_many_rows_on_amx_take_bf16_tiles_of_the_decoded_weights(ops, qtype):
    """From 16 rows, a matrix of whole 32-row blocks is multiplied on AMX bf16 tiles: the activations and the
    decoded weights each rounded to bf16 once, the products summed in float32; fewer rows stay int8."""
    if not ops.tiles():
        pytest.skip("this build or CPU has no AMX bf16 tiles: many rows take the int8 products")
    for cols in columns(qtype):
        raw = make_blocks(qtype, 96, cols, seed=cols + 2)
        packed = ops.repack(torch.from_numpy(raw), int(qtype), cols)
        w = ops.dequantize_packed(packed, int(qtype), cols, True).double()
        for rows in (16, 17, 33, 50, 64):
            x = torch.randn(rows, cols) * torch.rand(rows, 1) * 10
            y = ops.matmul_int8(x, packed, int(qtype), cols).double()
            xb = x.bfloat16().double()
            bound = (xb.abs() @ w.abs().T) * (cols * 2 ** -24 * 2) + 1e-30
            assert ((y - xb @ w.T).abs() <= bound).all(), (qtype.name, cols, rows)
    x = torch.randn(15, cols)  # below the tiles: int8, which is not the bf16 result
    assert not torch.allclose(ops.matmul_int8(x, packed, int(qtype), cols).double(), x.bfloat16().double() @ w.T,
                              rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [5, 40])
def test_stacked_matrices_give_each_ones_product_side_by_side(ops, rows):
    cols = 96
    mats = [ops.repack(torch.from_numpy(make_blocks(t, n, cols, seed=n)), int(t), cols)
            for t, n in ((Q.Q8_0, 64), (Q.Q5_0, 32), (Q.Q4_0, 96))]
    types = [int(Q.Q8_0), int(Q.Q5_0), int(Q.Q4_0)]
    x = torch.randn(rows, cols)
    alone = torch.cat([ops.matmul_int8(x, m, t, cols) for m, t in zip(mats, types)], dim=1)
    assert torch.equal(ops.matmul_stacked(x, mats, types, cols), alone)
    if ops.tiles() and rows >= 16:  # the tiles read bf16 rows as they are
        assert torch.equal(ops.matmul_stacked(x.bfloat16(), mats, types, cols), alone)
    with pytest.raises(RuntimeError, match="one qtype for each"):
        ops.matmul_stacked(x, mats, types[:2], cols)


@pytest.mark.parametrize("rows", [5, 17, 40])
def test_the_gated_product_is_silu_of_gate_times_up_rounded_once(ops, rows):
    """SiLU(x Wgate) * (x Wup) to bf16 in one call (with AMX, both products stay in the tiles) equals the two
    products side by side, then SiLU-times-up: to the bit, gate and up of different block types."""
    cols = 512
    gate = ops.repack(torch.from_numpy(make_blocks(Q.Q4_K, 96, cols, seed=1)), int(Q.Q4_K), cols)
    up = ops.repack(torch.from_numpy(make_blocks(Q.Q6_K, 96, cols, seed=2)), int(Q.Q6_K), cols)
    x = torch.randn(rows, cols)
    got = ops.gated_product(x, gate, up, int(Q.Q4_K), int(Q.Q6_K), cols)
    want = ops.silu_mul_bf16(ops.matmul_stacked(x, [gate, up], [int(Q.Q4_K), int(Q.Q6_K)], cols))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="as many rows"):
        ops.gated_product(x, gate, up[:4], int(Q.Q4_K), int(Q.Q6_K), cols)


def float64_attention(q, k, v, positions):
    """(B, H, T, hd) queries against (B, G, S, hd) keys, query t seeing keys 0..positions[b, t] -> (B, T, H, hd)"""
    heads, groups, hd = q.shape[1], k.shape[1], q.shape[-1]
    k, v = (x.double().repeat_interleave(heads // groups, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / hd**0.5
    seen = torch.arange(k.shape[2])[None, None] <= positions[:, :, None]
    return (scores.masked_fill(~seen[:, None], float("-inf")).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("batch, heads, groups, rows, keys, hd", [
    (1, 14, 2, 512, 512, 64),  # a Qwen2-0.5B layer's prompt
    (1, 4, 2, 17, 17, 64),  # rows past a whole tile
    (1, 14, 2, 33, 300, 64),  # a second chunk after a cached prefix
    (2, 4, 1, 50, 80, 128),  # two prompts of different lengths in one batch, head_dim 128
])
def test_attention_on_tiles_is_as_near_float64_as_float32s(ops, batch, heads, groups, rows, keys, hd):
    """A prompt's attention on AMX tiles, each operand split into bf16 parts, is as near float64 as torch's
    float32 attention is, with scores of tens to hundreds (a large key bias shared by every key, as Qwen2's)."""
    if not ops.tiles():
        pytest.skip("this build or CPU has no AMX bf16 tiles: prompts take torch's float32 attention")
    torch.manual_seed(rows)
    q = torch.randn(batch, heads, rows, hd) * 4
    k = torch.randn(batch, groups, keys, hd) + torch.randn(1, groups, 1, hd) * 4
    v = torch.randn(batch, groups, keys, hd)
    positions = torch.arange(keys - rows, keys).repeat(batch, 1)
    if batch == 2:
        positions[1] = torch.arange(rows)  # the second prompt is shorter: it sees its own keys only
    want = float64_attention(q, k, v, positions)
    seen = torch.arange(keys)[None, None] <= positions[:, :, None]
    torch_float32 = F.scaled_dot_product_attention(q, k, v, attn_mask=seen[:, None], enable_gqa=True).transpose(1, 2)
    got = ops.attention_tiles(q, k, v, positions, hd**-0.5)
    assert got.shape == (batch, rows, heads, hd) and got.dtype == torch.float32
    with torch_threads(1):  # each block of rows is computed alone: the same to the bit on any thread count
        assert torch.equal(ops.attention_tiles(q, k, v, positions, hd**-0.5), got)
    ours, theirs = (got.double() - want).abs().max(), (torch_float32.double() - want).abs().max()
    # 3e-5: P V takes two parts of each (16 bits); q.k in two parts instead of three was off by 2.6e-4 here
    assert ours <= 2 * theirs + 3e-5, (ours, theirs)


def test_attention_on_tiles_refuses_what_it_cannot_take(ops):
    q, k, positions = torch.randn(1, 4, 16, 64), torch.randn(1, 2, 16, 64), torch.arange(16)[None]
    if not ops.tiles():
        with pytest.raises(RuntimeError, match="no AMX"):
            ops.attention_tiles(q, k, k, positions, 0.125)
        return
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.attention_tiles(q[..., :32], k[..., :32], k[..., :32], positions, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        ops.attention_tiles(q.bfloat16(), k, k, positions, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ops.attention_tiles(torch.randn(1, 3, 16, 64), k, k, positions, 0.125)
    with pytest.raises(RuntimeError, match="positions"):
        ops.attention_tiles(q, k, k, positions[:, :8], 0.125)
    with pytest.raises(RuntimeError, match=">= 0"):
        ops.attention_tiles(q, k, k, positions - 1, 0.125)


@pytest.mark.parametrize("vocabulary", [1003, 4096])
def test_softmax_cross_entropy_on_bf16_logits_equals_float64(ops, vocabulary):
    """The training loss's softmax in one call: per row the nll (logsumexp - the target's logit) as float64
    computes it from the same bf16 logits, and the gradient w (softmax - one_hot) within one bf16 rounding."""
    torch.manual_seed(vocabulary)
    logits = (torch.randn(6, vocabulary) * 8).bfloat16()
    logits[2, 5] = 60  # one token far ahead: its probability near 1, its gradient near 0
    targets = torch.tensor([0, vocabulary - 1, 5, 17, 17, 3])
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0])
    exact = logits.double()
    grad = logits.clone()
    nll = ops.softmax_cross_entropy_(grad, targets, weights)  # the logits become their gradient
    lse = exact.logsumexp(-1)
    assert torch.allclose(nll.double(), lse - exact.gather(1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    want = (exact - lse[:, None]).exp()
    want[torch.arange(6), targets] -= 1
    want *= weights[:, None].double()
    assert grad.dtype == torch.bfloat16
    # a bf16 rounding, and float32's for p - 1 near p = 1 (the far-ahead token's exact -1.4e-14 comes out 0)
    assert ((grad.double() - want).abs() <= want.abs() * 2**-8 + weights[:, None].double() * 2**-23).all()
    with pytest.raises(RuntimeError, match=r"in \[0, V\)"):
        ops.softmax_cross_entropy_(logits, targets + vocabulary, weights)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.softmax_cross_entropy_(logits.float(), targets, weights)


def test_int8_kernels_refuse_what_they_cannot_take(ops):
    raw = torch.from_numpy(make_blocks(Q.Q8_0, 12, 64))
    with pytest.raises(RuntimeError, match="groups of 8"):
        ops.repack(raw, int(Q.Q8_0), 64)
    with pytest.raises(RuntimeError, match="no integer kernel"):
        ops.repack(torch.from_numpy(make_blocks(Q.F16, 8, 64)), int(Q.F16), 64)
    packed = ops.repack(raw[:8], int(Q.Q8_0), 64)
    with pytest.raises(RuntimeError, match="packed weights"):
        ops.matmul_int8(torch.randn(1, 96), packed, int(Q.Q8_0), 96)
    assert ops.matmul_int8(torch.empty(0, 64), packed, int(Q.Q8_0), 64).shape == (0, 8)


def test_a_view_of_rows_and_empty_inputs_work(ops):
    raw = torch.from_numpy(make_blocks(Q.Q8_0, 40, 64))
    x = torch.randn(3, 64)
    full = ops.matmul(x, raw, int(Q.Q8_0), 64)
    assert torch.equal(ops.matmul(x, raw[10:20], int(Q.Q8_0), 64), full[:, 10:20])
    assert ops.matmul(torch.empty(0, 64), raw, int(Q.Q8_0), 64).shape == (0, 40)


def test_wrong_shapes_and_types_are_refused(ops):
    raw = torch.from_numpy(make_blocks(Q.Q8_0, 4, 64))
    with pytest.raises(RuntimeError, match="bytes"):
        ops.matmul(torch.randn(1, 96), raw, int(Q.Q8_0), 96)
    with pytest.raises(RuntimeError, match="no kernel"):
        ops.matmul(torch.randn(1, 64), raw, int(Q.Q2_K), 64)
    with pytest.raises(RuntimeError, match="float32"):
        ops.matmul(torch.randn(1, 64, dtype=torch.float64), raw, int(Q.Q8_0), 64)


def test_the_build_is_cached_and_keyed_by_source_flags_and_cpu(monkeypatch):
    from qwen2.quant import kernels

    name, folder = kernels._build_dir(ISAS[0])
    assert (folder / f"{name}.so").exists()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "another_cpu"}))
    assert kernels._build_dir(ISAS[0])[0] != name


def test_without_a_compiler_there_is_one_warning_and_no_kernels(monkeypatch):
    from qwen2.quant import kernels

    monkeypatch.setattr(kernels.shutil, "which", lambda _: None)
    monkeypatch.setattr(kernels, "_LOADED", {})  # as in a process that has not built them yet
    monkeypatch.setattr(kernels, "_FAILED", set())
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert kernels.gguf_ops() is None
    assert kernels.gguf_ops() is None  # remembered: no second attempt, no second warning


def test_one_build_per_isa_per_process_whatever_the_cache_folder(monkeypatch, tmp_path):
    from qwen2.quant import kernels

    first = gguf_ops(ISAS[0])
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))  # a second library with the same ops would abort
    assert gguf_ops(ISAS[0]) is first and gguf_ops() is kernels.gguf_ops(ISAS[0])


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    from qwen2.quant.kernels import clear_stale_lock

    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_lock(tmp_path) and lock.exists()  # a build may be running now: wait for it
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path) and not lock.exists()
    assert not clear_stale_lock(tmp_path)  # no lock, nothing to do


def test_each_torch_installation_builds_in_its_own_folder(monkeypatch, tmp_path):
    """Two environments sharing one build folder would make ninja rebuild it at each switch."""
    import torch

    from qwen2.quant import kernels

    isa = kernels.available_isas()[0] if kernels.available_isas() else "avx2"
    here = kernels._build_dir(isa)[0]
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "another-venv" / "torch" / "__init__.py"))
    assert kernels._build_dir(isa)[0] != here
