"""LoRA (Hu et al., 2021): a frozen Linear plus a trainable low-rank update,
y = W x + (alpha / r) * B A dropout(x), with A (r, in) random and B (out, r) zero, so training
starts from the base model exactly.

Applied to a built model from outside (`add_lora` swaps the chosen Linears), merged back into
plain Linears (`merge_lora`; `merged_state_dict` does it to a state dict, such as one gathered
from FSDP2's shards), and saved alone in the PEFT adapter layout that peft and transformers
load: adapter_config.json and adapter_model.safetensors, tensors named
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwen2.errors import OptionError, WeightsError
from qwen2.files import write_atomically, write_text_atomically

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def update(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """scale * B A in float32, from A and B given (this layer's own, or their gathered copies)."""
        return (b.float() @ a.float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear holding W + scale * B A."""
        with torch.no_grad():
            self.base.weight += self.update(self.lora_A.weight, self.lora_B.weight).to(self.base.weight.dtype)
        return self.base.requires_grad_(True)


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Freeze the model and wrap every Linear named in `targets`; returns the wrapped names. Each
    layer's A is drawn from a generator keyed by torch's seed and the layer's name, so a process
    that holds some of the layers (expert parallelism) draws the same A for them as one holding all."""
    if rank < 1:
        raise OptionError(f"--lora-rank must be at least 1, got {rank}")
    if unknown := set(targets) - set(TARGETS):
        raise OptionError(f"unknown LoRA target(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child, linear in list(module.named_children()):
            if child in targets and isinstance(linear, nn.Linear):
                seed = (torch.initial_seed() * 1_000_003 + zlib.crc32(f"{name}.{child}".encode())) % 2**63
                generator = torch.Generator(linear.weight.device).manual_seed(seed)
                setattr(module, child, LoRALinear(linear, rank, alpha, dropout, generator))
                wrapped.append(f"{name}.{child}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, leaving plain Linears (in place)."""
    for module in list(model.modules()):
        for child, layer in list(module.named_children()):
            if isinstance(layer, LoRALinear):
                setattr(module, child, layer.merged())
    return model


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`, the state dict of `model` with its LoRA layers (its own, or gathered from shards), as
    merge_lora's plain model would give it: each base weight plus its update, the adapters gone. The
    merged weights are new tensors, so `state` and the model stay as they were."""
    merged = dict(state)
    layers = lora_layers(model)
    for name in adapted(state):  # under expert parallelism the state holds other processes' experts too
        layer = layers.get(name) or next(iter(layers.values()))  # one run's adapters share rank and alpha
        a, b = merged.pop(f"{name}.lora_A.weight"), merged.pop(f"{name}.lora_B.weight")
        for kind in ("weight", "bias"):
            if f"{name}.base.{kind}" in merged:
                merged[f"{name}.{kind}"] = merged.pop(f"{name}.base.{kind}")
        weight = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = weight + layer.update(a, b).to(weight.dtype)
    return merged


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapted(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the layers whose adapters `state` holds."""
    return [name.removesuffix(".lora_A.weight") for name in state if name.endswith(".lora_A.weight")]


def save_adapter(model: nn.Module, folder: str | Path, base_model: str = "",
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors in the PEFT layout; the tensors from `state`
    (the model's state dict, e.g. gathered from FSDP2's shards) where given, else from the model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    state = model.state_dict() if state is None else state
    tensors = {}
    for name in adapted(state):
        for ab in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{name}.{ab}.weight"] = state[f"{name}.{ab}.weight"].detach().contiguous()
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in adapted(state)}), "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    write_atomically(folder / "adapter_model.safetensors",
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Wrap `model` as the adapter's config says and load its weights (PEFT layout)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder} is not a readable LoRA adapter ({e})") from None
    if config.get("peft_type") != "LORA":
        raise WeightsError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA is supported")
    add_lora(model, config["r"], config["lora_alpha"], 0.0, tuple(config["target_modules"]))
    state = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in tensors.items()}
    missing = [f"{n}.{ab}.weight" for n in lora_layers(model) for ab in ("lora_A", "lora_B")
               if f"{n}.{ab}.weight" not in state]
    if missing:
        raise WeightsError(f"{folder} lacks {len(missing)} LoRA tensor(s) its config implies, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)
    return model
