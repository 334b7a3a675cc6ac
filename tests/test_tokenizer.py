"""The tokenizer, specified against transformers on the default model's GGUF.

transformers is only the oracle here. One known difference: its GGUF loader leaves out Qwen2's NFC
normalizer (Qwen2's tokenizer.json and its slow tokenizer both apply NFC), so against that oracle
we compare on NFC text, and check NFC itself against the folder `save` writes, which transformers
loads with the normalizer.
"""

import json
import unicodedata

import gguf
import pytest

from qwen2.errors import TokenizerError
from qwen2.eval.multilingual import LANGUAGES
from qwen2.eval.multilingual import text as udhr_text
from qwen2.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643

EXTRA_TEXTS = {
    "code": 'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n'
    "    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)  # O(2**n)\n\n"
    "print({k: v for k, v in zip('abc', [1, 2, 3])}, x != y, a->b, i++, s[::-1])\n",
    "digits": "Pi is 3.14159265358979; 1,000,000 users in 2024; ٣٤٥ and १२३ and ① and 12345678901234567890",
    "emoji": "I 💖 🦀 and 👨‍👩‍👧‍👦! Flags: 🇯🇵🇫🇷 skin tones 👋🏽 keycap 1️⃣ ☕️",
    "whitespace": "a  b   c    d\t\te \t \n\n\n   f" + " " * 17 + "g\n \n  \u00a0\u3000end   ",
    "crlf": "line one\r\nline two\r\n\r\n  indented\r\n\rcarriage\rreturn\n\r",
    "special_inline": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{}\n</tool_call>"
    "<|im_end|><|endoftext|>no space<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    "mixed": "Ünïcödé café naïve — “quotes” ‘single’ «guillemets» 🙂 中文 English 日本語 한국어 العربية",
}
TEXT_NAMES = [*LANGUAGES, *EXTRA_TEXTS]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_temperature",
            "description": "Get the current température at a location, in °C.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string", "description": "“City, Country”"}},
                "required": ["location"],
            },
        },
    }
]
CONVERSATIONS = {
    "system_user_assistant": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? 答えてください。"},
    ],
    "no_system": [{"role": "user", "content": "Hello!"}],
    "tool_round_trip": [
        {"role": "user", "content": "How warm is it in Zürich and Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_current_temperature", "arguments": {"location": c}},
                }
                for c in ("Zürich, Schweiz", "Paris, France")
            ],
        },
        {"role": "tool", "content": '{"temperature": 21.5}'},
        {"role": "tool", "content": '{"temperature": 24.0}'},
        {"role": "assistant", "content": "Zürich is at 21.5 °C, Paris at 24 °C."},
    ],
}


def gguf_metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.fixture(scope="session")
def meta(default_gguf) -> dict:
    return gguf_metadata(default_gguf)


@pytest.fixture(scope="session")
def tok(meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="session")
def hf_tok(default_gguf):
    return transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def texts() -> dict[str, str]:
    # the UDHR in Qwen2's 29 languages, as the multilingual eval fetches and strips it
    return {**{code: udhr_text(code, 2000) for code in LANGUAGES}, **EXTRA_TEXTS}


@pytest.fixture(scope="session")
def saved(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved_tokenizer")
    tok.save(folder)
    return folder


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def test_reference_vectors(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(" Hello world") == [21927, 1879]


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("2024")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_special_tokens_in_text_are_single_ids(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>")
    assert ids[0] == IM_START and ids[-2:] == [IM_END, ENDOFTEXT]
    assert tok.encode("<tool_call>") == [tok.token_to_id("<tool_call>")]


def test_skip_special_tokens_drops_control_tokens_but_keeps_tool_call_tags(tok):
    ids = tok.encode("<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>\n{}\n</tool_call>"


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_ids_match_transformers(tok, hf_tok, texts, name):
    text = texts[name]
    assert tok.encode(text) == hf_tok.encode(nfc(text))


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_decode_inverts_encode(tok, texts, name):
    text = nfc(texts[name])
    assert tok.decode(tok.encode(text)) == text


def test_input_is_nfc_normalised(tok, texts):
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")
    # Vietnamese UDHR is written with combining marks, so this is a real-text case.
    assert texts["vie"] != nfc(texts["vie"])
    assert tok.encode(texts["vie"]) == tok.encode(nfc(texts["vie"]))


def test_vocabulary_and_special_ids(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok) == 151936
    assert IM_END in tok.eos_token_ids and ENDOFTEXT in tok.eos_token_ids
    assert tok.eos_token_ids[0] == hf_tok.eos_token_id == IM_END
    assert tok.pad_token_id == hf_tok.pad_token_id
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert tok.token_to_id("<|im_end|>") == IM_END and tok.id_to_token(IM_END) == "<|im_end|>"
    assert tok.token_to_id("<|no such token|>") is None


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, hf_tok, name, generation_prompt):
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tool_round_trip" else None
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours == theirs


def test_chat_template_with_tools_writes_json_unescaped(tok):
    prompt = tok.apply_chat_template(CONVERSATIONS["tool_round_trip"], tools=TOOLS)
    assert "# Tools" in prompt and json.dumps(TOOLS[0], ensure_ascii=False) in prompt
    assert '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "Zürich, Schweiz"}}' in prompt
    assert "<|im_start|>user\n<tool_response>\n" in prompt


def test_default_system_prompt_and_generation_prompt(tok):
    messages = CONVERSATIONS["no_system"]
    prompt = tok.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == tok.apply_chat_template(messages, add_generation_prompt=False) + "<|im_start|>assistant\n"


def test_fallback_chatml_template_when_the_model_has_none(meta):
    bare = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    assert bare.chat_template is None
    assert bare.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_errors_are_tokenizer_errors(tok, meta):
    def with_template(source: str) -> Tokenizer:
        return Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template": source})

    with pytest.raises(TokenizerError, match="roles must alternate"):
        with_template("{{ raise_exception('roles must alternate') }}").apply_chat_template([])
    with pytest.raises(TokenizerError, match="does not compile"):
        with_template("{% for m in messages %}").apply_chat_template([])
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.apply_chat_template([])  # the template reads messages[0]
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": None}])


@pytest.mark.parametrize(
    "text",
    ["我们都是好朋友，龘字很少见。𠀀", "家族 👨‍👩‍👧‍👦 旗 🇯🇵 手 👋🏽 ☕️", "สวัสดีครับ ปี พ.ศ. ๒๕๖๗ เลข ๑๒๓"],
    ids=["chinese", "emoji", "thai"],
)
def test_stream_decoder_never_emits_half_characters(tok, text):
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces  # some character spans several tokens, so the decoder had to wait
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text


def test_stream_decoder_flush_releases_an_unfinished_character(tok):
    first, *_ = tok.encode("龘")  # two tokens, each half the character's bytes
    stream = tok.stream_decoder()
    assert stream.push(first) == ""
    assert stream.flush() == tok.decode([first]) == "\ufffd"


def test_save_loads_in_transformers_and_back(tok, hf_tok, texts, saved):
    reloaded = transformers.AutoTokenizer.from_pretrained(saved)
    ours_again = Tokenizer.from_files(saved)
    for name, text in texts.items():
        ids = tok.encode(text)
        assert reloaded.encode(text) == ids, name  # raw text: the saved tokenizer.json carries NFC
        assert ours_again.encode(text) == ids, name
        assert reloaded.decode(ids) == ours_again.decode(ids) == tok.decode(ids), name
    for messages in CONVERSATIONS.values():
        expected = tok.apply_chat_template(messages, tools=TOOLS)
        assert (
            reloaded.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False) == expected
        )
        assert ours_again.apply_chat_template(messages, tools=TOOLS) == expected
    assert ours_again.eos_token_ids == tok.eos_token_ids
    assert (ours_again.bos_token_id, ours_again.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    assert ours_again.vocab_size == tok.vocab_size
    assert ours_again.model_max_length == tok.model_max_length == 32768


def test_from_files_takes_end_ids_from_generation_config(saved, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, 151663]}))
    assert Tokenizer.from_files(tmp_path).eos_token_ids == [IM_END, ENDOFTEXT, 151663]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json in"):
        Tokenizer.from_files(tmp_path)


def test_corrupt_tokenizer_files(saved, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_files(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((saved / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{chat_template: oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_files(tmp_path)


def test_gguf_metadata_without_merges_or_with_another_model(meta):
    without_merges = {k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(without_merges)
    with pytest.raises(TokenizerError, match="'llama' is not supported"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})


def test_a_chat_template_file_that_is_missing_or_broken_is_a_clear_error(tmp_path):
    from qwen2.errors import TokenizerError
    from qwen2.tokenizer import read_chat_template

    with pytest.raises(TokenizerError, match="cannot read the chat template"):
        read_chat_template(tmp_path / "missing.jinja")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(TokenizerError, match="does not compile"):
        read_chat_template(broken)
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert read_chat_template(good) == good.read_text()


def test_sampling_defaults_come_from_the_model_else_qwens(tok, meta, saved, tmp_path):
    from qwen2.tokenizer import QWEN_SAMPLING

    assert tok.sampling_defaults == QWEN_SAMPLING  # the default GGUF states none
    stated = Tokenizer.from_gguf_metadata(meta | {"general.sampling.temp": 0.3, "general.sampling.top_k": 40})
    assert stated.sampling_defaults == QWEN_SAMPLING | {"temperature": 0.3, "top_k": 40}
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((saved / name).read_bytes())
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.95, "top_k": "x"}))
    assert Tokenizer.from_files(folder).sampling_defaults == QWEN_SAMPLING | {"top_p": 0.95}
    # a base model's generation_config says greedy
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert Tokenizer.from_files(folder).sampling_defaults["temperature"] == 0.0
