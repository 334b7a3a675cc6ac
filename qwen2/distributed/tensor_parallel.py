"""Tensor-parallel inference: one model sharded over the processes of a torchrun job.

    torchrun --nproc-per-node 2 -m qwen2 generate -p "def quicksort(arr):" -n 48 --temperature 0

Megatron-style shards, applied to a built Transformer from outside (model.py stays unaware):
q/k/v and gate/up are split by output rows (column-parallel: whole heads, KV heads included,
so N must divide num_key_value_heads), o and down by input columns (row-parallel: one
all-reduce each), the embedding and the LM head by vocabulary rows (the logits are
all-gathered; a tied head shares the embedding's shard), and MoE experts are dealt out whole,
the shared expert split like a dense MLP, with one all-reduce per MoE block. Norms and routers
are replicated. Every rank reads only its shard's bytes from safetensors (`get_slice`) and, from
a GGUF, its rows of row-split tensors (a row's blocks are contiguous) and its experts; a
column-split GGUF tensor (o, down) is dequantized whole, one at a time, then sliced, since its
quantized blocks run along the rows.

Rank 0 returns the model wrapped so that each call is also run on the other ranks (lockstep.py);
those ranks never return from `load_model`: they follow rank 0's calls and exit when it does.
--quant auto means float: float32 on CPU, so a GGUF computes with exactly its own weights as one
process's default (the block kernels) does and greedy output is the same; the dtype's default on
CUDA. --quant int8/int4 quantize after sharding, each rank its own shard, so a row-parallel
layer's per-row scales cover part of a row: outputs may differ from one process's by
quantization noise (float outputs agree to rounding). The GGUF block modes (gguf, q8_0, q4_k)
are not sharded: a clear error. Not covered: sequence parallelism, pipeline
parallelism, the on-disk quantized cache (each start quantizes its shard).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError, OptionError, Qwen2Error, WeightsError
from qwen2.model import MLP, Context, MoE, Transformer

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


# -- sharded layers ----------------------------------------------------------------------
class RowParallel(nn.Module):
    """A Linear holding some input columns: each rank's product is a partial sum of the output."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear  # an nn.Linear, or its int8/int4 replacement after quantization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding; a token outside them contributes zeros here."""

    def __init__(self, embedding: nn.Embedding, start: int):
        super().__init__()
        self.embedding, self.start = embedding, start

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.embedding.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.embedding.weight)
        return all_reduce(x.masked_fill(outside[..., None], 0))


class VocabParallelHead(nn.Module):
    """This rank's vocabulary rows of the output matrix; the logits of all ranks, gathered."""

    def __init__(self, linear: nn.Module, vocab_size: int):
        super().__init__()
        self.linear, self.vocab_size = linear, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.linear(x))[..., : self.vocab_size]  # drop the padding rows


class ShardedMoE(MoE):
    """This rank's experts, whole, and its columns of the shared expert: one all-reduce in all."""

    def __init__(self, config: Qwen2Config, experts: range, shared_width: int):
        nn.Module.__init__(self)
        h = config.hidden_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(h, config.num_experts, bias=False)
        # keyed by the global expert number, so the state-dict names stay the checkpoint's
        self.experts = nn.ModuleDict({str(e): MLP(h, config.moe_intermediate_size) for e in experts})
        self.shared_expert = MLP(h, shared_width)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        if ctx is not None and ctx.router_logits is not None:
            ctx.router_logits.append(logits)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # a partial sum: its columns
        for e in chosen.unique().tolist():
            if str(e) in self.experts:
                token, slot = torch.where(chosen == e)
                out.index_add_(0, token, self.experts[str(e)](x[token]) * weights[token, slot, None])
        return all_reduce(out).view(shape)


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


def shard(tensor: torch.Tensor, plan: Plan, name: str) -> torch.Tensor:
    """This rank's slice of a whole tensor (the vocabulary shards padded to equal rows)."""
    cut = plan.slice_of(name, tuple(tensor.shape))
    if cut is None:
        return tensor
    dim, start, stop = cut
    return pad_vocab(tensor.narrow(dim, start, stop - start).clone(), plan, name)  # a copy frees the whole


def pad_vocab(tensor: torch.Tensor, plan: Plan, name: str) -> torch.Tensor:
    if name in ("model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] < plan.vocab_rows:
        return F.pad(tensor, (0, 0, 0, plan.vocab_rows - tensor.shape[0]))
    return tensor


# -- reading only this rank's bytes ------------------------------------------------------
def read_shard(path: Path, plan: Plan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This rank's tensors of a GGUF file or an HF safetensors folder, cast to dtype."""
    if path.is_file():
        return _read_gguf_shard(path, plan, dtype)
    return _read_safetensors_shard(path, plan, dtype)


def _read_safetensors_shard(folder: Path, plan: Plan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    from qwen2.weights.hf import _FUSED, _safetensors_files, _split_fused

    state = {}
    for file in _safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if _FUSED.fullmatch(name):  # transformers 5 fused experts: split, keep ours
                        parts = _split_fused(name, f.get_tensor(name))
                        state |= {k: v.to(dtype) for k, v in parts.items() if plan.wants(k)}
                        continue
                    if not plan.wants(name):
                        continue
                    view = f.get_slice(name)
                    cut = plan.slice_of(name, tuple(view.get_shape()))
                    if cut is None:
                        t = view[:]
                    else:
                        dim, start, stop = cut
                        t = view[start:stop] if dim == 0 else view[:, start:stop]
                    state[name] = pad_vocab(t.to(dtype), plan, name)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{file} is not a readable safetensors file ({e}); re-download it") from None
    return state


def _read_gguf_shard(path: Path, plan: Plan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from qwen2.weights.gguf import _check, _open, _our_name, dequantize

    data, _, infos = _open(path)
    state = {}
    for info in infos:
        name = _our_name(info.name)
        if name is None:
            raise WeightsError(f"{path}: unexpected tensor {info.name!r}; is this really a Qwen2 GGUF?")
        qtype, n_bytes = _check(info, path, len(data))
        raw = data[info.offset: info.offset + n_bytes]
        if "{e}" in name:  # stacked experts, outermost: read only this rank's
            per_expert = raw.reshape(info.shape[0], -1)
            for e in plan.experts():
                state[name.format(e=e)] = dequantize(per_expert[e], qtype, info.shape[1:], dtype)
            continue
        shape = (1, info.shape[-1]) if name.endswith("shared_expert_gate.weight") else info.shape
        cut = plan.slice_of(name, shape)
        if cut is not None and cut[0] == 0:  # whole rows: their blocks are contiguous, read only those
            _, start, stop = cut
            rows = raw.reshape(shape[0], -1)[start:stop].reshape(-1)
            state[name] = pad_vocab(dequantize(rows, qtype, (stop - start, *shape[1:]), dtype), plan, name)
        else:  # a column slice cuts through the blocks of every row: dequantize all, keep ours
            state[name] = shard(dequantize(raw.reshape(-1), qtype, shape, dtype), plan, name)
    return state


# -- building ----------------------------------------------------------------------------
def build(plan: Plan, state: dict[str, torch.Tensor], device: torch.device) -> Transformer:
    """This rank's Transformer, filled from its sharded state dict and wired for collectives."""
    config, local = plan.config, plan.rank_config()
    with torch.device("meta"):
        net = Transformer(local)
        h = config.hidden_size
        net.model.embed_tokens = nn.Embedding(plan.vocab_rows, h)
        net.lm_head = nn.Linear(h, plan.vocab_rows, bias=False)
        for i, block in enumerate(net.model.layers):
            if config.layer_is_sparse(i):
                block.mlp = ShardedMoE(config, plan.experts(), local.shared_expert_intermediate_size)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = set(net.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise WeightsError(f"checkpoint does not match the config: missing {sorted(missing)[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}; the file is incomplete or belongs to another model")
    net.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True, strict=False)
    if config.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    start = plan.rank * plan.vocab_rows
    net.model.embed_tokens = VocabParallelEmbedding(net.model.embed_tokens, start)
    net.lm_head = VocabParallelHead(net.lm_head, config.vocab_size)
    for block in net.model.layers:
        block.self_attn.o_proj = RowParallel(block.self_attn.o_proj)
        if isinstance(block.mlp, MLP):
            block.mlp.down_proj = RowParallel(block.mlp.down_proj)
    net.set_rope(local)
    return net.eval()


def collective_timeout() -> timedelta:
    """How long a collective waits for a silent rank (QWEN2_TP_TIMEOUT seconds, default 300)."""
    try:
        return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise OptionError(f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None


# this process's sharded model: a second would find the other ranks busy following the first
_SHARDED: list[Transformer] = []


def load_model(model: str | Path | None = None, *, dtype: str = "auto", device: str | None = None,
               quant: str = "auto", rope_scaling: str | None = None, dca: str | None = None):
    """Rank 0: (the sharded model, wrapped to lead the other ranks, tokenizer, quant mode). Other
    ranks: build their shard, then follow rank 0's calls and exit when it exits; they never return."""
    from qwen2.device import resolve_dtype
    from qwen2.distributed.lockstep import Leader, follow, open_channel
    from qwen2.loading import INT4_GROUP, with_long_context
    from qwen2.quant import resolve_quant
    from qwen2.quant.int_linear import quantize_model
    from qwen2.tokenizer import Tokenizer
    from qwen2.weights import describe
    from qwen2.weights.gguf import read_metadata

    if _SHARDED:
        raise OptionError("this process already holds a tensor-parallel model; one per torchrun job")
    me, world = rank(), world_size()
    try:  # every rank checks the options; rank 0 alone says what is wrong
        config, _, path = describe(model)
        plan = Plan(config, me, world)
        dev = _device(device)
        mode = resolve_quant(quant, dev.type, path, world)
        # auto on CPU: float32, the numbers one process's default (the GGUF block kernels) computes
        dt = resolve_dtype(dtype, dev, exact=quant in (None, "auto") and dev.type == "cpu")
        rope_config = with_long_context(plan.rank_config(), rope_scaling, dca)
        timeout = collective_timeout()
    except Qwen2Error:
        if me:
            sys.exit(1)
        raise
    if not dist.is_initialized():  # the default group carries the model's collectives
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    channel = open_channel(dev, timeout)
    net = build(plan, read_shard(path, plan, dt), dev)
    if mode != "none":
        quantize_model(net, mode, INT4_GROUP)
    net.set_rope(rope_config)
    _SHARDED.append(net)
    channel.ready()
    if me:
        follow(net, channel)
        dist.destroy_process_group()
        sys.exit(0)
    tokenizer = Tokenizer.from_gguf_metadata(read_metadata(path)) if path.is_file() else Tokenizer.from_files(path)
    return Leader(net, channel), tokenizer, mode


def _device(name: str | None) -> torch.device:
    """CPU, or this process's own GPU (LOCAL_RANK) when CUDA is asked for or present."""
    from qwen2.device import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev
