"""Tensor-parallel inference: one model sharded over the processes of a torchrun job.

    torchrun --nproc-per-node 2 -m qwen2 generate -p "def quicksort(arr):" -n 48 --temperature 0

Megatron-style shards, applied to a model from outside, as torchtitan's `parallelize` does:
`Plan` says which part of each tensor a rank holds (q/k/v and gate/up by output rows, whole
heads, KV heads included, so N must divide num_key_value_heads; o and down by input columns;
the embedding and the LM head by vocabulary rows; MoE experts dealt out whole, the shared expert
split like a dense MLP; norms and routers replicated), and the weight readers read only that
part through `Plan.select` (qwen2.weights.Select). `parallelize(model, plan)`, on a model built
on the meta device from `plan.rank_config()`, gives the embedding and the head their vocabulary
rows, keeps each MoE layer's own experts (routing stays MoE.forward's), and adds the
collectives as forward hooks: one all-reduce after each attention, MLP and MoE block, the logits
gathered over the vocabulary. qwen2.loading does the rest (read, adopt, quantize) as for one
process; `lead` then makes rank 0's model run every call on the other ranks too (lockstep.py):
those ranks follow rank 0's calls and exit when it does.

--quant auto means float: float32 on CPU, so a GGUF computes with exactly its own weights as one
process's default (the block kernels) does and greedy output is the same; the dtype's default on
CUDA. --quant int8/int4 quantize after sharding, each rank its own shard, so a row-parallel
layer's per-row scales cover part of a row: outputs may differ from one process's by
quantization noise (float outputs agree to rounding). The GGUF block modes are not sharded (the
quant table says which modes are). Not covered: sequence parallelism, pipeline parallelism, the
on-disk quantized cache (each start quantizes its shard).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError, OptionError
from qwen2.model import MoE, Transformer

TIMEOUT_ENV = "QWEN2_TP_TIMEOUT"  # seconds a collective waits for a silent rank (default 300)
DEFAULT_TIMEOUT_S = 300


def world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def lost_contact(error: Exception) -> None:
    """A collective failed: a rank died or stopped answering. The group cannot recover, and the
    engine would otherwise fail requests one by one, so this process ends here."""
    print(f"qwen2: error: tensor-parallel rank {rank()} lost contact with the other ranks "
          f"({' '.join(str(error).split())[:200]}); a process died or hung, see its log", file=sys.stderr, flush=True)
    os._exit(1)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, accumulated in float32 (partial sums in bf16 would add a rounding each)."""
    total = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    try:
        dist.all_reduce(total)
    except RuntimeError as e:
        lost_contact(e)
    return total.to(x.dtype)


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, concatenated along the last dimension."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(parts, x.contiguous())
    except RuntimeError as e:
        lost_contact(e)
    return torch.cat(parts, dim=-1)


# -- sharded layers and collectives -------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + rows) of the embedding; a token outside them contributes zeros here."""

    def __init__(self, rows: int, dim: int, start: int):
        super().__init__(rows, dim, _weight=torch.empty(rows, dim))  # no random init: the shard is read in
        self.start = start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside[..., None], 0))


def _reduce_output(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return all_reduce(output)  # each rank's output is a partial sum: its heads, columns or experts


# -- the plan: which slice of each tensor this rank holds --------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    config: Qwen2Config  # the whole model's
    rank: int
    world: int

    def __post_init__(self) -> None:
        check_divisible(self.config, self.world)

    def span(self, n: int) -> tuple[int, int]:
        """This rank's share of n items, as torch.tensor_split deals them (the first ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    @property
    def vocab_rows(self) -> int:
        return -(-self.config.vocab_size // self.world)  # equal shards (the last padded) for all_gather

    def experts(self) -> range:
        return range(*self.span(self.config.num_experts))

    def rank_config(self) -> Qwen2Config:
        """The config of this rank's shard: its heads and MLP widths (the vocabulary stays whole)."""
        c = self.config
        return dataclasses.replace(
            c, num_attention_heads=c.num_attention_heads // self.world,
            num_key_value_heads=c.num_key_value_heads // self.world, head_dim=c.head_dim,
            intermediate_size=_width(self.span(c.intermediate_size)),
            shared_expert_intermediate_size=_width(self.span(c.shared_expert_intermediate_size)))

    def slice_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the tensor `name` that this rank holds; None: the whole tensor."""
        c, hd = self.config, self.config.head_dim
        part = name.rsplit(".", 2)
        module, kind = part[-2], part[-1]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            start = self.rank * self.vocab_rows
            return 0, start, min(start + self.vocab_rows, c.vocab_size)
        if module == "q_proj":
            start, stop = self.span(c.num_attention_heads)
            return 0, start * hd, stop * hd
        if module in ("k_proj", "v_proj"):
            start, stop = self.span(c.num_key_value_heads)
            return 0, start * hd, stop * hd
        if module == "o_proj":
            start, stop = self.span(c.num_attention_heads)
            return 1, start * hd, stop * hd
        if ".experts." in name or kind != "weight" or module not in ("gate_proj", "up_proj", "down_proj"):
            return None  # experts are dealt out whole; norms, biases of whole rows, routers replicate
        width = shape[0] if module != "down_proj" else shape[1]
        start, stop = self.span(width)
        return (1, start, stop) if module == "down_proj" else (0, start, stop)

    def wants(self, name: str) -> bool:
        """False for the experts another rank holds."""
        if ".experts." not in name:
            return True
        return int(name.split(".experts.")[1].split(".")[0]) in self.experts()

    def select(self, name: str, shape: tuple[int, ...]) -> bool | tuple[int, int, int]:
        """The weight readers' selection hook (qwen2.weights.Select): skip, whole, or this rank's part."""
        if not self.wants(name):
            return False
        part = self.slice_of(name, shape)
        return True if part is None else part

    def parallelize(self, model: Transformer) -> Transformer:
        return parallelize(model, self)

    def pad(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The vocabulary shards padded to equal rows (all_gather needs equal parts)."""
        out = dict(state)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in out and out[name].shape[0] < self.vocab_rows:
                out[name] = F.pad(out[name], (0, 0, 0, self.vocab_rows - out[name].shape[0]))
        return out


def _width(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def check_divisible(config: Qwen2Config, world: int) -> None:
    """Whole KV heads per rank, or a ConfigError naming the sizes that work."""
    n_kv = config.num_key_value_heads
    if n_kv % world:
        fits = ", ".join(str(n) for n in range(1, n_kv + 1) if n_kv % n == 0)
        raise ConfigError(f"tensor parallelism over {world} processes needs whole KV heads per process, but "
                          f"the model has {n_kv} KV heads (num_key_value_heads); run torchrun with "
                          f"--nproc-per-node (times --nnodes) one of {fits}")
    if config.is_moe and config.num_experts < world:
        raise ConfigError(f"the model has {config.num_experts} experts, fewer than {world} processes; run fewer")


def parallelize(model: Transformer, plan: Plan) -> Transformer:
    """Shape a model built on the meta device from `plan.rank_config()` into this rank's shard and
    add its collectives. Its tensors are then read with `plan.select`, padded with `plan.pad`, and
    adopted; quantization may swap its Linear layers afterwards (the hooks sit above them)."""
    config, h = plan.config, plan.config.hidden_size
    with torch.device("meta"):
        model.model.embed_tokens = VocabParallelEmbedding(plan.vocab_rows, h, plan.rank * plan.vocab_rows)
        model.lm_head = nn.Linear(h, plan.vocab_rows, bias=False)
    held = {str(e) for e in plan.experts()}
    for block in model.model.layers:
        block.self_attn.register_forward_hook(_reduce_output)
        block.mlp.register_forward_hook(_reduce_output)
        if isinstance(block.mlp, MoE):
            for e in [e for e in block.mlp.experts if e not in held]:
                del block.mlp.experts[e]
    vocab = config.vocab_size
    model.register_forward_hook(lambda _m, _i, logits: all_gather_last(logits)[..., :vocab])  # drop padding rows
    return model


def collective_timeout() -> timedelta:
    """How long a collective waits for a silent rank (QWEN2_TP_TIMEOUT seconds, default 300)."""
    try:
        return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise OptionError(f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None


# this process's sharded model: a second would find the other ranks busy following the first
_SHARDED: list[nn.Module] = []


def rank_device(device: torch.device) -> torch.device:
    """CPU, or this process's own GPU (LOCAL_RANK) where CUDA is asked for."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def lead(net: Transformer, device: torch.device) -> nn.Module:
    """Rank 0: its shard, wrapped so that every call also runs on the other ranks. Other ranks:
    follow rank 0's calls on their shard and exit when it does; they never return."""
    from qwen2.distributed.lockstep import Leader, follow, open_channel

    if _SHARDED:
        raise OptionError("this process already holds a tensor-parallel model; one per torchrun job")
    timeout = collective_timeout()
    if not dist.is_initialized():  # the default group carries the model's collectives
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    channel = open_channel(device, timeout)
    _SHARDED.append(net)
    channel.ready()
    if rank():
        follow(net, channel)
        dist.destroy_process_group()
        sys.exit(0)
    return Leader(net, channel)
