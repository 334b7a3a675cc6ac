"""LoRA (Hu et al., 2021): a frozen Linear plus a trainable low-rank update,
y = W x + (alpha / r) * B A dropout(x), with A (r, in) random and B (out, r) zero, so training
starts from the base model exactly.

Applied to a built model from outside (`add_lora` swaps the chosen Linears), merged back into
plain Linears (`merge_lora`), and saved alone in the PEFT adapter layout that peft and
transformers load: adapter_config.json and adapter_model.safetensors, tensors named
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwen2.errors import OptionError, WeightsError
from qwen2.files import write_atomically, write_text_atomically

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear holding W + scale * B A."""
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base.requires_grad_(True)


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Freeze the model and wrap every Linear named in `targets`; returns the wrapped names."""
    if rank < 1:
        raise OptionError(f"--lora-rank must be at least 1, got {rank}")
    if unknown := set(targets) - set(TARGETS):
        raise OptionError(f"unknown LoRA target(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child, linear in list(module.named_children()):
            if child in targets and isinstance(linear, nn.Linear):
                setattr(module, child, LoRALinear(linear, rank, alpha, dropout))
                wrapped.append(f"{name}.{child}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, leaving plain Linears (in place)."""
    for module in list(model.modules()):
        for child, layer in list(module.named_children()):
            if isinstance(layer, LoRALinear):
                setattr(module, child, layer.merged())
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model: nn.Module, folder: str | Path, base_model: str = "") -> None:
    """adapter_config.json + adapter_model.safetensors in the PEFT layout."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}), "fan_in_fan_out": False,
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
