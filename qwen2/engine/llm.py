"""The synchronous Python front door over the engine: `generate()` and `chat()`.

qwen2.loading.load() builds one:

```python
from qwen2 import load
llm = load()                                   # the embedded default model
print(llm.chat([{"role": "user", "content": "hi"}]).text)
for piece in llm.generate("def fib(n):", max_tokens=64, stream=True): ...
texts = [c.text for c in llm.generate(["def fib(n):", "def sort(xs):"], max_tokens=64)]  # a batch, in order
vectors = llm.embed(["a query", "a passage"])  # (2, hidden) unit vectors (qwen2.embeddings)
```
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qwen2 import embeddings
from qwen2.config import Qwen2Config
from qwen2.engine.engine import Engine, Request
from qwen2.engine.sampling import SamplingParams
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, engine: Engine, load_seconds: float = 0.0,
                 quant: str = "none"):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.load_seconds = load_seconds
        self.quant = quant  # the mode of qwen2.quant's table the weights run in

    @property
    def config(self) -> Qwen2Config:
        return self.model.config

    def generate(self, prompt: str | list[int] | list[str] | list[list[int]], stream: bool = False,
                 **sampling) -> Completion | list[Completion] | Iterator[str]:
        """Raw completion of `prompt` (no chat template); of a list of prompts (texts, or lists of
        token ids), their completions in order, decoded together. `sampling`: SamplingParams fields."""
        if _is_batch(prompt):
            if stream:
                raise ValueError("stream=True takes one prompt; a list of prompts comes back whole")
            return self._batch(prompt, SamplingParams(**sampling))
        request = self.engine.submit(prompt, SamplingParams(**sampling))
        if stream:
            return TextStream(self.engine, request)
        text = ""
        for out in self.engine.stream(request):
            if out.finish_reason == "error":
                raise RuntimeError(out.error)
            text += out.text
        return Completion(text, request.output, request.finish_reason, len(request.prompt),
                          request.cached_tokens)

    def chat(self, messages: list[dict] | list[list[dict]], tools: list[dict] | None = None, stream: bool = False,
             **sampling) -> Completion | list[Completion] | Iterator[str]:
        """The assistant's reply to `messages`, or to each of a list of conversations (in order).
        Sampling fields not given take the model's defaults (Tokenizer.sampling_defaults)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(m, tools=tools, add_generation_prompt=True)
                   for m in conversations]
        return self.generate(prompts if conversations is messages else prompts[0], stream=stream,
                             **self.tokenizer.sampling_defaults | sampling)

    def embed(self, texts: str | list[str] | list[list[int]], pooling: str = "last",
              dimensions: int | None = None) -> torch.Tensor:
        """(N, hidden or `dimensions`) float32 unit vectors, one per text (or list of token ids), in order;
        `pooling` "last" or "mean" (qwen2.embeddings)."""
        if pooling not in embeddings.POOLINGS:
            raise ValueError(f"pooling must be one of {embeddings.POOLINGS}, got {pooling!r}")
        texts = [texts] if isinstance(texts, str) else texts
        ids = [embeddings.input_ids(self.tokenizer, self.tokenizer.encode(t) if isinstance(t, str) else list(t),
                                    pooling) for t in texts]
        if not ids or not all(ids):
            raise ValueError("nothing to embed: give at least one non-empty input")
        vectors = torch.empty(len(ids), self.config.hidden_size)
        for group in embeddings.batches([len(x) for x in ids], self.engine.prefill_chunk):
            vectors[group] = embeddings.embed(self.model, [ids[i] for i in group], pooling)
        return embeddings.shorten(vectors, dimensions)

    def _batch(self, prompts: list, params: SamplingParams) -> list[Completion]:
        done = self.engine.run_all(prompts, [params] * len(prompts))
        failed = [r for r, _ in done if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"generation failed in {failed[0].failed_in}")
        return [Completion(text, r.output, r.finish_reason, len(r.prompt), r.cached_tokens) for r, text in done]


def _is_batch(prompt) -> bool:
    """A list of texts or of token-id lists (a list of ints is one prompt's token ids)."""
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


class TextStream:
    """The text pieces of one request as they are generated. Closing it, or dropping it (even
    before the first piece), cancels the request, so the engine's next step no longer runs it."""

    def __init__(self, engine: Engine, request: Request):
        self.engine, self.request = engine, request
        self._outputs = engine.stream(request)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        for out in self._outputs:
            if out.finish_reason == "error":
                self.close()
                raise RuntimeError(out.error)
            if out.text:
                return out.text
        raise StopIteration

    def close(self) -> None:
        self._outputs.close()
        self.engine.cancel(self.request)

    def __del__(self) -> None:
        self.close()
