"""Upcycle a dense Qwen2 into a Qwen2-MoE: a model of real size to measure MoE code on, not a trained one.

Fine-grained upcycling, as the Qwen2 report describes for Qwen2-57B-A14B (from Qwen2-7B): each
layer's dense MLP (intermediate I) is cut into k = top_k slices of I/k neurons, so the k routed
experts a token runs hold as many weights as the dense MLP. Per layer:

- expert e copies slice e % k (its rows of gate_proj / up_proj, its columns of down_proj) plus seeded
  Gaussian noise of NOISE times the dense matrix's std, so copies of one slice differ and the
  router has no exact ties to break;
- the shared expert is the whole dense MLP, its gate zero: sigmoid(0) = 0.5 of the dense output;
- the router is small and random (seeded): logits of std ~ROUTER_STD, so the softmax is near
  uniform (each of the k chosen weights ~1/E; norm_topk_prob stays False, Qwen2-57B-A14B's value)
  and which experts a token picks depends on the token, which spreads the load;
- each expert's down_proj is scaled by E/2: k chosen weights of ~1/E times E/2 make the routed sum
  ~0.5 of a sum of k slices, which is the dense output when the k slices differ and its expected
  value when they are drawn at random. Routed plus shared is then about the dense MLP, so the
  logits stay those of a working model (perturbed), neither NaN nor flat.

Every other config field (rope, tied embeddings, layer types) is the dense model's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError, OptionError, WeightsError
from qwen2.weights.hf import state_dict_keys

NOISE = 0.01  # of the dense matrix's std
ROUTER_STD = 0.1  # of the router logits, for a post-norm hidden state of typical size


def upcycle(source: dict[str, torch.Tensor] | nn.Module, config: Qwen2Config | None = None, experts: int = 48,
            top_k: int = 8, seed: int = 0) -> tuple[Qwen2Config, dict[str, torch.Tensor]]:
    """A dense model (state dict in hub naming, or our Transformer) -> (MoE config, MoE state dict)
    in the dense model's dtype; tensors outside the MLPs are the input's own (not copied)."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    config = config or getattr(source, "config", None)
    if config is None:
        raise OptionError("upcycle needs the dense model's config with a state dict")
    if config.is_moe:
        raise ConfigError("this model is already a mixture of experts; upcycling starts from a dense Qwen2")
    if top_k < 1 or experts < top_k or experts % top_k:
        raise OptionError(f"experts ({experts}) must be a positive multiple of top_k ({top_k}): each expert "
                          f"copies one of the dense MLP's {top_k} slices")
    if config.intermediate_size % top_k:
        raise OptionError(f"the dense intermediate size {config.intermediate_size} does not split into "
                          f"top_k = {top_k} equal slices; choose a top_k that divides it")
    missing = [k for k in state_dict_keys(config) if k not in state]
    if missing:
        raise WeightsError(f"the dense state dict lacks {len(missing)} tensor(s) of its config, e.g. {missing[:3]}")

    width = config.intermediate_size // top_k
    moe = dataclasses.replace(config, model_type="qwen2_moe", num_experts=experts, num_experts_per_tok=top_k,
                              moe_intermediate_size=width, shared_expert_intermediate_size=config.intermediate_size,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    generator = torch.Generator().manual_seed(seed)

    def noisy(w: torch.Tensor, std: float, scale: float = 1.0) -> torch.Tensor:
        return ((w.float() + torch.randn(w.shape, generator=generator) * std) * scale).to(w.dtype)

    out = {k: v for k, v in state.items() if ".mlp." not in k}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (state[f"{p}{w}_proj.weight"] for w in ("gate", "up", "down"))
        out |= {f"{p}shared_expert.{w}_proj.weight": t for w, t in (("gate", gate), ("up", up), ("down", down))}
        out[f"{p}shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size, dtype=gate.dtype)
        # The router sees the post-attention norm's output: ~ its weight times unit-RMS activations,
        # of norm ~ ||weight||; dividing by it puts the router logits' std near ROUTER_STD.
        size = state[f"model.layers.{i}.post_attention_layernorm.weight"].float().norm().clamp(min=1e-6)
        out[f"{p}gate.weight"] = (torch.randn(experts, config.hidden_size, generator=generator)
                                  * (ROUTER_STD / size)).to(gate.dtype)
        stds = [NOISE * w.float().std().item() for w in (gate, up, down)]
        for e in range(experts):
            s = slice(e % top_k * width, (e % top_k + 1) * width)
            q = f"{p}experts.{e}."
            out[q + "gate_proj.weight"] = noisy(gate[s], stds[0])
            out[q + "up_proj.weight"] = noisy(up[s], stds[1])
            out[q + "down_proj.weight"] = noisy(down[:, s], stds[2], experts / 2)
    return moe, out
