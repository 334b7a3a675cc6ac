"""Dual Chunk Attention equals a naive float64 reference and, within one chunk, ordinary attention."""

import math

import pytest
import torch
import torch.nn.functional as F

import qwen2.dca as dca
from qwen2.dca import DCAConfig, dca_attention, dca_key_rotation, dca_query_positions
from qwen2.errors import ConfigError
from qwen2.rope import apply_rotary, default_inv_freq, rotary_cos_sin

HD, H, N_KV = 16, 4, 2
INV_FREQ = default_inv_freq(HD, 10000.0)
CFG = DCAConfig(chunk_size=16, local_size=4)  # chunk_len 12


def naive_dca(q_raw, k_raw, v, q_pos, k_pos, attention_scaling, cfg, seq_lens=None):
    """Remap the positions of every (query, key) pair, one full score matrix, one softmax (float64).

    Uses <R(a) q, R(b) k> = <R(a - b) q, k>: the query is turned by the pair's remapped distance.
    """
    L, C = cfg.chunk_len, cfg.chunk_size
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, S)
    gap, local = qp // L - kp // L, qp % L
    q_at = torch.where(gap == 0, local, torch.where(gap == 1, (local + L).clamp(max=C),
                                                     torch.full_like(local, min(2 * L - 1, C))))
    angle = (q_at - kp % L)[..., None].double() * INV_FREQ.double()  # (B, T, S, hd/2)
    cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
    q = q_raw.double()[:, :, :, None, :]  # (B, H, T, 1, hd)
    half = q.shape[-1] // 2
    q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin  # (B, H, T, S, hd)
    rep = q_raw.shape[1] // k_raw.shape[1]
    k = k_raw.double().repeat_interleave(rep, 1)[:, :, None]  # (B, H, 1, S, hd)
    if seq_lens is None:
        seq_lens = q_pos.max(-1).values + 1
    f = cfg.length_scale(seq_lens).double()
    scores = (q * k).sum(-1) * attention_scaling ** 2 * q_raw.shape[-1] ** -0.5 * (f ** 2)[:, None, None, None]
    scores = scores.masked_fill(~(kp <= qp)[:, None], -math.inf)
    return torch.softmax(scores, -1) @ v.double().repeat_interleave(rep, 1)


def make(B, T, S, offsets=None, dtype=torch.float32, seed=0):
    """Random q, k, v where the queries are the last T of each row's S keys (ending at offsets[b])."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, HD, generator=g).to(dtype)
    k = torch.randn(B, N_KV, S, HD, generator=g).to(dtype)
    v = torch.randn(B, N_KV, S, HD, generator=g).to(dtype)
    ends = torch.tensor(offsets if offsets is not None else [S] * B)
    q_pos = ends[:, None] - T + torch.arange(T)  # (B, T)
    k_pos = torch.arange(S).expand(B, S)  # cache slots: index == position
    return q, k, v, q_pos, k_pos


def run(q, k, v, q_pos, k_pos, cfg=CFG, scaling=1.0, fn=dca_attention, **kw):
    cached_k = dca_key_rotation(k, k_pos, INV_FREQ, scaling, cfg)
    return fn(q, cached_k, v, q_pos, k_pos, INV_FREQ, scaling, cfg, **kw)


@pytest.mark.parametrize("T, S", [(70, 70), (25, 70), (12, 24), (13, 37), (5, 50), (1, 70), (1, 13), (1, 25)])
def test_matches_naive_reference(T, S):
    q, k, v, q_pos, k_pos = make(1, T, S)
    got = run(q, k, v, q_pos, k_pos)
    torch.testing.assert_close(got.double(), naive_dca(q, k, v, q_pos, k_pos, 1.0, CFG), atol=2e-5, rtol=1e-5)


def test_batched_decode_rows_at_different_positions():
    # row 0 is shorter: cache slots past its position hold stale keys, which causality must hide
    q, k, v, q_pos, k_pos = make(3, 1, 70, offsets=[41, 70, 13])
    got = run(q, k, v, q_pos, k_pos)
    torch.testing.assert_close(got.double(), naive_dca(q, k, v, q_pos, k_pos, 1.0, CFG), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("local_size", [0, 4, 11])
def test_other_chunk_shapes_and_attention_scaling(local_size):
    cfg = DCAConfig(chunk_size=16, local_size=local_size)
    q, k, v, q_pos, k_pos = make(2, 30, 66, offsets=[66, 50])
    got = run(q, k, v, q_pos, k_pos, cfg, scaling=1.1)
    torch.testing.assert_close(got.double(), naive_dca(q, k, v, q_pos, k_pos, 1.1, cfg), atol=2e-5, rtol=1e-5)


def test_length_temperature():
    cfg = DCAConfig(chunk_size=16, local_size=4, original_max_position_embeddings=20)
    q, k, v, q_pos, k_pos = make(1, 9, 64)
    got = run(q, k, v, q_pos, k_pos, cfg)
    torch.testing.assert_close(got.double(), naive_dca(q, k, v, q_pos, k_pos, 1.0, cfg), atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, run(q, k, v, q_pos, k_pos, CFG), atol=1e-3)
    # a chunked prefill can ask for the temperature of the whole prompt (vLLM does)
    whole = run(q, k, v, q_pos, k_pos, cfg, seq_lens=torch.tensor([200]))
    torch.testing.assert_close(whole.double(), naive_dca(q, k, v, q_pos, k_pos, 1.0, cfg, torch.tensor([200])),
                               atol=2e-5, rtol=1e-5)
    # the released 1M models: original 262144, served up to 1,010,000 tokens
    big = DCAConfig(262144, 8192, 262144)
    assert big.length_scale(torch.tensor([1_010_000]))[0].item() == pytest.approx(1.1349, abs=1e-4)
    assert big.length_scale(torch.tensor([1000]))[0].item() == 1.0


def test_within_one_chunk_equals_ordinary_causal_attention():
    q, k, v, _, _ = make(2, 12, 12)
    pos = torch.arange(12).expand(2, 12)
    cos, sin = rotary_cos_sin(pos, INV_FREQ, 1.0, q.dtype)
    expected = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v,
                                              is_causal=True, enable_gqa=True)
    torch.testing.assert_close(run(q, k, v, pos, pos), expected)  # the SDPA path
    torch.testing.assert_close(run(q, k, v, pos, pos, fn=_by_scores), expected, atol=1e-5, rtol=1e-5)
    # decode of the last token against the cached prefix
    torch.testing.assert_close(run(q[:, :, -1:], k, v, pos[:, -1:], pos), expected[:, :, -1:])


def _by_scores(q, k, v, q_pos, k_pos, inv_freq, scaling, cfg):
    scale = torch.full((q.shape[0],), q.shape[-1] ** -0.5)
    return dca._dca_by_scores(q, k, v, q_pos, k_pos, inv_freq, scaling, cfg, scale)


def test_small_query_blocks_and_unordered_keys(monkeypatch):
    q, k, v, q_pos, k_pos = make(2, 40, 70, offsets=[70, 55])
    expected = run(q, k, v, q_pos, k_pos)
    monkeypatch.setattr(dca, "MAX_SCORE_ELEMENTS", 3 * 2 * H * 70 * 5)  # blocks of 5 queries
    torch.testing.assert_close(run(q, k, v, q_pos, k_pos), expected, atol=1e-6, rtol=1e-6)
    perm = torch.randperm(70)  # keys in any order, as long as positions travel with them
    torch.testing.assert_close(run(q, k[:, :, perm], v[:, :, perm], q_pos, k_pos[:, perm]), expected,
                               atol=1e-6, rtol=1e-6)


def test_bfloat16_in_bfloat16_out():
    q, k, v, q_pos, k_pos = make(1, 30, 50, dtype=torch.bfloat16)
    got = run(q, k, v, q_pos, k_pos)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), naive_dca(q, k, v, q_pos, k_pos, 1.0, CFG), atol=3e-2, rtol=3e-2)


def test_query_positions_and_config():
    intra, succ, inter = dca_query_positions(torch.tensor([[0, 3, 4, 5, 11, 12, 30]]), CFG)
    assert intra.tolist() == [[0, 3, 4, 5, 11, 0, 6]]
    assert succ.tolist() == [[12, 15, 16, 16, 16, 12, 16]]  # first local_size+1 queries exact, then pinned
    assert inter.tolist() == [[16] * 7]  # min(2 * 12 - 1, 16)
    assert DCAConfig.from_dict({}) == DCAConfig(8192, 1024, 0)
    cfg = DCAConfig.from_dict({"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144})
    assert cfg.chunk_len == 253952
    for bad in [(16, 16), (16, 20), (16, -1)]:
        with pytest.raises(ConfigError, match="local_size"):
            DCAConfig(*bad)


@pytest.mark.parametrize("T, offsets", [(40, [70, 55]), (17, [70, 25]), (70, [70, 70])])
def test_flash_parts_equal_explicit_scores(T, offsets):
    # keys at index == position take the three-flash-calls path; it must equal one softmax over scores
    cfg = DCAConfig(chunk_size=16, local_size=4, original_max_position_embeddings=20)
    q, k, v, q_pos, k_pos = make(2, T, 70, offsets=offsets)
    scale = q.shape[-1] ** -0.5 * cfg.length_scale(q_pos.max(-1).values + 1) ** 2
    cached_k = dca_key_rotation(k, k_pos, INV_FREQ, 1.0, cfg)
    by_parts = dca._dca_by_parts(q, cached_k, v, q_pos, INV_FREQ, 1.0, cfg, scale)
    by_scores = dca._dca_by_scores(q, cached_k, v, q_pos, k_pos, INV_FREQ, 1.0, cfg, scale)
    torch.testing.assert_close(by_parts, by_scores, atol=1e-5, rtol=1e-5)
