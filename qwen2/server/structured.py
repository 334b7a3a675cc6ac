"""Structured output by constrained decoding: JSON (any object, or one that follows a JSON
Schema), one of a list of choices, a regular expression, or a grammar in llguidance's Lark
dialect (vLLM's `structured_outputs` json / choice / regex / grammar).

Each request gets a logits processor (`SamplingParams.logits_processors`) that masks every token
the grammar does not allow next, so the reply always matches; once it is complete only the end
tokens stay allowed, which forces `<|im_end|>`. The same mechanism forces
a tool call (`tool_choice` "required" or a named function): the reply is constrained to one
`{"name": ..., "arguments": ...}` object whose arguments follow the function's parameters.

Library: llguidance. Measured here (2 busy shared cores, torch 2.13, the real 151,936-token
vocabulary, a 4-field schema, a 34-token reply; mask applied with numpy for all four):
                          per schema   per token: median / mean   once per tokenizer
  llguidance 1.9.1           0.7 ms           0.15 / 0.30 ms           1-2.5 s
  xgrammar 0.2.8            30 ms             0.11 / 0.25 ms           0.2 s
  outlines-core 0.2.14     700 ms             0.05 / 4.0 ms            2 s
  lm-format-enforcer 0.11    0.5 ms           9 / 32 ms                4 s
llguidance and xgrammar are both fast enough; llguidance is one 8 MB wheel with no dependencies
that reads our tokenizer.json as is (llama.cpp, vLLM and SGLang use it), while xgrammar pulls
triton (1 GB) and tvm-ffi into a CPU install and compiles each schema 40x slower.
Separators are fixed to ", " and ": " with no free whitespace, so a small model cannot loop on
newlines. Not covered: schema keywords and grammar features llguidance does not implement (the
request gets a 400 naming them); a reply cut by max_tokens is incomplete (finish_reason "length").
"""

from __future__ import annotations

import json
import logging
from typing import Any

import llguidance
import numpy as np
import torch

from qwen2.errors import RequestError
from qwen2.tokenizer import Tokenizer

log = logging.getLogger(__name__)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarProcessor:
    """(generated ids, logits row) -> logits with the disallowed tokens at -inf."""

    def __init__(self, matcher: llguidance.LLMatcher, end_ids: list[int]):
        self.matcher, self.end_ids = matcher, end_ids
        self.seen = 0  # generated tokens already fed to the matcher

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(generated) > self.seen:
            self.matcher.consume_tokens(generated[self.seen:])
            self.seen = len(generated)
        if self.matcher.is_error():  # never leave a row with no token allowed: end the reply instead
            log.error("constrained decoding failed: %s", self.matcher.get_error())
            allowed = np.zeros(logits.shape[-1], bool)
            allowed[self.end_ids] = True
        else:
            bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
            allowed = bits[: logits.shape[-1]].astype(bool)
        if not logits.is_cpu:
            return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))
        # numpy, not torch: on a busy CPU torch's threaded elementwise ops on one 152k row cost
        # 10-30 ms each (threads waiting for a core), numpy's single-threaded ones 0.1-0.3 ms
        row = logits.numpy().copy()
        row[~allowed] = -np.inf
        return torch.from_numpy(row)


class Grammars:
    """Builds JSON processors for one tokenizer (reading its vocabulary takes about a second, once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.end_ids = tokenizer.eos_token_ids
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=self.end_ids)

    def json(self, schema: dict[str, Any] | None = None) -> GrammarProcessor:
        """A processor for JSON that follows `schema` (None: any JSON object)."""
        return self._processor(llguidance.LLMatcher.grammar_from_json_schema(schema or {"type": "object"},
                                                                              defaults=JSON_OPTIONS), "JSON schema")

    def choice(self, choices: list[str]) -> GrammarProcessor:
        """A processor for exactly one of `choices`."""
        return self.lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))

    def regex(self, pattern: str) -> GrammarProcessor:
        """A processor for text that matches `pattern` whole (Rust regex syntax)."""
        return self._processor(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    def lark(self, grammar: str) -> GrammarProcessor:
        """A processor for text in the language of a Lark grammar (llguidance's dialect: `start: ...`)."""
        return self._processor(llguidance.LLMatcher.grammar_from_lark(grammar), "grammar")

    def _processor(self, grammar: str, what: str) -> GrammarProcessor:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"the {what} cannot be enforced: {matcher.get_error()}")
        return GrammarProcessor(matcher, self.end_ids)


def tool_call_schema(tools: list[dict], name: str | None = None) -> dict[str, Any]:
    """The JSON of one call to the function `name` (None: to any of `tools`)."""
    def call(function: dict) -> dict:
        return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": function["name"]},
                               "arguments": function.get("parameters") or {"type": "object"}}}

    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    return call(functions[0]) if len(functions) == 1 else {"anyOf": [call(f) for f in functions]}
