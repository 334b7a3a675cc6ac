import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # our Triton kernels (qwen2/quant/triton_int4.py, qwen2/engine/triton_decode.py) then run in
    # Triton's interpreter on CPU tensors; Triton reads the flag as it first loads, so it is set
    # before any test module imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests write quantized models of throwaway checkpoints: keep them out of the user's cache,
    while downloaded models and data (models/, data/) stay shared so they are fetched only once,
    and the compiled kernels (kernels/) so they are built only once."""
    from qwen2.pypi import cache_dir

    real, private = cache_dir(), tmp_path_factory.mktemp("qwen2-cache")
    for shared in ("models", "data", "kernels"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (private / shared).symlink_to(real / shared)
    before = os.environ.get("QWEN2_CACHE")
    os.environ["QWEN2_CACHE"] = str(private)
    yield private
    if before is None:
        del os.environ["QWEN2_CACHE"]
    else:
        os.environ["QWEN2_CACHE"] = before


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), fetched once and cached."""
    from qwen2.weights.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf):
    """The real tokenizer of the default model (built from its GGUF metadata)."""
    from qwen2.tokenizer import Tokenizer
    from qwen2.weights.gguf import read_metadata

    return Tokenizer.from_gguf_metadata(read_metadata(default_gguf))


def tiny_config(**overrides):
    """A small random Qwen2 with the real vocabulary, so the real tokenizer drives it."""
    from qwen2.config import Qwen2Config

    fields = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=151645)
    return Qwen2Config(**(fields | overrides))


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from qwen2.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    with torch.no_grad():  # sharper logits than the default init, so sampling is not uniform noise
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="session")
def tiny_hf(tiny_model, default_tokenizer, tmp_path_factory) -> Path:
    """The tiny random model as an HF checkpoint folder (config.json, safetensors, tokenizer)."""
    from qwen2.weights.export import export_hf

    folder = tmp_path_factory.mktemp("tiny-hf")
    export_hf(tiny_model.config, tiny_model.state_dict(), default_tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, default_tokenizer, tmp_path_factory) -> Path:
    """The tiny random model as a GGUF file (float32 tensors), with the default model's tokenizer."""
    from qwen2.weights.gguf_export import export_gguf

    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    export_gguf(tiny_model.config, tiny_model.state_dict(), default_tokenizer, path, "f32")
    return path


@pytest.fixture(scope="session")
def byte_tokenizer():
    """Byte-level tokens plus Qwen2's three control tokens (ids 256-258) and one merge ("ĠĠ", id 259, so
    the GGUF holds a merges list a reader can build a tokenizer from): a 320-row embedding fits it."""
    from tokenizers import pre_tokenizers

    from qwen2.tokenizer import Tokenizer

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "ĠĠ"]
    return Tokenizer.from_gguf_metadata({
        "general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["Ġ Ġ"],
        "tokenizer.ggml.token_type": [1] * 256 + [3] * 3 + [1],
        "tokenizer.ggml.eos_token_id": 258, "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.padding_token_id": 256,
    })


class PickledPayload:
    """Unpickling this creates the file `marker`: the stand-in for the code a hostile checkpoint or
    cache would run when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="session")
def tiny_chat_file(tmp_path_factory) -> Path:
    """Six one-line chats: the training runs that compare processes (torchrun, Ray Train) share them."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    pairs = [("What is 2 + 2?", "4."), ("Name a colour.", "Blue."), ("Say hi in French.", "Salut."),
             ("Capital of Italy?", "Rome."), ("Is water wet?", "Yes."), ("Count to two.", "1, 2.")]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in pairs))
    return path
