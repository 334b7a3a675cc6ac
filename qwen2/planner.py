"""What fits where: bytes of weights, KV cache and activations per device for a model sharded
over N devices (qwen2.distributed.tensor_parallel's shards), before anything is loaded.

    qwen2 info --preset Qwen2-72B --plan --devices 1,2,4,8 --device-memory 80GB --quant int4 --ctx 32k

Weights: each tensor of the largest shard (rank 0's), at the bytes our own layers store them in:
the float dtype, or quant.py's int8/int4 layouts (asked of quant.py itself, on the meta device,
one Linear shape at a time; embeddings stay float, a tied head gets a quantized copy), or a
GGUF block type (as our kernels keep a GGUF's blocks, on the CPU and on CUDA; norms and biases
in f32). KV cache:
2 x layers x KV heads per device x head_dim x dtype bytes per token, the engine's cache.
Activations are an estimate of one prefill chunk's transients: hidden states, q/k/v, the MLP's
three widths, one layer's attention scores in float32 (the CPU path; flash attention on CUDA
needs none) and the float32 logits. USABLE of a device's memory is planned for; the rest is
left to the allocator and the CUDA context. Not covered: pipeline parallelism, a draft model,
the transient float copy while quantizing at load time.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError, OptionError
from qwen2.quant import CHOICES, FILE_BLOCK_TYPES, MODES, file_blocks

USABLE = 0.9
PREFILL_CHUNK = 512  # the engine's default prefill tokens per step
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the modes of qwen2.quant's table, and GGUF block types a file may hold (sized as blocks)
GGUF_TYPES = FILE_BLOCK_TYPES
QUANTS = tuple(dict.fromkeys((*CHOICES, *FILE_BLOCK_TYPES)))
@dataclass(frozen=True)
class MemoryPlan:
    devices: int
    weights: int  # bytes per device, each: the largest shard
    kv_per_token: int
    kv: int
    activations: int
    device_memory: int
    ctx: int
    batch: int
    max_ctx: int  # at `batch`, capped by the model's context limit; 0: not even a short context fits
    max_batch: int  # at `ctx`

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory * USABLE


def _shards(config: Qwen2Config, devices: int):
    from qwen2.distributed.tensor_parallel import Plan

    return Plan(config, 0, devices)  # rank 0's shard: the largest where a width does not split evenly


def shard_tensors(config: Qwen2Config, devices: int) -> tuple[Counter, int, int]:
    """Rank 0's Linear shapes {(out, in, bias): count}, its float parameters (norms), its embedding rows."""
    shards = _shards(config, devices)
    local, h, hd = shards.rank_config(), config.hidden_size, config.head_dim
    q, kv = local.num_attention_heads * hd, local.num_key_value_heads * hd
    linears: Counter = Counter()
    norms = h

    def mlp(width: int, count: int = 1) -> None:
        if width:
            linears[(width, h, False)] += 2 * count
            linears[(h, width, False)] += count

    for i in range(config.num_hidden_layers):
        linears[(q, h, config.qkv_bias)] += 1
        linears[(kv, h, config.qkv_bias)] += 2
        linears[(h, q, False)] += 1
        norms += 2 * h
        if config.layer_is_sparse(i):
            linears[(config.num_experts, h, False)] += 1
            mlp(config.moe_intermediate_size, len(shards.experts()))
            mlp(local.shared_expert_intermediate_size)
            linears[(1, h, False)] += 1
        else:
            mlp(local.intermediate_size)
    rows = shards.vocab_rows if devices > 1 else config.vocab_size
    return linears, norms, rows


@functools.lru_cache(maxsize=256)
def linear_bytes(out: int, inp: int, bias: bool, quant: str, dtype: str) -> int:
    """Bytes of one Linear as stored: float, our int8/int4 layers (measured), or GGUF blocks."""
    elt = FLOAT_BYTES[dtype]
    if quant in GGUF_TYPES:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[quant.upper()]]
        return -(-out * inp // block) * size + (4 * out if bias else 0)
    if quant == "none":
        return (out * inp + (out if bias else 0)) * elt
    from qwen2.loading import INT4_GROUP
    from qwen2.quant.int_linear import quantize_linear

    with torch.device("meta"):
        layer = quantize_linear(nn.Linear(inp, out, bias=bias, dtype=getattr(torch, dtype)), quant, INT4_GROUP,
                                empty=True)
    tensors = list(layer.parameters()) + [b for b in layer.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(config: Qwen2Config, devices: int = 1, quant: str = "none", dtype: str = "bfloat16") -> int:
    """Bytes of rank 0's weights with the model sharded over `devices`."""
    linears, norms, rows = shard_tensors(config, devices)
    elt, h = FLOAT_BYTES[dtype], config.hidden_size
    total = sum(n * linear_bytes(*shape, quant, dtype) for shape, n in linears.items())
    if quant in GGUF_TYPES:  # llama.cpp quantizes the embedding too; norms stay f32
        return total + 4 * norms + linear_bytes(rows, h, False, quant, dtype) * (1 + (not config.tie_word_embeddings))
    total += norms * elt + rows * h * elt  # norms and the embedding stay float
    if not config.tie_word_embeddings or quant != "none":  # a tied head shares the float embedding, or is a copy
        total += linear_bytes(rows, h, False, quant, dtype)
    return total


def kv_bytes_per_token(config: Qwen2Config, devices: int = 1, dtype: str = "bfloat16") -> int:
    """The engine's KV cache per token on one device: keys and values of every layer, its KV heads."""
    return 2 * config.num_hidden_layers * (config.num_key_value_heads // devices) * config.head_dim * \
        FLOAT_BYTES[dtype]


def activation_bytes(config: Qwen2Config, devices: int, ctx: int, batch: int, dtype: str = "bfloat16") -> int:
    """An estimate of one prefill chunk's transients on one device (see the module docstring)."""
    shards = _shards(config, devices)
    local, elt, h = shards.rank_config(), FLOAT_BYTES[dtype], config.hidden_size
    t = PREFILL_CHUNK  # a chunk of prompt, or as many decoding sequences
    heads, hd = local.num_attention_heads, config.head_dim
    if config.is_moe:
        width = config.num_experts_per_tok * config.moe_intermediate_size + local.shared_expert_intermediate_size
    else:
        width = local.intermediate_size
    per_token = (4 * h + (heads + 2 * local.num_key_value_heads) * hd + 3 * width) * elt
    scores = t * ctx * (4 * heads + 1)  # float32 scores of one layer and the boolean mask
    logits = 2 * batch * config.vocab_size * 4  # this rank's float32 logits and the gathered whole
    return t * per_token + scores + logits


def sized_as(quant: str) -> str:
    """What a plan sizes a quant mode as: auto is float (plans are for devices of --device-memory,
    where auto runs float), GPTQ/AWQ their int4 groups, a GGUF its block type."""
    if quant not in QUANTS:
        raise OptionError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if quant in MODES and file_blocks(quant):
        raise OptionError(f"--quant {quant} holds a file's own block types: plan it by its type, one of "
                          f"{', '.join(FILE_BLOCK_TYPES)}")
    if quant == "auto":
        return "none"
    return "int4" if quant in MODES and MODES[quant].kind == "checkpoint" else quant


def plan(config: Qwen2Config, devices: int, device_memory: int, quant: str = "none", dtype: str = "bfloat16",
         ctx: int = 8192, batch: int = 1) -> MemoryPlan:
    """The bytes per device at `ctx` and `batch`, and the largest context and batch that fit."""
    quant = sized_as(quant)
    if dtype not in FLOAT_BYTES:
        raise OptionError(f"unknown --dtype {dtype!r}; choose one of {', '.join(FLOAT_BYTES)}")
    if devices < 1 or ctx < 1 or batch < 1:
        raise OptionError("--devices, --ctx and --batch must be at least 1")
    weights = weight_bytes(config, devices, quant, dtype)
    per_token = kv_bytes_per_token(config, devices, dtype)
    room = device_memory * USABLE - weights
    # activations are linear in the context (the scores) and in the batch (the logits)
    base = activation_bytes(config, devices, ctx, 0, dtype)
    scores_per_ctx = activation_bytes(config, devices, 2, 0, dtype) - activation_bytes(config, devices, 1, 0, dtype)
    logits_per_seq = activation_bytes(config, devices, ctx, 1, dtype) - base
    fixed = base - scores_per_ctx * ctx
    max_ctx = int((room - fixed - batch * logits_per_seq) // (batch * per_token + scores_per_ctx))
    max_batch = int((room - base) // (ctx * per_token + logits_per_seq))
    return MemoryPlan(devices, weights, per_token, per_token * ctx * batch,
                      activation_bytes(config, devices, ctx, batch, dtype), device_memory, ctx, batch,
                      max(0, min(max_ctx, config.context_limit)), max(0, max_batch))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(config: Qwen2Config, name: str, device_counts: list[int], device_memory: int, quant: str, dtype: str,
          ctx: int, batch: int) -> str:
    """The plan for each device count, as printed by `qwen2 info --plan`."""
    sized = sized_as(quant)
    kind = {"none": dtype}.get(sized, sized) + (f" ({quant})" if sized != quant else "")
    beyond = f" (beyond the model's {config.context_limit}-token limit)" if ctx > config.context_limit else ""
    lines = [f"# {name}: weights {kind}, KV cache {dtype}, context {ctx}{beyond}, batch {batch}, "
             f"{gib(device_memory)} per device ({USABLE:.0%} planned for)",
             f"{'devices':>7}  {'weights':>11}  {'KV cache':>11}  {'activations':>11}  {'total':>11}  {'fits':>4}  "
             f"{'max context':>11}  {'max batch':>9}"]
    for n in device_counts:
        try:
            p = plan(config, n, device_memory, quant, dtype, ctx, batch)
        except ConfigError:
            lines.append(f"{n:>7}  not possible: {config.num_key_value_heads} KV heads do not split over {n} "
                         "devices (tensor parallelism needs whole KV heads per device)")
            continue
        lines.append(f"{n:>7}  {gib(p.weights):>11}  {gib(p.kv):>11}  {gib(p.activations):>11}  {gib(p.total):>11}  "
                     f"{'yes' if p.fits else 'no':>4}  {p.max_ctx:>11}  {p.max_batch:>9}")
    return "\n".join(lines)
