"""Expert parallelism for training: every MoE layer's experts dealt out over the processes of a
torchrun (or Ray Train) job, each process training on its own rows as under DDP.

    torchrun --nproc-per-node 2 -m qwen2 train sft --model MOE_FOLDER --parallel ep ...

`shard(model, rank, world)` keeps this process's experts in each MoE layer (dealt as
torch.tensor_split deals, as tensor parallelism does) and gives the layer an `ExpertDispatch`.
A layer's (token, expert) pairs, sorted by expert, travel to the processes that hold their
experts in one all-to-all; each process runs each of its experts once over the rows that every
process sent it; a second all-to-all brings the outputs back in the order they left. Both
exchanges are differentiable (the backward pass sends the gradients back the other way), so an
expert's gradient sums every process's rows. The rest of the model is replicated and DDP averages
its gradients (data_parallel.wrap leaves the experts out).

The trainer scales each loss by the world size, because DDP averages where the step needs a
sum (trainer.backward); an expert's gradient is already summed over every process's rows, so it
comes out the world size times too large, and a hook divides it back. The gradient norm that
clipping uses adds every process's experts' squares, so every process clips by the same factor
and the replicas stay equal. A checkpoint gathers the experts and their optimizer state to
process 0, so it holds the whole model; a resume hands every process the whole files to keep
its own experts from.

Where the model comes from a file each process reads only its own experts (`ExpertPlan`, a
plan of the loader's parallelize step, as tensor parallelism's); a model built from a preset
drops the others' once it is made. Not covered: online DPO (each process samples replies of its
own lengths, so the layers' exchanges would not pair up), the merging optimizers (their masks
are keyed by a parameter's place in the optimizer, which differs between processes holding
different experts), FSDP2 of the replicated part.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from qwen2 import distributed
from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError
from qwen2.model import MoE, Transformer

EXPERTS = ".experts."  # in the name of every tensor of a routed expert (not the shared expert)


class _Exchange(torch.autograd.Function):
    """all_to_all_single, whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
        ctx.send, ctx.receive = send, receive
        return _all_to_all(rows, send, receive)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_to_all(grad, ctx.receive, ctx.send), None, None


def _all_to_all(rows: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
    out = rows.new_empty((sum(receive), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), receive, send)
    return out


def exchange(rows: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
    """Rows send[r] of `rows` (in order) to process r; returns what arrived, receive[r] rows from
    process r, in rank order."""
    return _Exchange.apply(rows, send, receive)


@dataclasses.dataclass(frozen=True)
class ExpertDispatch:
    """An MoE layer's routed experts, run by the processes that hold them (see the module)."""

    rank: int
    owned: tuple[range, ...]  # each process's experts

    def __call__(self, moe: MoE, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for `rows`, this process's pairs sorted by expert (`ends`: where
        each expert's block ends), in the same order."""
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        table = torch.stack(_all_gather(counts))  # (world, experts): every process's pairs per expert
        mine = self.owned[self.rank]
        here = table[:, mine.start: mine.stop]  # (world, own experts): the rows each process sends here
        send = [int(table[self.rank, r.start: r.stop].sum()) for r in self.owned]
        receive = here.sum(1).tolist()
        arrived = exchange(rows, send, receive)  # by process, then by expert
        order = _by_expert(here)
        sizes = here.sum(0).cumsum(0).tolist()
        ends_here = [0] * mine.start + sizes + [sizes[-1]] * (len(counts) - mine.stop)
        out = moe.per_expert(arrived[order], ends_here)
        return exchange(out[order.argsort()], receive, send)


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def _by_expert(blocks: torch.Tensor) -> torch.Tensor:
    """The order that groups rows laid out by process, then expert (`blocks[p, e]` rows each),
    by expert, then process."""
    starts = (blocks.flatten().cumsum(0) - blocks.flatten()).view(blocks.shape)
    return torch.cat([torch.arange(int(starts[p, e]), int(starts[p, e] + blocks[p, e]))
                      for e in range(blocks.shape[1]) for p in range(blocks.shape[0])])


def deal(experts: int, world: int) -> tuple[range, ...]:
    """Each process's experts, dealt in contiguous runs (the first processes get one more)."""
    return tuple(range(int(part[0]), int(part[-1]) + 1) for part in torch.arange(experts).tensor_split(world))


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """Which experts process `rank` holds, as a plan of the loader's read -> build -> parallelize
    sequence (qwen2.loading; the tensor-parallel Plan's protocol): the others are never read."""

    config: Qwen2Config
    rank: int
    world: int

    def __post_init__(self) -> None:
        if not self.config.is_moe:
            raise ConfigError("--parallel ep deals out the experts of MoE layers, and this model has none; "
                              "use --parallel ddp or fsdp")
        if self.config.num_experts < self.world:
            raise ConfigError(f"--parallel ep over {self.world} processes needs at least as many experts; "
                              f"the model has {self.config.num_experts}")

    @functools.cached_property
    def owned(self) -> tuple[range, ...]:
        return deal(self.config.num_experts, self.world)

    def select(self, name: str, shape: tuple[int, ...]) -> bool:
        return EXPERTS not in name or int(name.split(EXPERTS)[1].split(".")[0]) in self.owned[self.rank]

    def rank_config(self) -> Qwen2Config:
        return self.config

    def pad(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def parallelize(self, model: Transformer) -> Transformer:
        """Drop the other processes' experts of each MoE layer (where still there) and route through them."""
        owned = self.owned
        for block in model.model.layers:
            if isinstance(block.mlp, MoE):
                for e in [e for e in block.mlp.experts if int(e) not in owned[self.rank]]:
                    del block.mlp.experts[e]
                block.mlp.stacked, block.mlp.dispatch = None, ExpertDispatch(self.rank, owned)
        return model


def shard(model: Transformer, rank: int, world: int) -> None:
    """A training model's experts dealt out (see the module): this process's kept, where loading did
    not already (a model built from a preset holds them all), and their gradients divided by `world`."""
    ExpertPlan(model.config, rank, world).parallelize(model)
    for name, p in model.named_parameters():
        if EXPERTS in name and p.requires_grad:
            p.register_hook(lambda grad: grad / world)  # a sum over processes; DDP's loss scaling assumed a mean


def expert_names(module: nn.Module) -> list[str]:
    """The routed experts' tensors, which DDP must leave alone (each lives on one process)."""
    return [name for name, _ in [*module.named_parameters(), *module.named_buffers()] if EXPERTS in name]


def grad_norm(model: nn.Module) -> Callable[[list[nn.Parameter]], torch.Tensor]:
    """How to measure the norm of the whole model's gradient: the replicated parameters' (equal
    everywhere after DDP's average) with the squares of every process's experts added (a collective)."""
    experts = {id(p) for name, p in model.named_parameters() if EXPERTS in name}

    def norm(params: list[nn.Parameter]) -> torch.Tensor:
        replicated = [p.grad for p in params if p.grad is not None and id(p) not in experts]
        own = [p.grad for p in params if p.grad is not None and id(p) in experts]
        spread = _norm(own, params[0].device) ** 2
        dist.all_reduce(spread)
        return (_norm(replicated, params[0].device) ** 2 + spread).sqrt()

    return norm


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros((), device=device)


def full_state_dict(model: nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's tensors on process 0 (every process's experts), an empty dict elsewhere
    (a collective: every process calls it); `trained_only`: the other processes' frozen experts left out."""
    state = model.state_dict()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    experts = {k: v for k, v in state.items() if EXPERTS in k and (k in trained or not trained_only)}
    others = _gather_to_first(experts)
    return state | others if dist.get_rank() == 0 else {}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, every process's experts' included, on process 0
    (a collective, as full_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    # each expert's entries as "name<TAB>key" tensors, sent as the weights are
    experts = {f"{name}\t{key}": value for name, entry in state["state"].items() if EXPERTS in name
               for key, value in entry.items()}
    groups = distributed.gather([[n for n in group["params"] if EXPERTS in n] for group in state["param_groups"]])
    others = _gather_to_first(experts)
    if dist.get_rank():
        return {}
    for flat, value in others.items():
        name, key = flat.split("\t")
        state["state"].setdefault(name, {})[key] = value
    for part in groups[1:]:
        for group, names in zip(state["param_groups"], part):
            group["params"] = [*group["params"], *names]
    return state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict) -> None:
    """What full_state_dict and full_optimizer_state gave, loaded back: every process passes the whole
    files and keeps its own experts' part."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    held = set(model.state_dict())
    model.load_state_dict({k: v for k, v in weights.items() if k in held}, strict=False)
    own = {name for name, _ in model.named_parameters()}
    state = {"state": {k: v for k, v in optimizer_state["state"].items() if k in own},
             "param_groups": [group | {"params": [n for n in group["params"] if n in own]}
                              for group in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state)


def _gather_to_first(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The other processes' `tensors` on process 0's CPU, sent one by one: a pickled gather would hold
    a second copy of gigabytes of experts on both sides. An empty dict elsewhere."""
    layouts = distributed.gather({name: (t.shape, t.dtype) for name, t in tensors.items()})
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if dist.get_rank():
        for t in tensors.values():
            dist.send(t.detach().to(device).contiguous(), dst=0)
        return {}
    received = {}
    for source, layout in enumerate(layouts[1:], start=1):
        for name, (shape, dtype) in layout.items():
            buffer = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buffer, src=source)
            received[name] = buffer.cpu()
    return received
