"""Rotary position embedding frequencies.

Qwen2 uses the rotate-half (NeoX) layout: pairs are (i, i + head_dim/2), and the angle of
pair i at position p is p * inv_freq[i], inv_freq[i] = theta^(-2i/head_dim).
"""

from __future__ import annotations

import torch

from qwen2.config import Qwen2Config


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # int64 arange then float, as the reference does, so large thetas round identically
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_parameters(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention_scaling applied to cos and sin)."""
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet")
    return default_inv_freq(config.head_dim, config.rope_theta), 1.0


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim,), computed in float32 then cast."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd); cos/sin (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
