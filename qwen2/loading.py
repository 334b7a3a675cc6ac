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
import time
from pathlib import Path

import torch

from qwen2.config import Qwen2Config
from qwen2.dca import parse_dca
from qwen2.device import default_device, default_dtype
from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.engine.speculative import DraftModel, PromptLookup
from qwen2.errors import OptionError, Qwen2Error
from qwen2.model import Transformer
from qwen2.options import DEFAULT_CTX, DEFAULTS, DTYPES, QUANT_MODES
from qwen2.quant import int4_layout, quantize_model
from qwen2.rope import parse_rope_scaling
from qwen2.tokenizer import Tokenizer
from qwen2.weights import load_checkpoint, quantized, resolve_model

log = logging.getLogger(__name__)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT4_GROUP = 128


def resolve_device(name: str | None) -> torch.device:
    """None or "auto": CUDA if present, else CPU. A device this torch cannot use is an OptionError."""
    if name in (None, "auto"):
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"unknown device {name!r}: choose cpu or cuda (cuda:N for one GPU)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise OptionError(f"device {name!r}: this build of torch ({torch.__version__}) has no CUDA support; "
                              "use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise OptionError(f"device {name!r}: no such CUDA device is visible ({torch.cuda.device_count()} "
                              "found); check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu")
    elif device.type != "cpu":
        raise OptionError(f"device {name!r} is not supported: choose cpu or cuda (cuda:N for one GPU)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA and on CPUs with native bf16 matmul, else float32 (qwen2.device)."""
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in TORCH_DTYPES:
        raise OptionError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return TORCH_DTYPES[name]


def resolve_quant(quant: str, device: torch.device) -> str:
    """auto: int8 weights on CPU, float on CUDA. Measured with `qwen2 bench` on a quiet 2-core
    AVX512-BF16 EPYC (bench/RESULTS.md): int8 decodes 2x faster than bf16 at a small cost
    (top-1 agreement with float32 96.3% vs bf16's 97.7%); int4 doubles that again but agrees on
    only 76% of positions after re-quantizing the default GGUF (mostly 5-bit), so it stays
    opt-in. For many concurrent requests bf16 is fastest (c16 118 vs 90 tok/s)."""
    if quant not in QUANT_MODES:
        raise OptionError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    if quant == "auto":
        return "int8" if device.type == "cpu" else "none"
    return quant


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
            "int4_layout": int4_layout()}


def model_from_cache(entry: Path) -> tuple[Transformer, Tokenizer] | None:
    """The quantized model a cache entry holds, or None when it is missing or unusable."""
    found = quantized.read_entry(entry)
    if found is None:
        return None
    config, tokenizer, state, settings = found
    try:
        with torch.device("meta"):  # the module tree only, filled from the mapped file below
            model = quantize_model(Transformer(config), settings["mode"], int(settings["group_size"]), empty=True)
        model.load_state_dict(state, assign=True, strict=True)
    except (Qwen2Error, KeyError, ValueError, RuntimeError) as e:
        log.warning("ignoring the quantized cache %s (%s); rebuilding it", entry, e)
        return None
    model.set_rope(config)  # the rotary buffer is not in the file
    return model.eval(), tokenizer


def load_model(model: str | Path | None = DEFAULTS.model, *, dtype: str = DEFAULTS.dtype,
               device: str | None = DEFAULTS.device, quant: str = DEFAULTS.quant,
               rope_scaling: str | None = DEFAULTS.rope_scaling, dca: str | None = DEFAULTS.dca,
               ) -> tuple[Transformer, Tokenizer]:
    """The network, built and placed, and its tokenizer: no engine, no KV cache.

    model: see qwen2.weights.locate. quant "auto" means int8 on CPU (see resolve_quant); pass
    "none" for the float network (training, numerical comparisons). Quantized CPU models are
    cached on disk after their first load (qwen2.weights.quantized), so later starts map them.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    mode = resolve_quant(quant, dev)
    source, entry, net = resolve_model(model), None, None
    settings = _quant_settings(mode, dt)
    if mode != "none" and dev.type == "cpu":
        entry = quantized.entry_for(source, settings)
        built = model_from_cache(entry)
        if built is not None:
            net, tokenizer = built
    if net is None:
        config, state_dict, tokenizer = load_checkpoint(source, dtype=dt)
        net = Transformer.from_state_dict(config, state_dict, dtype=dt, device=dev)
        del state_dict  # each float matrix is freed as its quantized replacement takes its place
        if mode != "none":
            quantize_model(net, mode, INT4_GROUP)
        if entry is not None:
            quantized.write_entry(entry, net.config, tokenizer, net.state_dict(), settings)
    net.set_rope(with_long_context(net.config, rope_scaling, dca))
    return net, tokenizer


def load(model: str | Path | None = DEFAULTS.model, *, dtype: str = DEFAULTS.dtype,
         device: str | None = DEFAULTS.device, quant: str = DEFAULTS.quant, ctx: int | None = DEFAULTS.ctx,
         rope_scaling: str | None = DEFAULTS.rope_scaling, dca: str | None = DEFAULTS.dca,
         speculative: str | None = DEFAULTS.speculative, max_slots: int = 2, prefill_chunk: int = 512) -> LLM:
    """Load a model and an engine over it; the keyword arguments mean what the CLI options do.

    ctx: KV cache tokens per sequence (prompt and reply), default 8192 or the model's context
    limit if smaller. rope_scaling: e.g. "yarn:4" (static YaRN changes outputs on short prompts
    too, so it is opt-in). dca: "CHUNK" or "CHUNK:LOCAL" turns on Dual Chunk Attention.
    speculative: "ngram" (prompt lookup) or a draft model spec (same tokenizer) for greedy
    decoding. max_slots: sequences decoded together.
    """
    start = time.perf_counter()
    if ctx is not None and (not isinstance(ctx, int) or ctx < 1):
        raise OptionError(f"--ctx must be a positive number of tokens, got {ctx!r}")
    if max_slots < 1 or prefill_chunk < 1:
        raise OptionError("max_slots and prefill_chunk must be at least 1")
    net, tokenizer = load_model(model, dtype=dtype, device=device, quant=quant, rope_scaling=rope_scaling, dca=dca)
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
        speculator = DraftModel(draft, max_slots, ctx)
    engine = Engine(net, tokenizer, max_slots=max_slots, max_seq_len=ctx, prefill_chunk=prefill_chunk,
                    speculator=speculator)
    return LLM(net, tokenizer, engine, time.perf_counter() - start)
