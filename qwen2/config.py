"""Qwen2Config: one dataclass describes every Qwen2 / Qwen2.5 / Qwen2-MoE model completely.

Field names are those of the HF `config.json`, so reading one is a plain `from_dict` that
ignores keys we do not use. Presets carry the published shapes; `num_params()` recomputes
the official parameter counts from them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen2.errors import ConfigError, OptionError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")
# DCA bounds every relative distance by its chunk size, so only memory limits the context
DCA_MAX_CONTEXT = 1_048_576


@dataclass
class Qwen2Config:
    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    # Mixture of experts (Qwen2-MoE); num_experts == 0 means every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    dual_chunk_attention_config: dict | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: this package runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints only"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is None:
            self.layer_types = [self._default_layer_type(i) for i in range(self.num_hidden_layers)]

    def _default_layer_type(self, i: int) -> str:
        # The two HF model types disagree on which layers slide; we follow each one's code
        # (not its docstring), see transformers issue #35896.
        if not self.use_sliding_window or not self.sliding_window:
            return "full_attention"
        if self.model_type == "qwen2_moe":
            sliding = i % 2 == 0 and i < self.max_window_layers
        else:
            sliding = i >= self.max_window_layers
        return "sliding_attention" if sliding else "full_attention"

    # -- derived shapes ----------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_sparse(self, i: int) -> bool:
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def layer_window(self, i: int) -> int | None:
        """Sliding-window length of layer i, or None for full causal attention."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @property
    def context_limit(self) -> int:
        """The longest sequence this model runs with its rope scaling or Dual Chunk Attention."""
        from qwen2.rope import effective_context  # rope.py builds on this module

        return DCA_MAX_CONTEXT if self.dual_chunk_attention_config else effective_context(self)

    def check_context(self, tokens: int, what: str) -> None:
        """Raise OptionError when `what` ("--ctx 65536", say) needs more than the context limit."""
        if tokens > self.context_limit:
            raise OptionError(f"{what} exceeds the model's context limit of {self.context_limit} tokens with its "
                              "rope scaling; extend it with --rope-scaling yarn:F (static YaRN) or --dca CHUNK "
                              "(Dual Chunk Attention)")

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        if ids is None:
            return []
        return list(ids) if isinstance(ids, (list, tuple)) else [ids]

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2Config:
        quantization = d.get("quantization_config")
        if isinstance(quantization, dict):
            method = quantization.get("quant_method", "unknown")
            raise ConfigError(f"this checkpoint is quantized with {method} (config.json's quantization_config); "
                              "quantized checkpoints of this kind are not supported yet: use the float (bf16) "
                              "checkpoint or a GGUF file")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        # transformers >= 5 writes rope_theta and the scaling together as rope_parameters
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) != "default":
                kwargs["rope_scaling"] = scaling
        if "model_type" not in d:
            archs = d.get("architectures") or []
            kwargs["model_type"] = "qwen2_moe" if "Qwen2MoeForCausalLM" in archs else d.get(
                "model_type", "qwen2"
            )
        # Older HF MoE configs spell the dense fallback width only as intermediate_size.
        if kwargs.get("mlp_only_layers") is None:
            kwargs.pop("mlp_only_layers", None)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config has a field of the wrong type: {e}") from None

    @classmethod
    def from_hf_json(cls, path: str | Path) -> Qwen2Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(
                f"no config.json at {path}: an HF checkpoint folder needs config.json beside "
                "its *.safetensors (or pass a .gguf file)"
            )
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds {type(d).__name__}, expected a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str) -> Qwen2Config:
        """A named preset, in any case: qwen2-72b is Qwen2-72B, as hub ids and packaged names are."""
        found = {key.lower(): key for key in PRESETS}.get(name.strip().lower())
        if found is None:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[found])

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["architectures"] = ["Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"]
        if not self.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                      "mlp_only_layers", "router_aux_loss_coef", "qkv_bias"):
                d.pop(k)
        if d["dual_chunk_attention_config"] is None:
            d.pop("dual_chunk_attention_config")
        d["hidden_act"] = "silu"
        return d

    # -- sizes -------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts: total, non-embedding, and active per token (differs for MoE)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        bias = (q + 2 * kv) if self.qkv_bias else 0
        attn = h * q + 2 * h * kv + bias + q * h
        norms = 2 * h

        def mlp(width: int) -> int:
            return 3 * h * width

        total_layers = active_layers = 0
        for i in range(self.num_hidden_layers):
            if self.layer_is_sparse(i):
                shared = mlp(self.shared_expert_intermediate_size) + h if self.shared_expert_intermediate_size else 0
                router = h * self.num_experts
                total_layers += attn + norms + router + shared + self.num_experts * mlp(self.moe_intermediate_size)
                active_layers += attn + norms + router + shared + self.num_experts_per_tok * mlp(
                    self.moe_intermediate_size
                )
            else:
                total_layers += attn + norms + mlp(self.intermediate_size)
                active_layers += attn + norms + mlp(self.intermediate_size)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return {
            "total": total_layers + h + embed,
            "non_embedding": total_layers + h,
            "active": active_layers + h + embed,
        }


_QWEN2 = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": 151643}
_SMALL = {"vocab_size": 151936, "tie_word_embeddings": True}
_LARGE = {"vocab_size": 152064, "tie_word_embeddings": False}

# Base-model shapes as published in the HF config.json files (see the package docs);
# Instruct variants differ only in max_position_embeddings and eos_token_id.
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen2-0.5B": _QWEN2 | _SMALL | dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=131072, max_window_layers=24),
    "Qwen2-1.5B": _QWEN2 | _SMALL | dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=131072, max_window_layers=28),
    "Qwen2-7B": _QWEN2 | _LARGE | dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, max_window_layers=28),
    "Qwen2-72B": _QWEN2 | _LARGE | dict(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, max_window_layers=80,
        rms_norm_eps=1e-5),
    "Qwen2-57B-A14B": _QWEN2 | dict(
        model_type="qwen2_moe", vocab_size=151936, tie_word_embeddings=False,
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, max_window_layers=28,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, norm_topk_prob=False),
    "Qwen2.5-0.5B": _QWEN2 | _SMALL | dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=24),
    "Qwen2.5-1.5B": _QWEN2 | _SMALL | dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=131072, max_window_layers=28),
    "Qwen2.5-7B": _QWEN2 | _LARGE | dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, max_window_layers=28),
    "Qwen2.5-Coder-0.5B-Instruct": _QWEN2 | _SMALL | dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=21,
        eos_token_id=151645),
    "Qwen2.5-Coder-1.5B-Instruct": _QWEN2 | _SMALL | dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=21,
        eos_token_id=151645),
    # Not a release: the shape `qwen2 train pretrain` starts from scratch on a CPU. 20.4M
    # parameters, 19.4M of them the embedding of the real 151,936-token vocabulary.
    "Qwen2-Tiny": _QWEN2 | _SMALL | dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, max_window_layers=4),
}
