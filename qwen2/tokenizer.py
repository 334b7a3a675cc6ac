"""Qwen2's tokenizer: byte-level BPE (via HF `tokenizers`) plus the model's own chat template.

Built from either a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`) or a GGUF file's `tokenizer.*` metadata; `save` writes a folder that
transformers' `AutoTokenizer` loads and that encodes identically.

Covered: Qwen2 / Qwen2.5 / Qwen2-MoE vocabularies (GGUF tokenizer model "gpt2", pre-tokenizer
"qwen2"), special tokens recognised inside text, chat templates rendered in a sandboxed jinja2
environment with the helpers HF provides (`raise_exception`, `tojson`, `strftime_now`, loop
controls). A template without a tools branch (Qwen2-Instruct's) still gets tools: they are
written into the messages in Qwen2.5's format (qwen2.tools.messages_with_tools). Not covered:
templates that use HF's `{% generation %}` tag (assistant masks), tools passed as Python
functions rather than JSON schemas, and tokenizer models other than BPE.
"""

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from qwen2.errors import TokenizerError
from qwen2.files import write_atomically, write_text_atomically
from qwen2.tools import messages_with_tools

# Qwen2's split: like cl100k but digits one at a time (\p{N}, not \p{N}{1,3}).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's names for the pre-tokenizers that use exactly that split.
_QWEN2_GGUF_PRE = {"qwen2", "deepseek-r1-qwen"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4
# Every Qwen2 vocabulary ends a turn with one and a document with the other; generation stops at both.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

# Sampling for a model that states none: Qwen2.5-Instruct's generation_config.json.
QWEN_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
# the model's own choices: generation_config.json's names, and llama.cpp's GGUF keys for them
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                  "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}

# Qwen2-Instruct's ChatML template, for models that ship none.
FALLBACK_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        chat_template: str | None = None,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_ids: Sequence[int] = (),
        model_max_length: int | None = None,
        sampling: dict[str, float] | None = None,
    ) -> None:
        self._tok = tokenizer
        # what the model's makers chose (generation_config.json or GGUF metadata), Qwen's otherwise
        self.sampling_defaults = QWEN_SAMPLING | (sampling or {})
        self.chat_template = chat_template
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.model_max_length = model_max_length
        ends = [eos_token, *_END_TOKENS]
        ids = [self.token_to_id(t) for t in ends if t is not None] + list(extra_eos_ids)
        self._eos_ids = list(dict.fromkeys(i for i in ids if i is not None))

    # ---- construction ----

    @classmethod
    def from_files(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {folder}: download the model's tokenizer files into that folder "
                "(or load the tokenizer from a GGUF file)"
            )
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({e}); download it again") from e
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template is None and (folder / "chat_template.jinja").is_file():  # newer transformers put it here
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

        gen_eos = generation.get("eos_token_id")
        max_length = config.get("model_max_length")
        return cls(
            tok,
            chat_template=template,
            eos_token=_token_content(config.get("eos_token")),
            bos_token=_token_content(config.get("bos_token")),
            pad_token=_token_content(config.get("pad_token")),
            extra_eos_ids=[gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []),
            # transformers writes ~1e30 to mean "no limit".
            model_max_length=max_length if isinstance(max_length, int) and max_length < 2**40 else None,
            sampling=_generation_sampling(generation),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model", "gpt2")
        if kind != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer model {kind!r} is not supported: Qwen2 uses byte-level BPE ('gpt2'); "
                "use a Qwen2 GGUF or a folder with tokenizer.json"
            )
        # Files converted before llama.cpp recorded the pre-tokenizer have none: for Qwen2 it is qwen2's.
        pre = meta.get("tokenizer.ggml.pre", "qwen2")
        if pre not in _QWEN2_GGUF_PRE:
            raise TokenizerError(
                f"GGUF pre-tokenizer {pre!r} is not Qwen2's ({sorted(_QWEN2_GGUF_PRE)}); "
                "use a Qwen2 GGUF or a folder with tokenizer.json"
            )
        missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") if k not in meta]
        if missing:
            raise TokenizerError(
                f"GGUF metadata has no {' or '.join(missing)}, so no tokenizer can be built from it; "
                "re-convert the model with a recent llama.cpp or pass a folder with tokenizer.json"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_end|>) are special; user-defined ones (<tool_call>) are matched whole in
        # text but are not special, so skip_special_tokens keeps them, as in Qwen2.5's tokenizer.json.
        # A file without token types marks nothing special (zip stops at the shorter list).
        types = meta.get("tokenizer.ggml.token_type", [])
        control = [t for t, k in zip(tokens, types, strict=False) if k == _GGUF_CONTROL]
        user_defined = [t for t, k in zip(tokens, types, strict=False) if k == _GGUF_USER_DEFINED]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        arch = meta.get("general.architecture")
        return cls(
            tok,
            chat_template=meta.get("tokenizer.chat_template"),
            eos_token=token("eos_token_id"),
            bos_token=token("bos_token_id"),
            pad_token=token("padding_token_id"),
            model_max_length=meta.get(f"{arch}.context_length"),
            sampling={name: meta[key] for key, name in _GGUF_SAMPLING.items() if _is_number(meta.get(key))},
        )

    # ---- ids and text ----

    def encode(self, text: str) -> list[int]:
        # encode_batch tokenizes without holding the GIL (encode holds it), so other threads run on
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        source = self.chat_template or FALLBACK_CHAT_TEMPLATE
        if tools and not _reads_tools(source):  # e.g. Qwen2-Instruct's: the tools go into the messages instead
            messages, tools = messages_with_tools(messages, tools), None
        template = _compile_template(source)
        # The same variables transformers passes, so templates that read eos_token etc. work.
        tokens = {"eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token}
        try:
            return template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **tokens, **extra
            )
        # TypeError: the template met a value of the wrong type, like a message whose content is None.
        except (jinja2.TemplateError, TypeError) as e:
            raise TokenizerError(f"the chat template failed on these messages: {e}") from e

    # ---- saving ----

    def to_json(self) -> str:
        """The HF tokenizer.json text (for grammar engines that build their own vocabulary)."""
        return self._tok.to_str()

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / "tokenizer.json", lambda tmp: self._tok.save(str(tmp)))
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        config: dict[str, Any] = {
            "tokenizer_class": "Qwen2Tokenizer",
            "added_tokens_decoder": added,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            # Qwen2Tokenizer otherwise defaults unk to <|endoftext|>; byte-level BPE never needs one.
            "unk_token": None,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "errors": "replace",
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_text_atomically(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Turns ids into text one at a time without ever emitting half a UTF-8 character.

    Byte-level BPE can split a character's bytes across tokens, so text is only released once the
    bytes decoded so far end on a whole character (the decode does not end in U+FFFD). Only the ids
    since the last release are re-decoded, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the ids re-decoded for context: they end on a character boundary
        self._read = 0  # ids before this have been released as text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (as U+FFFD, like `decode`)."""
        text = self._decode(self._prefix)[len(self._decode(self._prefix, self._read)) :]
        self._ids, self._prefix, self._read = [], 0, 0
        return text


def read_chat_template(path: str | Path) -> str:
    """A chat template file's text, checked to compile (--chat-template)."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read the chat template {path}: {e}") from None
    _compile_template(source)
    return source


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _generation_sampling(config: dict) -> dict[str, float]:
    """The sampling a generation_config.json asks for; do_sample false means greedy."""
    found = {k: config[k] for k in _GENERATION_KEYS if _is_number(config.get(k))}
    return found | {"temperature": 0.0} if config.get("do_sample") is False else found


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); download it again") from e


def _token_content(value: str | dict | None) -> str | None:
    """tokenizer_config writes a special token either as its text or as an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else value


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Same signature and defaults as transformers' filter (plain json.dumps, unlike jinja's built-in
    # tojson, which HTML-escapes), so rendered prompts match the ones the model was trained on.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=8)  # compiling costs milliseconds; rendering happens per request
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template does not compile ({e}); fix or replace it") from e


@functools.lru_cache(maxsize=8)
def _reads_tools(source: str) -> bool:
    """Whether a chat template has a tools branch (reads the variable `tools`)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(source))
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template does not compile ({e}); fix or replace it") from e
