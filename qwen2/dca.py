"""Dual Chunk Attention (DCA): training-free long context, as the Qwen2.5-1M models run it in vLLM.

Positions are cut into chunks of chunk_len = chunk_size - local_size. A key at absolute
position j is rotated at j % chunk_len, whatever query reads it. A query at position i reads
each key with one of three rotations, chosen by how many chunks separate them:

* intra (same chunk, causal): the query at i % chunk_len, so distances are the true ones;
* successive (previous chunk): min(i % chunk_len + chunk_len, chunk_size), so the first
  local_size queries of a chunk see the previous chunk at true distances, later ones pinned;
* inter (any earlier chunk): the constant min(2 * chunk_len - 1, chunk_size).

No distance exceeds chunk_size, the length the model was trained on. Each key belongs to
exactly one part, so the three partial attentions merged by their log-sum-exp equal one
softmax over the union of the parts' scores.

Two ways to compute it. When keys sit at index == position (a KV cache slot, a prompt) and
each row's query positions increase, the queries of one chunk see a contiguous key range per
part: intra (causal mask), the previous chunk and everything before it (no mask). Those go to
the flash-attention kernel, which also returns the log-sum-exp, and are merged: O(keys) memory
and flash speed, what makes a 64K prompt practical on a CPU. Otherwise (keys in any order)
one softmax over explicit scores, a block of queries at a time (MAX_SCORE_ELEMENTS). When every
position is below chunk_len only the intra part exists: ordinary causal attention (SDPA).

Length-dependent temperature (vLLM, when original_max_position_embeddings > 0): logits are
multiplied by f^2, f = max(1, 0.1 ln(seq_len / original_max_position_embeddings) + 1), seq_len
per sequence: by default its largest query position + 1; pass `seq_lens` to use another (vLLM
uses the whole prompt length during a chunked prefill). vLLM folds one f into the keys when it
caches them, so in decode its prompt keys carry f(prompt length) rather than f(current length);
we use f(current)^2 throughout, which differs only by the slow growth of ln(seq_len).

KV cache: store keys rotated at their chunk-local position (`dca_key_rotation`); a key's
position never changes, so cached keys stay valid and decode rotates only the new query.
Not covered: vLLM's optional sparse (MInference) attention, sliding windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen2.errors import ConfigError
from qwen2.rope import apply_rotary, rotary_cos_sin

# Upper bound on the elements of one block's (3 x B x heads x queries x keys) float32 scores.
MAX_SCORE_ELEMENTS = 1 << 26


@dataclass
class DCAConfig:
    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.local_size < self.chunk_size:
            raise ConfigError(
                f"dual_chunk_attention_config needs 0 <= local_size < chunk_size, got local_size "
                f"{self.local_size}, chunk_size {self.chunk_size}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> DCAConfig:
        """From config.dual_chunk_attention_config; missing sizes default as in vLLM (8192, 1024)."""
        return cls(int(d.get("chunk_size", 8192)), int(d.get("local_size", 1024)),
                   int(d.get("original_max_position_embeddings", 0) or 0))

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    def length_scale(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """f per sequence (float32); the logits are multiplied by f^2. All ones when disabled."""
        seq_lens = seq_lens.float()
        if self.original_max_position_embeddings <= 0:
            return torch.ones_like(seq_lens)
        return (0.1 * torch.log(seq_lens / self.original_max_position_embeddings) + 1).clamp(min=1)


def parse_dca(spec: str) -> dict:
    """A dual_chunk_attention_config from a CLI/API override: "CHUNK" or "CHUNK:LOCAL" (local
    defaults to CHUNK/8), e.g. "32768:4096"."""
    try:
        chunk, _, local = spec.strip().partition(":")
        chunk_size = int(chunk)
        local_size = int(local) if local else chunk_size // 8
    except ValueError:
        raise ConfigError(f"bad --dca {spec!r}: give CHUNK or CHUNK:LOCAL, e.g. 32768:4096") from None
    DCAConfig(chunk_size, local_size)  # validates the sizes
    return {"chunk_size": chunk_size, "local_size": local_size}


def dca_key_rotation(k_raw: torch.Tensor, k_positions: torch.Tensor, inv_freq: torch.Tensor,
                     attention_scaling: float, cfg: DCAConfig) -> torch.Tensor:
    """Keys (B, n_kv, S, hd) rotated at position % chunk_len: what the KV cache stores under DCA."""
    cos, sin = rotary_cos_sin(k_positions % cfg.chunk_len, inv_freq, attention_scaling, k_raw.dtype)
    return apply_rotary(k_raw, cos, sin)


def dca_query_positions(q_positions: torch.Tensor, cfg: DCAConfig) -> tuple[torch.Tensor, ...]:
    """The (intra, successive, inter) rotary positions of queries at absolute q_positions."""
    local = q_positions % cfg.chunk_len
    succ = (local + cfg.chunk_len).clamp(max=cfg.chunk_size)
    inter = torch.full_like(q_positions, min(2 * cfg.chunk_len - 1, cfg.chunk_size))
    return local, succ, inter


def dca_attention(q_raw: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                  k_positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, cfg: DCAConfig,
                  seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal DCA of un-rotated queries over cached keys; returns (B, n_heads, T, hd) in q's dtype.

    q_raw (B, n_heads, T, hd) not rotated; k (B, n_kv, S, hd) from `dca_key_rotation`; v
    (B, n_kv, S, hd); q_positions (B, T), k_positions (B, S) absolute positions. A query sees
    the keys at its own or earlier positions. seq_lens (B,) sets the length temperature (see
    the module docstring).
    """
    if seq_lens is None:
        seq_lens = q_positions.max(dim=-1).values + 1
    # softmax scale per sequence: the usual 1/sqrt(hd) times the length temperature f^2
    scale = q_raw.shape[-1] ** -0.5 * cfg.length_scale(seq_lens.to(q_raw.device)) ** 2  # (B,)
    if int(q_positions.max()) < cfg.chunk_len and int(k_positions.max()) < cfg.chunk_len:
        # one chunk: chunk-local positions are the true ones and only intra attention exists
        cos, sin = rotary_cos_sin(q_positions, inv_freq, attention_scaling, q_raw.dtype)
        q = apply_rotary(q_raw, cos, sin)
        if cfg.original_max_position_embeddings > 0:
            q = q * (scale * q_raw.shape[-1] ** 0.5).to(q.dtype)[:, None, None, None]
        mask = (k_positions[:, None, :] <= q_positions[:, :, None])[:, None]  # (B, 1, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    few_rows = q_raw.shape[2] <= 16  # decode: explicit scores are small and beat three flash calls
    if not few_rows and _contiguous_layout(q_positions, k_positions):
        return _dca_by_parts(q_raw, k, v, q_positions, inv_freq, attention_scaling, cfg, scale)
    return _dca_by_scores(q_raw, k, v, q_positions, k_positions, inv_freq, attention_scaling, cfg, scale)


def _contiguous_layout(q_positions: torch.Tensor, k_positions: torch.Tensor) -> bool:
    """Keys at index == position and each row's queries in increasing order."""
    if not bool((q_positions[:, 1:] > q_positions[:, :-1]).all()):
        return False
    return bool((k_positions == torch.arange(k_positions.shape[1], device=k_positions.device)).all())


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (B, H, T, hd) and its log-sum-exp (B, H, T) float32; k, v have H heads too
    (grouped-query callers fold a KV head's query heads into T).

    mask: additive (T, S) in q's dtype, or None. On CPU the flash kernel returns both; elsewhere
    explicit scores (correct, not fast).
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


def _dca_by_parts(q_raw: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                  inv_freq: torch.Tensor, attention_scaling: float, cfg: DCAConfig,
                  scale: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = q_raw.shape
    n_kv, L = k.shape[1], cfg.chunk_len
    rep = H // n_kv
    out = torch.empty(B, H, T, hd, dtype=q_raw.dtype, device=q_raw.device)
    for b in range(B):
        pos = q_positions[b]
        chunk_of = pos // L
        for c in torch.unique_consecutive(chunk_of).tolist():
            cols = torch.nonzero(chunk_of == c).squeeze(1)
            t0, t1 = int(cols[0]), int(cols[-1]) + 1
            qp, q = pos[t0:t1], q_raw[b:b + 1, :, t0:t1]
            start, end = c * L, int(qp[-1]) + 1
            intra, succ, inter = dca_query_positions(qp, cfg)
            parts = [(intra, start, end), (succ, max(start - L, 0), start), (inter, 0, max(start - L, 0))]
            outs, lses = [], []
            for rot, lo, hi in parts:
                if hi <= lo:
                    continue
                qr = apply_rotary(q, *rotary_cos_sin(rot[None], inv_freq, attention_scaling, q.dtype))
                # GQA without copying keys: the query heads of one KV head form one longer query block
                # (20% faster than repeating K/V: 196 vs 240 ms, 512 queries x 16K keys, 2 threads)
                qr = qr.reshape(1, n_kv, rep * len(qp), hd)
                mask = None
                if lo == start:  # intra: causal inside the chunk
                    hidden = torch.arange(lo, hi, device=pos.device)[None, :] > qp[:, None]
                    mask = torch.zeros(hidden.shape, dtype=q.dtype, device=pos.device).masked_fill(hidden, -math.inf)
                    mask = mask.repeat(rep, 1)
                o, lse = attention_with_lse(qr, k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], mask, float(scale[b]))
                outs.append(o.float().reshape(1, H, len(qp), hd))
                lses.append(lse.reshape(1, H, len(qp)))
            weights = torch.softmax(torch.stack(lses), dim=0)[..., None]  # (parts, 1, H, t, 1)
            out[b:b + 1, :, t0:t1] = (weights * torch.stack(outs)).sum(0).to(q_raw.dtype)
    return out


def _dca_by_scores(q_raw: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                   k_positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, cfg: DCAConfig,
                   scale: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = q_raw.shape
    n_kv, S = k.shape[1], k.shape[2]
    rep, L = H // n_kv, cfg.chunk_len
    k32, v32 = k.float(), v.float()
    # keys in position order (a prompt, cache slots): a block needs keys only up to its last query
    ordered = S < 2 or bool((k_positions[:, 1:] >= k_positions[:, :-1]).all())
    block = max(1, min(L, MAX_SCORE_ELEMENTS // (3 * B * H * S)))
    outs = []
    for t0 in range(0, T, block):
        qp = q_positions[:, t0:t0 + block]  # (B, t)
        t = qp.shape[1]
        s = int((k_positions <= qp.max()).sum(-1).max()) if ordered else S
        kp = k_positions[:, :s]
        q32 = q_raw[:, :, t0:t0 + block].float()
        q3 = torch.cat([apply_rotary(q32, *rotary_cos_sin(p, inv_freq, attention_scaling, torch.float32))
                        for p in dca_query_positions(qp, cfg)], dim=2)  # (B, H, 3t, hd): intra, succ, inter
        scores = (q3.view(B, n_kv, rep * 3 * t, hd) @ k32[:, :, :s].transpose(-1, -2))
        scores = scores.view(B, n_kv, rep, 3, t, s)
        # 0 same chunk, 1 previous chunk, 2 earlier; later chunks are hidden by causality below
        part = (qp[:, :, None] // L - kp[:, None, :] // L).clamp(0, 2)[:, None, None]  # (B, 1, 1, t, s)
        x = torch.where(part == 0, scores[:, :, :, 0], torch.where(part == 1, scores[:, :, :, 1], scores[:, :, :, 2]))
        visible = (kp[:, None, :] <= qp[:, :, None])[:, None, None]
        x = (x * scale[:, None, None, None, None]).masked_fill(~visible, -math.inf)
        p = torch.softmax(x, dim=-1)  # (B, n_kv, rep, t, s)
        y = p.view(B, n_kv, rep * t, s) @ v32[:, :, :s]  # (B, n_kv, rep*t, hd)
        outs.append(y.view(B, H, t, hd))
    return torch.cat(outs, dim=2).to(q_raw.dtype)
