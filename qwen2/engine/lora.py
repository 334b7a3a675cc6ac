"""LoRA adapters served per request, as vLLM, SGLang and llama.cpp serve them.

An adapter is a PEFT folder (adapter_config.json, adapter_model.safetensors), as `qwen2 train`
or HF peft write it. Its tensors are named after the HF modules (`base_model.model.<module>
.lora_A.weight`), which are our module names too. Nothing is merged: the base weights stay
as loaded (quantized or not) and shared by every request, and each forward is told which rows
run which adapter; the target modules then return base(x) + scale * (x A^T) B^T on those rows
alone (forward hooks, so the delta goes around whatever the base Linear is), and the rows of
the base model are computed exactly as without adapters.

Targets are the attention projections and dense MLPs. Not covered: MoE experts (an expert sees
a gathered subset of the batch's tokens, not its rows), lm_head and embeddings, DoRA, per-module
ranks (rank_pattern), adapters with their own biases or fully trained modules (modules_to_save).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from qwen2.errors import OptionError, RequestError, WeightsError
from qwen2.model import MoE, Transformer
from qwen2.train.lora import PEFT_PREFIX

_TENSOR = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")


@dataclass
class Adapter:
    """One LoRA adapter: per target module, A (r, in) and B (out, r) with its scale folded in."""

    name: str
    path: Path
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def parse_lora(specs: list[str], base: str | None = None) -> dict[str, Path]:
    """--lora NAME=PATH options -> {name: path}; a name must be new and not the base model's."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        name = name.strip()
        if not name or not path:
            raise OptionError(f"--lora takes NAME=PATH (the name requests give as `model`, a PEFT adapter "
                              f"folder), got {spec!r}")
        if name in adapters or name == base:
            taken = "another adapter" if name in adapters else "the base model"
            raise OptionError(f"--lora {name}: the name is taken by {taken}; give each adapter its own name")
        adapters[name] = Path(path)
    return adapters


def read_adapter(name: str, folder: str | Path, where: str | None = None) -> Adapter:
    """The adapter's tensors, checked against its own config (the model checks them later);
    errors name it as `where` (default: the --lora option)."""
    folder = Path(folder)
    where = where or f"--lora {name}={folder}"
    if not (folder / "adapter_config.json").is_file():
        raise WeightsError(f"{where}: no adapter_config.json there; give a PEFT adapter folder "
                           "(adapter_config.json and adapter_model.safetensors)")
    if not (folder / "adapter_model.safetensors").is_file():
        pickle = (" (adapter_model.bin is not read: loading it can run code)"
                  if (folder / "adapter_model.bin").exists() else "")
        raise WeightsError(f"{where}: no adapter_model.safetensors there{pickle}; save the adapter as safetensors")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError, SafetensorError) as e:
        raise WeightsError(f"{where}: not a readable adapter ({e})") from None
    if config.get("peft_type") != "LORA":
        raise WeightsError(f"{where}: a {config.get('peft_type')} adapter; only LoRA adapters are served")
    unsupported = [key for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
                   if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise WeightsError(f"{where}: the adapter uses {', '.join(unsupported)}, which are not served; "
                           "only plain LoRA (one rank, no biases, no fully trained modules) is")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise WeightsError(f"{where}: adapter_config.json needs a rank r >= 1 and a number lora_alpha")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR.fullmatch(key)
        if match is None:
            raise WeightsError(f"{where}: unexpected tensor {key}; a LoRA adapter holds "
                               f"{PEFT_PREFIX}<module>.lora_A.weight and .lora_B.weight")
        halves.setdefault(match[1], {})[match[2]] = tensor
    weights = {}
    for module, pair in halves.items():
        if pair.keys() != {"A", "B"}:
            raise WeightsError(f"{where}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise WeightsError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                               f"not (r, in) and (out, r) with the config's r = {rank}")
        weights[module] = (a, b * scale)
    if not weights:
        raise WeightsError(f"{where}: the adapter holds no LoRA tensors")
    return Adapter(name, folder, weights)


def target_modules(model: Transformer) -> dict[str, nn.Module]:
    """The modules an adapter may target, by name: their input rows are the batch's rows."""
    found = {}
    for i, block in enumerate(model.model.layers):
        found |= {f"model.layers.{i}.self_attn.{n}": getattr(block.self_attn, n)
                  for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if not isinstance(block.mlp, MoE):
            found |= {f"model.layers.{i}.mlp.{n}": getattr(block.mlp, n)
                      for n in ("gate_proj", "up_proj", "down_proj")}
    return found


class AdapterSet:
    """The adapters a model serves, numbered from 1 (0 is the base model). `applied(ids)` runs
    a forward with row i of the batch using adapter ids[i]."""

    def __init__(self, model: Transformer, adapters: Sequence[Adapter] = ()):
        self.model = model
        targets = target_modules(model)
        norm = model.model.norm.weight  # the dtype activations have between layers
        for adapter in adapters:
            where = f"--lora {adapter.name}={adapter.path}"
            for module, (a, b) in adapter.weights.items():
                if module not in targets:
                    raise WeightsError(f"{where}: targets {module}, which this model does not have or LoRA cannot "
                                       "target here (attention and dense MLP projections)")
                base = targets[module]
                if (a.shape[1], b.shape[0]) != (base.in_features, base.out_features):
                    raise WeightsError(f"{where}: {module} maps {a.shape[1]} -> {b.shape[0]} features in the adapter "
                                       f"but {base.in_features} -> {base.out_features} in this model; the adapter "
                                       "belongs to another model")
            # onto the model's device, in its activations' dtype: the delta is added to their rows
            adapter.weights = {m: (a.to(norm.device, norm.dtype), b.to(norm.device, norm.dtype))
                               for m, (a, b) in adapter.weights.items()}
        self.adapters = list(adapters)
        self.targets = {name: targets[name] for adapter in adapters for name in adapter.weights}

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def id(self, name: str | None) -> int:
        """The number of the adapter called `name` (None: the base model, 0)."""
        if name is None:
            return 0
        if name not in self.names:
            served = ", ".join(self.names) or "none"
            raise RequestError(f"no LoRA adapter {name!r}; this engine serves {served}")
        return self.names.index(name) + 1

    @contextlib.contextmanager
    def applied(self, ids: list[int]) -> Iterator[None]:
        """Within the block, a forward adds adapter ids[i]'s delta to row i (0: none)."""
        used = sorted(set(ids) - {0})
        if not used:
            yield
            return
        device = self.model.model.norm.weight.device
        rows = [(self.adapters[a - 1], None if ids == [a] * len(ids) else
                 torch.tensor([i for i, x in enumerate(ids) if x == a], device=device)) for a in used]
        hooks = [module.register_forward_hook(functools.partial(_add_delta, name, rows))
                 for name, module in self.targets.items()]
        # the fused calls compute whole layers past the hooks: this step runs the model's own code
        fused = self.model.decode_step, self.model.prefill_step
        self.model.decode_step = self.model.prefill_step = None
        try:
            yield
        finally:
            self.model.decode_step, self.model.prefill_step = fused
            for hook in hooks:
                hook.remove()


def _add_delta(name: str, rows: list[tuple[Adapter, torch.Tensor | None]], module: nn.Module,
               args: tuple, y: torch.Tensor) -> torch.Tensor:
    """Forward hook: base(x) plus each adapter's (x A^T) B^T on its rows (None: every row)."""
    x = args[0]
    for adapter, index in rows:
        if name not in adapter.weights:
            continue
        a, b = adapter.weights[name]
        if index is None:
            y = y + F.linear(F.linear(x, a), b)
        else:  # out of place: the other rows keep the base output bit for bit
            y = y.index_add(0, index, F.linear(F.linear(x[index], a), b))
    return y
