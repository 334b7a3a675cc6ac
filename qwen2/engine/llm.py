"""The synchronous Python front door: `load()` a model, then `generate()` or `chat()`.

```python
from qwen2 import load
llm = load()                                   # the embedded default model
print(llm.chat([{"role": "user", "content": "hi"}]).text)
for piece in llm.generate("def fib(n):", max_tokens=64, stream=True): ...
```
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2.config import Qwen2Config
from qwen2.device import default_device, default_dtype
from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.engine.speculative import DraftModel, PromptLookup
from qwen2.errors import Qwen2Error
from qwen2.model import Transformer
from qwen2.quant import quantize_model
from qwen2.rope import parse_rope_scaling
from qwen2.tokenizer import Tokenizer
from qwen2.weights import load_checkpoint, quantized, resolve_source

QUANT_MODES = ("auto", "none", "int8", "int4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, engine: Engine, load_seconds: float = 0.0):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.load_seconds = load_seconds

    @property
    def config(self):
        return self.model.config

    def generate(self, prompt: str | list[int], stream: bool = False, **sampling) -> Completion | Iterator[str]:
        """Raw completion of `prompt` (no chat template). `sampling`: SamplingParams fields."""
        request = self.engine.submit(prompt, SamplingParams(**sampling))
        if stream:
            return (out.text for out in self.engine.stream(request) if out.text)
        text = "".join(out.text for out in self.engine.stream(request))
        return Completion(text, request.output, request.finish_reason, len(request.prompt),
                          request.cached_tokens)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, stream: bool = False,
             **sampling) -> Completion | Iterator[str]:
        prompt = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        return self.generate(prompt, stream=stream, **sampling)


def with_long_context(config: Qwen2Config, rope_scaling: str | None, dca: str | None) -> Qwen2Config:
    """Apply the CLI/API long-context overrides (the engine's context limit follows them)."""
    changes: dict = {}
    if rope_scaling:
        scaling = parse_rope_scaling(rope_scaling)
        scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        changes["rope_scaling"] = scaling if scaling.get("rope_type") != "default" else None
    if dca:
        try:
            chunk, _, local = dca.partition(":")
            chunk_size = int(chunk)
            local_size = int(local) if local else chunk_size // 8
        except ValueError:
            raise Qwen2Error(f"bad --dca {dca!r}: give CHUNK or CHUNK:LOCAL, e.g. 32768:4096") from None
        changes["dual_chunk_attention_config"] = {"chunk_size": chunk_size, "local_size": local_size}
    return dataclasses.replace(config, **changes) if changes else config


def resolve_quant(quant: str, device: torch.device) -> str:
    """auto: int8 weights on CPU, float on CUDA. Measured with `qwen2 bench` on a quiet 2-core
    AVX512-BF16 EPYC (bench/RESULTS.md): int8 decodes 2x faster than bf16 at a small cost
    (top-1 agreement with float32 96.3% vs bf16's 97.7%); int4 doubles that again but agrees on
    only 76% of positions after re-quantizing the default GGUF (mostly 5-bit), so it stays
    opt-in. For many concurrent requests bf16 is fastest (c16 118 vs 90 tok/s)."""
    if quant not in QUANT_MODES:
        raise Qwen2Error(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    if quant == "auto":
        return "int8" if device.type == "cpu" else "none"
    return quant


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise Qwen2Error(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_weights(model: str | Path | None, dtype: torch.dtype, device: torch.device,
                 quant: str) -> tuple[Transformer, Tokenizer]:
    """The network (quantized as asked) and its tokenizer. Quantized CPU models are cached on
    disk after their first load (qwen2.weights.quantized), so later starts map them."""
    source, entry = resolve_source(model), None
    if quant != "none" and device.type == "cpu":
        entry = quantized.entry_for(source, quant, dtype)
        cached = quantized.load_entry(entry)
        if cached is not None:
            return cached
    config, state_dict, tokenizer = load_checkpoint(source, dtype=dtype)
    net = Transformer.from_state_dict(config, state_dict, dtype=dtype, device=device)
    del state_dict  # each float matrix is freed as its quantized replacement takes its place
    if quant != "none":
        quantize_model(net, quant)
    if entry is not None:
        quantized.save_entry(entry, net, tokenizer, quant)
    return net, tokenizer


def load(model: str | Path | None = None, dtype: str | None = None, device: str | None = None,
         max_slots: int = 2, max_seq_len: int = 8192, prefill_chunk: int = 512,
         rope_scaling: str | None = None, dca: str | None = None, speculative: str | None = None,
         quant: str = "none") -> LLM:
    """Load a checkpoint (see qwen2.weights.load_checkpoint for what `model` may be).

    rope_scaling: an override such as "yarn:4" (see qwen2.rope.parse_rope_scaling); static
    YaRN changes outputs on short prompts too, so it is opt-in. dca: "CHUNK" or "CHUNK:LOCAL"
    turns on Dual Chunk Attention (local defaults to CHUNK/8). speculative: "ngram" (prompt
    lookup) or a draft model spec (same tokenizer) for greedy batch-1 decoding. quant: weight-only
    "int8" / "int4", "none", or "auto" (see resolve_quant).
    """
    start = time.perf_counter()
    dev = torch.device(device) if device else default_device()
    dt = resolve_dtype(dtype, dev)
    mode = resolve_quant(quant, dev)
    net, tokenizer = load_weights(model, dt, dev, mode)
    net.set_rope(with_long_context(net.config, rope_scaling, dca))
    speculator = None
    if speculative == "ngram":
        speculator = PromptLookup()
    elif speculative:
        draft_config, draft_state, _ = load_checkpoint(speculative, dtype=dt)
        draft = Transformer.from_state_dict(draft_config, draft_state, dtype=dt, device=dev)
        speculator = DraftModel(draft, max_slots, max_seq_len)
    engine = Engine(net, tokenizer, max_slots=max_slots, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
                    speculator=speculator)
    return LLM(net, tokenizer, engine, time.perf_counter() - start)
