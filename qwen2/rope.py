"""Rotary position embedding: frequencies, their long-context scalings, and the rotation.

Qwen2 uses the rotate-half (NeoX) layout: pairs are (i, i + head_dim/2), and the angle of
pair i at position p is p * inv_freq[i], inv_freq[i] = theta^(-2i/head_dim).

`config.rope_scaling` (key "rope_type", or the legacy "type") selects a scaling; each equals
the matching transformers `ROPE_INIT_FUNCTIONS` entry:

* "default": none.
* "linear": inv_freq / factor (positions squeezed by `factor`).
* "yarn": static YaRN, the scaling Qwen's model cards recommend beyond 32K: a per-frequency
  blend of original and interpolated frequencies, plus an attention factor multiplied into
  cos and sin (so the logits grow by its square). Same frequencies at every length.
* "dynamic": NTK-aware; the base grows with the current length once it passes
  max_position_embeddings. Frequencies depend on the length, so `rope_parameters` returns
  the unscaled ones (what HF uses up to that length) and the model must ask
  `dynamic_inv_freq(config, seq_len)` on every forward, where seq_len = max position + 1 of
  the batch. Rotate only the new queries and keys with them: keys already in the cache keep
  the rotation they were written with (HF's cache holds rotated keys too). HF's rotary module
  is stateful (it keeps the frequencies of the longest length seen until the length falls
  back under max_position_embeddings); for one growing sequence that is the same thing.

Not covered: longrope, llama3 and partial rotary, which no Qwen2 checkpoint uses.
"""

from __future__ import annotations

import math

import torch

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # int64 arange then float, as the reference does, so large thetas round identically
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_type(config: Qwen2Config) -> str:
    """The scaling kind named by config.rope_scaling ("default" when there is none)."""
    scaling = config.rope_scaling or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a JSON object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return kind


def _number(scaling: dict, key: str, kind: str, default: float | None = None) -> float:
    value = scaling.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"rope_scaling {kind!r} needs a positive number {key!r}, got {value!r}")
    return float(value)


def _yarn_factor_and_original(config: Qwen2Config) -> tuple[float, int]:
    s = config.rope_scaling
    original = s.get("original_max_position_embeddings") or config.max_position_embeddings
    # transformers ~4.51..4.55 overwrote `factor` with max_position_embeddings / original whenever
    # `original_max_position_embeddings` was present, which turns Qwen's recommended snippet
    # (max 32768, original 32768, factor 4) into factor 1 (issue #38224, fixed by PR #40320).
    # We use the explicit factor; only when it is absent do we take the ratio, as HF does.
    factor = s.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    return _number({"factor": factor}, "factor", "yarn"), int(original)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """YaRN inv_freq and attention factor (transformers `_compute_yarn_parameters`)."""
    s = config.rope_scaling
    dim, base = config.head_dim, config.rope_theta
    factor, original = _yarn_factor_and_original(config)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the frequency slot that turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as the reference does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    # slots below `low` (fast, many turns) keep their frequency, slots above `high` are
    # interpolated by `factor`, a linear blend in between
    keep = 1 - ramp
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    return inv_freq, float(attention_factor)


def rope_parameters(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention_scaling applied to cos and sin)."""
    kind = rope_type(config)
    if kind == "yarn":
        return yarn_parameters(config)
    inv_freq = default_inv_freq(config.head_dim, config.rope_theta)
    if kind == "linear":
        inv_freq = inv_freq / _number(config.rope_scaling, "factor", kind)
    elif kind == "dynamic":
        _number(config.rope_scaling, "factor", kind)  # fail at load, not at the first long prompt
    return inv_freq, 1.0


def dynamic_inv_freq(config: Qwen2Config, seq_len: int) -> torch.Tensor:
    """Dynamic-NTK inv_freq for a forward whose largest position is seq_len - 1.

    base' = base * (factor * L / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2)),
    L = max(seq_len, max_position_embeddings), so it equals the unscaled frequencies up to
    max_position_embeddings (HF's `_compute_dynamic_ntk_parameters`; HF measures against
    max_position_embeddings, not an "original" length).
    """
    factor = _number(config.rope_scaling or {}, "factor", "dynamic")
    dim, max_pos = config.head_dim, config.max_position_embeddings
    length = max(seq_len, max_pos)
    base = config.rope_theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(dim, base)


def effective_context(config: Qwen2Config) -> int:
    """The longest sequence the scaling is meant for: yarn factor x original length, linear and
    dynamic factor x max_position_embeddings (dynamic has no hard limit; this is its nominal
    one), else max_position_embeddings."""
    kind = rope_type(config)
    if kind == "yarn":
        factor, original = _yarn_factor_and_original(config)
        return int(factor * original)
    if kind in ("linear", "dynamic"):
        return int(_number(config.rope_scaling, "factor", kind) * config.max_position_embeddings)
    return config.max_position_embeddings


def describe_rope(config: Qwen2Config) -> str:
    """One line for the start-up log: static YaRN changes short-prompt outputs, so say it's on."""
    kind = rope_type(config)
    if kind == "default":
        return f"rope: default, theta {config.rope_theta:g}, context {config.max_position_embeddings}"
    if kind == "yarn":
        factor, original = _yarn_factor_and_original(config)
        _, attn = yarn_parameters(config)
        return (f"rope: yarn factor {factor:g} over original {original} -> context "
                f"{effective_context(config)}, attention factor {attn:.4f} (static: applies to short prompts too)")
    factor = _number(config.rope_scaling, "factor", kind)
    return f"rope: {kind} factor {factor:g} -> context {effective_context(config)}"


def parse_rope_scaling(spec: str) -> dict:
    """A rope_scaling dict from a CLI/API override: "yarn:4", "yarn:4:32768", "linear:2",
    "dynamic:2", or "default"/"none" to switch scaling off.

    The third yarn field is the original (trained) context; without it the config's
    max_position_embeddings is used when the scaling is applied, so for a checkpoint whose
    config already claims the extended length (e.g. 131072) pass the trained one ("yarn:4:32768").
    """
    parts = spec.strip().lower().split(":")
    kind = parts[0]
    if kind in ("default", "none") and len(parts) == 1:
        return {"rope_type": "default"}
    usage = 'use "yarn:FACTOR[:ORIGINAL_CONTEXT]", "linear:FACTOR", "dynamic:FACTOR" or "none"'
    if kind not in ("yarn", "linear", "dynamic") or not 2 <= len(parts) <= (3 if kind == "yarn" else 2):
        raise ConfigError(f"bad rope scaling {spec!r}: {usage}")
    try:
        factor = float(parts[1])
        original = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise ConfigError(f"bad rope scaling {spec!r}: factor must be a number, original context an integer; "
                          f"{usage}") from None
    if not math.isfinite(factor) or factor < 1:
        raise ConfigError(f"bad rope scaling {spec!r}: factor must be >= 1")
    out = {"rope_type": kind, "factor": factor}
    if original is not None:
        if original <= 0:
            raise ConfigError(f"bad rope scaling {spec!r}: original context must be positive")
        out["original_max_position_embeddings"] = original
    return out


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
