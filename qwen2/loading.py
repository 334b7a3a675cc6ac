"""The composition root: a model spec and its options -> a built network and its tokenizer.

Every front door loads here: `from qwen2 import load`, the CLI, the server, eval and bench.
weights/ turns a spec into files and files into a config and tensors; this module chooses
device and dtype, builds the Transformer, quantizes it (or maps a cached quantized copy),
applies the long-context overrides, and hands the engine a finished model.

```python
from qwen2 import load
llm = load()                                          # the embedded default, options as the CLI's
model, tokenizer = load_model(quant="none")           # the network alone, e.g. for training
```
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

from qwen2.config import Qwen2Config
from qwen2.dca import parse_dca
from qwen2.device import resolve_device, resolve_dtype
from qwen2.distributed import expert_parallel, tensor_parallel
from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.engine.lora import AdapterSet, read_adapter
from qwen2.engine.speculative import DraftModel, PromptLookup
from qwen2.errors import OptionError, Qwen2Error
from qwen2.memory import onto_huge_pages
from qwen2.model import Transformer
from qwen2.options import DEFAULT_CTX, DEFAULTS, KERNELS
from qwen2.quant import CUDA_BLOCK_TYPES, MODES, file_blocks, resolve_quant
from qwen2.quant.blocks import attach_blocks, blocks_from_float, compiled_ops
from qwen2.quant.int_linear import int4_layout, quantize_model
from qwen2.quant.kernels import BLOCKS
from qwen2.quant.prequantized import attach_int4
from qwen2.rope import parse_rope_scaling
from qwen2.tokenizer import Tokenizer, read_chat_template
from qwen2.weights import describe, load_checkpoint, quantized
from qwen2.weights.gguf import Blocks
from qwen2.weights.gptq_awq import UnpackedLinear, read_config

log = logging.getLogger(__name__)
INT4_GROUP = 128


def with_long_context(config: Qwen2Config, rope_scaling: str | None, dca: str | None) -> Qwen2Config:
    """The config with the rope-scaling / DCA overrides applied (its context limit follows them)."""
    changes: dict = {}
    if rope_scaling:
        scaling = parse_rope_scaling(rope_scaling)
        scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        changes["rope_scaling"] = scaling if scaling.get("rope_type") != "default" else None
    if dca:
        changes["dual_chunk_attention_config"] = parse_dca(dca)
    return dataclasses.replace(config, **changes) if changes else config


def _quant_settings(mode: str, dtype: torch.dtype) -> dict:
    """Everything a quantized model's tensors depend on besides the source file."""
    return {"mode": mode, "group_size": INT4_GROUP, "dtype": str(dtype), "torch": torch.__version__,
            "int4_layout": int4_layout(), "activations": str(MODES[mode].activations)}


def model_from_cache(entry: Path) -> tuple[Transformer, Tokenizer] | None:
    """The quantized model a cache entry holds, or None when it is missing or unusable."""
    found = quantized.read_entry(entry)
    if found is None:
        return None
    config, tokenizer, state, settings = found
    try:
        with torch.device("meta"):  # the module tree only, filled from the mapped file below
            model = Transformer(config)
            saved = MODES[settings["mode"]]
            if saved.kind == "blocks":
                blocks_from_float(model, saved.block_type, empty=True, activations=saved.activations)
            else:
                quantize_model(model, settings["mode"], int(settings["group_size"]), empty=True)
        for table in ("blocks", "packed"):  # one copy of a tied table
            if config.tie_word_embeddings and hasattr(model.lm_head, table) and f"lm_head.{table}" not in state:
                state[f"lm_head.{table}"] = state[f"model.embed_tokens.{table}"]
        model.load_state_dict(state, assign=True, strict=True)
    except (Qwen2Error, KeyError, ValueError, RuntimeError) as e:
        log.warning("ignoring the quantized cache %s (%s); rebuilding it", entry, e)
        return None
    model.set_rope(config)  # the rotary buffer is not in the file
    return model.eval(), tokenizer


def load_model(model: str | Path | None = DEFAULTS.model, *, dtype: str = DEFAULTS.dtype,
               device: str | None = DEFAULTS.device, quant: str = DEFAULTS.quant,
               rope_scaling: str | None = DEFAULTS.rope_scaling, dca: str | None = DEFAULTS.dca,
               chat_template: str | None = DEFAULTS.chat_template, kernels: str = DEFAULTS.kernels,
               experts_of: tuple[int, int] | None = None) -> tuple[Transformer, Tokenizer]:
    """The network, built and placed, and its tokenizer: no engine, no KV cache.

    model: see qwen2.weights.locate. quant: a mode of qwen2.quant's table, "auto" resolved by
    its resolve_quant; pass "none" for the float network (training, numerical comparisons).
    Quantized CPU models are cached on disk after their first load (qwen2.weights.quantized),
    so later starts map them. The whole model in every process, torchrun's included (training
    runs data-parallel); load() shards it under torchrun. chat_template: a jinja file to use
    instead of the model's template. experts_of=(rank, world): an MoE model with only process
    `rank`'s share of each layer's experts, the others never read (expert-parallel training).
    """
    template = read_chat_template(chat_template) if chat_template else None
    net, tokenizer, _ = build_model(model, dtype=dtype, device=device, quant=quant, rope_scaling=rope_scaling,
                                    dca=dca, kernels=kernels, experts_of=experts_of)
    tokenizer.chat_template = template or tokenizer.chat_template
    return net, tokenizer


def build_model(model: str | Path | None, *, dtype: str | None, device: str | None, quant: str | None,
                rope_scaling: str | None, dca: str | None, kernels: str = DEFAULTS.kernels, world: int = 1,
                experts_of: tuple[int, int] | None = None) -> tuple[Transformer, Tokenizer, str]:
    """load_model's network and tokenizer, and the quant mode it runs, in one sequence: describe
    -> resolve -> plan -> read (whole, or this rank's part of `world` tensor-parallel ranks) ->
    build -> parallelize -> quantize or attach blocks -> long context; a quantized model made at
    load is cached, and a cached one replaces reading, building and quantizing."""
    rank = tensor_parallel.rank() if world > 1 else 0
    try:  # under torchrun every rank checks the options; rank 0 alone says what is wrong
        config, _, source = describe(model)
        dev = resolve_device(device) if world == 1 else tensor_parallel.rank_device(resolve_device(device))
        mode = resolve_quant(quant, dev.type, source, world)
        check_kernels(kernels, dev.type, world)
        kind = MODES[mode].kind
        # exactly the weights: the CPU's block kernels compute in float32, and tensor parallelism on
        # the CPU computes what one process's default does
        exact = (kind == "blocks" or world > 1 and quant in (None, "auto")) and dev.type == "cpu"
        dt = resolve_dtype(dtype, dev, exact=exact)
        if experts_of is not None:
            plan = expert_parallel.ExpertPlan(config, *experts_of)
        else:
            plan = tensor_parallel.Plan(config, rank, world) if world > 1 else None
    except Qwen2Error:
        if rank:
            sys.exit(1)
        raise
    made_at_load = kind in ("int", "blocks") and not file_blocks(mode) and dev.type == "cpu" and plan is None
    settings = _quant_settings(mode, dt)
    entry = quantized.entry_for(source, settings) if made_at_load else None
    built = model_from_cache(entry) if entry is not None else None
    if built is None:
        built = _read_and_build(source, mode, dt, dev, plan, "cpu" if dev.type == "cpu" else "triton",
                                "triton" if kernels == "triton" else "tinygemm")
        if entry is not None:
            net, tokenizer = built
            state = net.state_dict()
            if net.config.tie_word_embeddings:
                for table in ("blocks", "packed"):  # the embedding's, stored once
                    state.pop(f"lm_head.{table}", None)
            quantized.write_entry(entry, net.config, tokenizer, state, settings)
    net, tokenizer = built
    net.set_rope(with_long_context(net.config, rope_scaling, dca))
    if dev.type == "cpu" and MODES[mode].kind == "blocks":
        fuse_block_steps(net)
    if kernels == "triton":
        from qwen2.engine.triton_decode import TritonDecode  # Triton comes with CUDA builds of torch

        net.decode_step = TritonDecode(net)
    return net, tokenizer, mode


def check_kernels(kernels: str, device: str, world: int) -> None:
    """Refuse a --kernels choice this run cannot take, saying what to use."""
    if kernels not in KERNELS:
        raise OptionError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "triton" and device != "cuda":
        raise OptionError(f"--kernels triton runs on CUDA, not {device}: our compiled kernels already run there "
                          "(use auto)")
    if kernels == "triton" and world > 1:
        raise OptionError("--kernels triton does not run under tensor parallelism (torchrun); use auto")


def fuse_block_steps(net: Transformer) -> None:
    """A CPU model on block kernels runs its decode and prefill steps fused, layer by layer, over
    repacked weights moved onto huge pages first (the fused steps keep references to them)."""
    from qwen2.quant.fused_decode import FusedDecode
    from qwen2.quant.fused_moe import fuse_experts
    from qwen2.quant.fused_prefill import FusedPrefill

    onto_huge_pages(net)
    net.decode_step, net.prefill_step = FusedDecode.for_model(net), FusedPrefill.for_model(net)
    net.argmax_rows = compiled_ops().argmax_rows
    fuse_experts(net)


def inference_copy(config: Qwen2Config, state: dict[str, torch.Tensor], mode: str = "q8_0",
                   device: torch.device | str = "cpu") -> Transformer:
    """An inference copy of float weights (a training model's current ones, say): with a blocks mode
    on the CPU, each matrix encoded as its blocks for our kernels and the steps fused; with "none" the
    float32 weights as they are, on `device`."""
    blocks = MODES[mode].kind == "blocks"
    with torch.device("meta"):
        net = Transformer(config)
    net.adopt({k: v.detach().to("cpu" if blocks else device, torch.float32, copy=True) for k, v in state.items()},
              dtype=torch.float32, device="cpu" if blocks else device)
    if blocks:
        blocks_from_float(net, MODES[mode].block_type, activations=MODES[mode].activations)
        net.set_rope(config)
        fuse_block_steps(net)
    return net.eval()


def _read_and_build(source: Path, mode: str, dtype: torch.dtype, device: torch.device,
                    plan: tensor_parallel.Plan | expert_parallel.ExpertPlan | None,
                    block_kernels: str = "cpu", int4_kernel: str = "tinygemm") -> tuple[Transformer, Tokenizer]:
    """Read the tensors (this rank's part under a plan), build, parallelize, then quantize: the
    mode's layers swapped in, or a file's own quantized matrices (GGUF blocks, GPTQ/AWQ integers)
    attached where their float matrices would be. A GGUF's blocks run on `block_kernels`: "cpu"
    (our compiled kernels) or "triton" (the CUDA ones, which Triton's interpreter also runs); int4
    layers on CUDA on `int4_kernel` (qwen2.quant.cuda_int4.KERNELS)."""
    kind = MODES[mode].kind
    on_triton = block_kernels == "triton"
    # Triton takes a file's quantized types as blocks (its F16 and BF16 matrices load as float)
    keep = (frozenset(CUDA_BLOCK_TYPES) if on_triton else frozenset(BLOCKS)) if file_blocks(mode) else frozenset()
    config, state, tokenizer = load_checkpoint(source, dtype=dtype, keep_blocks=keep, keep_packed=kind == "checkpoint",
                                               select=plan.select if plan else None)
    kept = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}  # Blocks or UnpackedLinear
    # until they are attached, kept matrices stand in as zero-stride views of their shape, already of the
    # device and dtype, so that adopting them allocates nothing
    state = {k: torch.zeros((), dtype=dtype, device=device).expand(_shape(v)) if k in kept else v
             for k, v in state.items()}
    with torch.device("meta"):
        net = Transformer(plan.rank_config() if plan else config)
    if plan is not None:
        plan.parallelize(net)
        state = plan.pad(state)
    net.adopt(state, dtype=dtype, device=device)
    del state  # each float matrix is freed as its quantized replacement takes its place
    if file_blocks(mode) and on_triton:
        from qwen2.quant.triton_blocks import attach_triton_blocks  # Triton comes with CUDA builds of torch

        attach_triton_blocks(net, kept, dtype, device)
    elif file_blocks(mode):  # the file's own blocks, where its types have a kernel (float ones stay float)
        attach_blocks(net, kept, dtype, MODES[mode].activations, mapped=True)
    elif kind == "checkpoint":
        attach_int4(net, kept, read_config(source)[1].group_size, dtype, int4_kernel)
    elif kind == "blocks":
        blocks_from_float(net, MODES[mode].block_type, activations=MODES[mode].activations)
    elif kind == "int":
        quantize_model(net, mode, INT4_GROUP, cuda_kernel=int4_kernel)
    return net, tokenizer


def _shape(kept: Blocks | UnpackedLinear) -> tuple[int, ...]:
    return tuple(kept.shape) if isinstance(kept, Blocks) else tuple(kept.q.shape)


def load(model: str | Path | None = DEFAULTS.model, *, dtype: str = DEFAULTS.dtype,
         device: str | None = DEFAULTS.device, quant: str = DEFAULTS.quant, ctx: int | None = DEFAULTS.ctx,
         rope_scaling: str | None = DEFAULTS.rope_scaling, dca: str | None = DEFAULTS.dca,
         speculative: str | None = DEFAULTS.speculative, chat_template: str | None = DEFAULTS.chat_template,
         kernels: str = DEFAULTS.kernels, max_concurrency: int = 64, kv_memory: int | None = None,
         prefill_chunk: int = 512, kv_share: float | None = None, lora: dict[str, str | Path] | None = None) -> LLM:
    """Load a model and an engine over it; the keyword arguments mean what the CLI options do.

    ctx: KV cache tokens per sequence (prompt and reply), default 32768 or the model's context
    limit if smaller. rope_scaling: e.g. "yarn:4" (static YaRN changes outputs on short prompts
    too, so it is opt-in). dca: "CHUNK" or "CHUNK:LOCAL" turns on Dual Chunk Attention.
    speculative: "ngram" (prompt lookup) or a draft model spec (same tokenizer) for greedy
    decoding. chat_template: a jinja file to use instead of the model's template. kernels: "triton"
    runs int4 layers and the decode step on our Triton kernels (CUDA only; qwen2.options.KERNELS).
    max_concurrency: sequences decoded together at most. kv_memory: bytes of the
    paged KV cache all sequences share (default: a quarter of the available RAM, half the free
    GPU memory; see qwen2.engine.engine). kv_share: when
    kv_memory is not given, this share of the available memory, not capped at max_concurrency
    sequences (a prefix cache that keeps a whole document). lora: {name: PEFT adapter folder},
    the LoRA adapters a request may run with (Engine.submit's `adapter`; qwen2.engine.lora).
    """
    start = time.perf_counter()
    if ctx is not None and (not isinstance(ctx, int) or ctx < 1):
        raise OptionError(f"--ctx must be a positive number of tokens, got {ctx!r}")
    if max_concurrency < 1 or prefill_chunk < 1:
        raise OptionError("max_concurrency and prefill_chunk must be at least 1")
    template = read_chat_template(chat_template) if chat_template else None  # a bad file fails before loading
    world = tensor_parallel.world_size()  # under torchrun, one model sharded over its processes
    adapters = [read_adapter(name, path) for name, path in (lora or {}).items()]  # a bad one fails before loading
    if adapters and world > 1:
        raise OptionError("--lora does not run under tensor parallelism (torchrun): the adapters are not sharded")
    net, tokenizer, mode = build_model(model, dtype=dtype, device=device, quant=quant, rope_scaling=rope_scaling,
                                       dca=dca, kernels=kernels, world=world)
    tokenizer.chat_template = template or tokenizer.chat_template
    if world > 1:  # rank 0 leads the other ranks, which never return from here
        net = tensor_parallel.lead(net, net.model.norm.weight.device)
    if ctx is None:
        ctx = min(DEFAULT_CTX, net.config.context_limit)
    net.config.check_context(ctx, f"a KV cache of {ctx} tokens per sequence (--ctx)")
    speculator = None
    if speculative == "ngram":
        speculator = PromptLookup()
    elif speculative:
        draft, draft_tokenizer = load_model(speculative, dtype=dtype, device=device, quant="none")
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise OptionError(f"the draft model {speculative} has a different vocabulary ({draft_tokenizer.vocab_size} "
                              f"tokens, the model {tokenizer.vocab_size}); it must share the model's tokenizer")
        speculator = DraftModel(draft, ctx)
    engine = Engine(net, tokenizer, max_concurrency=max_concurrency, max_seq_len=ctx, prefill_chunk=prefill_chunk,
                    speculator=speculator, kv_memory=kv_memory, kv_share=kv_share, adapters=AdapterSet(net, adapters))
    return LLM(net, tokenizer, engine, time.perf_counter() - start, quant=mode)
