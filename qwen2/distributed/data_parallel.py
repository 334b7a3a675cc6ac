"""Data-parallel training: each process computes the loss of its share of a step's rows, and the
gradients are averaged (DDP: whole replicas; FSDP2: parameters, gradients and optimizer state
sharded by `fully_shard`, one unit per block).

Both wrap a module whose forward is the loss, so their hooks see every forward; the trainer
multiplies that loss by the world size, because both average gradients where the step's
loss, normalised by the target tokens of all processes, needs their sum.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen2.errors import OptionError

MODES = ("ddp", "fsdp")


def wrap(loss_module: nn.Module, blocks: nn.ModuleList, mode: str, bf16: bool) -> nn.Module:
    """The loss module wrapped for `mode`; FSDP2 shards `blocks` one by one, then the rest."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(loss_module)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        return fully_shard(loss_module, mp_policy=policy)
    raise OptionError(f"unknown --parallel {mode!r}; choose {' or '.join(MODES)}")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole on the CPU (a collective: every process calls it); plain tensors as is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
