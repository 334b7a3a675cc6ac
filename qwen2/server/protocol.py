"""The OpenAI request bodies (pydantic, strict types, unknown fields ignored) and their translation
into what the engine and the chat template take.

Covered: chat messages (system/developer, user, assistant with tool_calls, tool; content a string
or a list of text parts), tools and tool_choice, response_format, and the sampling parameters
OpenAI defines plus vLLM's extras (top_k, min_p, repetition_penalty, ignore_eos,
structured_outputs and its older guided_* names); parallel_tool_calls; a completion's suffix
(fill-in-the-middle), echo (the prompt and its tokens' logprobs first; max_tokens 0 with echo: the
prompt alone) and best_of (candidates per prompt, the n most likely returned; not streamed).
Accepted and ignored: user. Not covered: image/audio parts (400).

Bounds, so that no one request can cost the server more than its share (each a 400 naming the
field): numbers finite; at most 16 stop strings of 1..1000 characters; logit_bias at most 300
entries in [-100, 100]; n and best_of at most 16 and at most 64 sequences per request; at most 2048
messages, 128 tools, and 64 KiB for each JSON schema (tool parameters, response_format). The
body size is capped by the server (--max-body); the engine checks the sampling ranges
(SamplingParams.validate).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from qwen2.engine.sampling import SamplingParams

# Without max_tokens a reply may use the rest of the context, but no more than this: a runaway
# reply from a small model would otherwise hold its slot for minutes. A max_tokens beyond the
# context's room is cut to that room (the reply then ends with finish_reason "length").
DEFAULT_MAX_TOKENS = 2048
MAX_SEQUENCES = 64  # prompts x n in one request
MAX_SCHEMA_BYTES = 64 * 1024
Stop = Annotated[str, StringConstraints(max_length=1000)]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(Body):
    include_usage: bool = False


class StructuredOutputs(Body):
    """vLLM's `structured_outputs`: the reply is constrained to one of these (qwen2.server.structured)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON Schema, or its text
    regex: str | None = Field(None, max_length=MAX_SCHEMA_BYTES)
    choice: list[Annotated[str, StringConstraints(min_length=1, max_length=1000)]] | None = Field(
        None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, max_length=MAX_SCHEMA_BYTES)  # llguidance's Lark dialect
    json_object: bool | None = None


class SamplingFields(Body):
    """Shared by chat and completions. None means "not given": the model's default applies
    (its generation_config or GGUF metadata, else Qwen2.5's), as vLLM does."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Stop | list[Stop] | None = Field(None, max_length=16)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    ignore_eos: bool = False
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for the same constraints
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, max_length=MAX_SCHEMA_BYTES)
    guided_choice: list[Annotated[str, StringConstraints(min_length=1, max_length=1000)]] | None = Field(
        None, min_length=1, max_length=1024)
    guided_grammar: str | None = Field(None, max_length=MAX_SCHEMA_BYTES)

    def constraint(self) -> tuple[str, Any] | None:
        """The one constraint asked for, as (kind, value) with kind json / choice / regex / grammar."""
        given = self.structured_outputs or StructuredOutputs()
        asked = {"json": given.json_ if given.json_ is not None else self.guided_json,
                 "choice": given.choice or self.guided_choice, "regex": given.regex or self.guided_regex,
                 "grammar": given.grammar or self.guided_grammar}
        if given.json_object and asked["json"] is None:
            asked["json"] = {"type": "object"}
        asked = {kind: value for kind, value in asked.items() if value is not None}
        if len(asked) > 1:
            raise invalid(f"give one structured output constraint, not {' and '.join(asked)}", "structured_outputs")
        if not asked:
            return None
        kind, value = next(iter(asked.items()))
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise invalid(f"structured_outputs.json is not a JSON schema: {e}", "structured_outputs") from None
        if kind == "json":
            if not isinstance(value, dict):
                raise invalid("structured_outputs.json must be a JSON schema (an object)", "structured_outputs")
            check_schema(value, "structured_outputs")
        return kind, value

    @property
    def candidates(self) -> int:
        """Sequences generated per prompt."""
        return self.n

    def sampling_params(self, prompt_len: int, context: int, index: int = 0, logprobs: int | None = None,
                        processors: list | None = None, defaults: dict | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters for choice `index` (choice i of n is seeded seed + i); a field
        not given takes `defaults` (the model's own, Tokenizer.sampling_defaults), else the engine's."""
        room = context - prompt_len
        given = {k: v for k, v in self.model_dump(include=set(_SAMPLING_NAMES)).items() if v is not None}
        given = (defaults or {}) | given
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=min(DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens, room),
            **given | {"top_k": max(given.get("top_k") or 0, 0)},
            stop=[s for s in stops if s],
            seed=None if self.seed is None else (self.seed + index) % 2**63,
            logit_bias=_logit_bias(self.logit_bias),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logits_processors=processors or [],
        )


_SAMPLING_NAMES = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "min_p",
                   "repetition_penalty")


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        # str.isdigit alone also takes "²" and other digits int() refuses; more than 9 digits is
        # no vocabulary's id, and int() refuses keys past 4,300 digits
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise invalid(f"logit_bias keys must be token ids as strings of digits, got {key[:20]!r}", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid(f"logit_bias values must be in [-100, 100], got {value} for token {key}", "logit_bias")
        out[int(key)] = value
    return out


# -- chat ------------------------------------------------------------------------------------
class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCallIn(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The shape Qwen's chat template reads: text content, tool-call arguments as objects."""
        text = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                    "arguments": _json_or_text(c.function.arguments)}}
                                 for c in self.tool_calls]
        return out


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:  # the template then shows the text as a JSON string
        return arguments


class Function(Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: Function


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


def check_schema(schema: dict[str, Any] | None, param: str) -> None:
    if schema is not None and len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise invalid(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes", param)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1, max_length=2048)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def model_post_init(self, _: Any) -> None:
        self.max_tokens = self.max_completion_tokens or self.max_tokens
        if self.response_format and self.response_format.type == "json_schema" and (
                self.response_format.json_schema is None or self.response_format.json_schema.schema_ is None):
            raise invalid("response_format json_schema needs json_schema.schema", "response_format")
        if self.response_format and self.response_format.json_schema:
            check_schema(self.response_format.json_schema.schema_, "response_format")
        for i, tool in enumerate(self.tools or []):
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        names = {t.function.name for t in self.tools or []}
        if self.forced_tool is not None and not names:
            raise invalid("tool_choice required or a named function needs tools", "tool_choice")
        if self.forced_tool and self.forced_tool not in names:
            raise invalid(f"tool_choice names {self.forced_tool!r}, which is not among the tools", "tool_choice")

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def forced_tool(self) -> str | None:
        """None: the model decides; "": it must call one of the tools; a name: it must call that one."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "" if self.tool_choice == "required" else None

    def template_tools(self) -> list[dict] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


# -- completions -----------------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt alone, scored
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # fill in the middle: the text after the completion
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)

    def model_post_init(self, _: Any) -> None:
        if self.best_of is not None and self.best_of < self.n:
            raise invalid(f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of")
        if self.stream and self.candidates > self.n:  # the best are known only once all have finished
            raise invalid("best_of cannot be streamed; set stream to false or best_of to n", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens 0 returns nothing without echo; ask for at least 1 token", "max_tokens")
        if self.echo and self.suffix is not None:
            raise invalid("echo cannot be combined with suffix", "echo")

    @property
    def candidates(self) -> int:
        return self.best_of or self.n

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise invalid("prompt is empty", "prompt")
        if len(p) * self.candidates > MAX_SEQUENCES:
            raise invalid(f"{len(p)} prompts x {self.candidates} sequences (n, best_of) is more than {MAX_SEQUENCES} "
                          "in one request; send fewer prompts per request", "prompt")
        return list(p)


# -- tokenize / detokenize (vLLM's routes and fields) ------------------------------------------
class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=2048)
    add_generation_prompt: bool = True  # with messages: end with the assistant's turn opened
    add_special_tokens: bool = True  # accepted: Qwen's tokenizer adds none (no BOS)
    return_token_strs: bool = False

    def text(self, render) -> str:
        """The text to tokenize: the prompt, or the messages through `render(messages, add_generation_prompt)`."""
        if (self.prompt is None) == (self.messages is None):
            raise invalid("give either prompt (a text) or messages (a chat), not both or neither", "prompt")
        if self.prompt is not None:
            return self.prompt
        return render([m.to_template() for m in self.messages], self.add_generation_prompt)


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
