"""The synchronous Python front door: `load()` a model, then `generate()` or `chat()`.

```python
from qwen2 import load
llm = load()                                   # the embedded default model
print(llm.chat([{"role": "user", "content": "hi"}]).text)
for piece in llm.generate("def fib(n):", max_tokens=64, stream=True): ...
```
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2.device import default_device, default_dtype
from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer
from qwen2.weights import load_checkpoint

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


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise Qwen2Error(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load(model: str | Path | None = None, dtype: str | None = None, device: str | None = None,
         max_slots: int = 2, max_seq_len: int = 8192, prefill_chunk: int = 512) -> LLM:
    """Load a checkpoint (see qwen2.weights.load_checkpoint for what `model` may be)."""
    start = time.perf_counter()
    dev = torch.device(device) if device else default_device()
    dt = resolve_dtype(dtype, dev)
    config, state_dict, tokenizer = load_checkpoint(model, dtype=dt)
    net = Transformer.from_state_dict(config, state_dict, dtype=dt, device=dev)
    engine = Engine(net, tokenizer, max_slots=max_slots, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)
    return LLM(net, tokenizer, engine, time.perf_counter() - start)
