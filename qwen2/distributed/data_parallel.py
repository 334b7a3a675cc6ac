"""Data-parallel training: each process computes the loss of its share of a step's rows, and the
gradients are averaged (DDP: whole replicas; FSDP2: parameters, gradients and optimizer state
sharded by `fully_shard`, one unit per block; ep: DDP for all but the MoE experts, which
expert_parallel.py deals out over the processes).

Both wrap a module whose forward is the loss, so their hooks see every forward; the trainer
multiplies that loss by the world size, because both average gradients where the step's
loss, normalised by the target tokens of all processes, needs their sum.

Under FSDP2 a save gathers whole tensors (weights, optimizer state) to process 0, and a resume
hands them to every process to cut its own shard from, so checkpoints are a single process's files.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen2.errors import OptionError

MODES = ("ddp", "fsdp", "ep")


def wrap(loss_module: nn.Module, blocks: nn.ModuleList, mode: str, bf16: bool) -> nn.Module:
    """The loss module wrapped for `mode`; FSDP2 shards `blocks` one by one, then the rest."""
    if mode in ("ddp", "ep"):
        from torch.nn.parallel import DistributedDataParallel

        from qwen2.distributed.expert_parallel import expert_names

        # each process's experts are its own (expert_parallel.shard): no average over replicas
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module, expert_names(loss_module))
        return DistributedDataParallel(loss_module)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        return fully_shard(loss_module, mp_policy=policy)
    raise OptionError(f"unknown --parallel {mode!r}; choose {', '.join(MODES)}")


def full_state_dict(model: nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter whole on the CPU of process 0, an empty dict elsewhere (a collective: every
    process calls it); `trained_only`: the frozen ones left out (a LoRA checkpoint's adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with whole tensors, keyed by parameter name, on process 0's CPU (a
    collective, as full_state_dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict) -> None:
    """What full_state_dict and full_optimizer_state gave, loaded back: every process passes the whole
    tensors and keeps its own shard of them. Weights the dict lacks stay as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
