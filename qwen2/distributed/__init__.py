"""Several processes on torch.distributed (torchrun or Ray Train): gloo on CPU, NCCL on CUDA. No RPC of
our own.

    torchrun --nproc-per-node 2 -m qwen2 train sft ... [--parallel ddp|fsdp]
    qwen2 train sft ... --ray local:2 [--parallel ddp|fsdp]  (qwen2.train.ray_launcher)

data_parallel.py wraps a training model for DDP or FSDP2.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): under torchrun the process group is started on first call, a Ray Train worker
    has Ray's already; (0, 1) alone."""
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(local_device())  # else every process's collectives (all_sum) would use GPU 0
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This process's device: its own GPU under torchrun or Ray Train (LOCAL_RANK: Ray shows a node's
    workers all their GPUs, in the order of their local ranks), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _summed(values: list[float]) -> list[float]:
    """Each of `values` summed over every process, in one all-reduce."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def all_sum(value: float) -> float:
    """The sum of `value` over every process (itself when alone)."""
    return _summed([value])[0] if dist.is_initialized() else value


def all_sum_by_key(values: dict[str, float]) -> dict[str, float]:
    """The sums over every process, key by key, for every key any of them has (one it lacks counts 0
    there): a process whose items gave fewer metrics than another's (online DPO's steps without a
    pair) must still make the same collective calls."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(set().union(*gather(sorted(values))))
    return dict(zip(keys, _summed([values.get(key, 0.0) for key in keys])))


def gather(value: object) -> list:
    """`value` of every process, in rank order (a list of one alone)."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """End the process group, if this process started one."""
    if dist.is_initialized():
        dist.destroy_process_group()
