"""POST /v1/embeddings through the official client: each vector is the model's own final hidden
state at an appended <|endoftext|> (last-token pooling), checked against a direct forward and
against transformers' Qwen2Model on the same weights."""

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen2.loading import load_model

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "a", "def fib(n): return n"]


def _vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return load_model(tiny_server.model, dtype="float32", quant="none")


def _direct(model, tokenizer, ids: list[int]) -> np.ndarray:
    """By hand: the final norm's output at the last token of ids + <|endoftext|>, unit length."""
    tokens = torch.tensor([ids + [tokenizer.token_to_id("<|endoftext|>")]])
    with torch.inference_mode():
        hidden = model.model.norm(model.body(tokens))[0, -1]
    return F.normalize(hidden.float(), dim=-1).numpy()


def test_embeddings_equal_a_direct_forward_in_order(tiny_server, tiny):
    model, tokenizer = tiny
    client = tiny_server.client()
    r = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    got = _vectors(r)
    want = np.stack([_direct(model, tokenizer, tokenizer.encode(t)) for t in TEXTS])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tokenizer.encode(t)) + 1 for t in TEXTS)
    assert r.object == "list" and r.data[0].object == "embedding" and len(got[0]) == model.config.hidden_size
    # the client's default asks for base64 (little-endian float32) and decodes it
    np.testing.assert_array_equal(_vectors(client.embeddings.create(model="tiny", input=TEXTS)), got)
    one = client.embeddings.create(model="tiny", input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(_vectors(one)[0], got[1], atol=1e-5)  # alone or in a batch


def test_base64_is_little_endian_float32(tiny_server):
    raw = tiny_server.request("POST", "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"}).json()
    floats = tiny_server.request("POST", "/v1/embeddings", {"input": TEXTS}).json()
    for b, f in zip(raw["data"], floats["data"]):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), "<f4"),
                                      np.array(f["embedding"], dtype=np.float32))


def test_dimensions_truncate_and_renormalise(tiny_server):
    client = tiny_server.client()
    full = _vectors(client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float"))
    short = _vectors(client.embeddings.create(model="tiny", input=TEXTS, dimensions=16, encoding_format="float"))
    assert short.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(short, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-6)


def test_token_ids_embed_like_their_text(tiny_server, tiny):
    _, tokenizer = tiny
    client = tiny_server.client()
    texts = _vectors(client.embeddings.create(model="tiny", input=TEXTS[:2], encoding_format="float"))
    ids = [tokenizer.encode(t) for t in TEXTS[:2]]
    one = _vectors(client.embeddings.create(model="tiny", input=ids[0], encoding_format="float"))
    many = _vectors(client.embeddings.create(model="tiny", input=ids, encoding_format="float"))
    np.testing.assert_allclose(one[0], texts[0], atol=1e-5)
    np.testing.assert_allclose(many, texts, atol=1e-5)


def test_pooling_matches_transformers(tiny_server, tiny):
    """transformers as the oracle: Qwen2Model's last hidden state (after its final norm), pooled
    at the appended <|endoftext|> (the server) or averaged over the tokens (LLM.embed, mean)."""
    transformers = pytest.importorskip("transformers")
    from qwen2.engine.engine import Engine
    from qwen2.engine.llm import LLM

    model, tokenizer = tiny
    hf = transformers.Qwen2Model.from_pretrained(tiny_server.model, dtype=torch.float32).eval()
    served = _vectors(tiny_server.client().embeddings.create(model="tiny", input=TEXTS, encoding_format="float"))
    llm = LLM(model, tokenizer, Engine(model, tokenizer, max_concurrency=1, max_seq_len=64))
    means = llm.embed(TEXTS, pooling="mean").numpy()
    for text, last, mean in zip(TEXTS, served, means):
        ids = tokenizer.encode(text)
        with torch.inference_mode():
            hidden = hf(torch.tensor([ids + [tokenizer.token_to_id("<|endoftext|>")]])).last_hidden_state[0]
        np.testing.assert_allclose(last, F.normalize(hidden[-1], dim=-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(mean, F.normalize(hidden[:-1].mean(0), dim=-1).numpy(), atol=1e-5)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input[1]"),
    ({"input": "word " * 3000}, "input"),  # the tiny server's context is 2048 tokens
    ({"input": ["a"] * 2049}, "input"),
    ({"input": [[1, 2], [151936]]}, "input[1]"),  # outside the vocabulary
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 65}, "dimensions"),  # the tiny model has 64
    ({"input": "a", "dimensions": 0}, "dimensions"),
])
def test_bad_requests_are_400s_naming_the_field(tiny_server, body, param):
    r = tiny_server.request("POST", "/v1/embeddings", body)
    assert r.status == 400 and r.json()["error"]["param"] == param, r.text


def test_the_default_model_embeds_as_its_direct_forward(default_server, default_gguf):
    model, tokenizer = load_model(default_gguf)  # the server's own quantized kernels
    client = default_server.client()
    texts = ["How do I sort a list in Python?", "sorted(xs) returns a new sorted list"]
    want = np.stack([_direct(model, tokenizer, tokenizer.encode(t)) for t in texts])
    alone = np.concatenate([_vectors(client.embeddings.create(model="default", input=t)) for t in texts])
    np.testing.assert_allclose(alone, want, atol=1e-5)
    # the block kernels choose their arithmetic by the rows of a forward (int8 activations for a few,
    # GEMMs on dequantized bf16 tiles for many): one forward of both texts is close, not equal
    together = _vectors(client.embeddings.create(model="default", input=texts))
    assert (together * want).sum(1).min() > 0.999


def test_the_pooling_a_checkpoint_declares(tmp_path):
    from qwen2.embeddings import checkpoint_pooling

    assert checkpoint_pooling(tmp_path) is None  # no sentence-transformers files: the caller's default
    (tmp_path / "1_Pooling").mkdir()
    for mode, pooling in (("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean")):
        (tmp_path / "1_Pooling" / "config.json").write_text(f'{{"{mode}": true, "pooling_mode_cls_token": false}}')
        assert checkpoint_pooling(tmp_path) == pooling
