"""The quantized-model cache: an entry written loads back identical, a bad entry is rebuilt, not
fatal, and the second start of the default model in int8 maps its weights from the file."""

import copy
import logging
import os

import pytest
import torch
from torch import nn

from qwen2.loading import model_from_cache
from qwen2.pypi import cache_dir
from qwen2.quant.int_linear import Int4Linear, Int8Linear, quantize_model
from qwen2.weights import quantized

TOKENS = torch.tensor([[9707, 11, 1879, 0, 3555, 374]])


def settings(mode, group_size=128):
    return {"mode": mode, "group_size": group_size, "dtype": "torch.float32"}


def write(entry, model, tokenizer, mode, group_size=128):
    quantized.write_entry(entry, model.config, tokenizer, model.state_dict(), settings(mode, group_size))


@pytest.mark.parametrize("mode, group_size", [("int8", 128), ("int4", 32)])
def test_round_trip_gives_identical_logits(tmp_path, tiny_model, default_tokenizer, mode, group_size):
    model = quantize_model(copy.deepcopy(tiny_model), mode, group_size)
    entry = tmp_path / "entry"
    write(entry, model, default_tokenizer, mode, group_size)
    loaded, tokenizer = model_from_cache(entry)
    kinds = {type(m) for m in loaded.modules()}
    assert (Int4Linear if mode == "int4" else Int8Linear) in kinds and nn.Linear not in kinds
    with torch.inference_mode():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
    assert tokenizer.encode("hello, world") == default_tokenizer.encode("hello, world")
    assert not list(tmp_path.glob("*.tmp*"))  # written aside, then renamed into place


def test_a_truncated_entry_is_ignored_with_a_warning(tmp_path, tiny_model, default_tokenizer, caplog):
    entry = tmp_path / "entry"
    write(entry, quantize_model(copy.deepcopy(tiny_model), "int8"), default_tokenizer, "int8")
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert model_from_cache(entry) is None
    assert "rebuilding" in caplog.text
    model = quantize_model(copy.deepcopy(tiny_model), "int8")
    write(entry, model, default_tokenizer, "int8")  # the rebuilt entry replaces it
    with torch.inference_mode():
        assert torch.equal(model_from_cache(entry)[0](TOKENS), model(TOKENS))
    assert model_from_cache(tmp_path / "missing") is None


def test_entry_name_follows_the_source_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"x" * 10)
    first = quantized.entry_for(source, settings("int8"))
    assert first == quantized.entry_for(source, settings("int8"))
    assert first.parent == cache_dir() / "quantized"
    assert first != quantized.entry_for(source, settings("int4"))
    assert first != quantized.entry_for(source, settings("int8") | {"dtype": "torch.bfloat16"})
    os.utime(source, ns=(0, 10**9))  # the file changed: its old entry no longer applies
    assert first != quantized.entry_for(source, settings("int8"))


def test_an_unwritable_cache_is_not_an_error(tmp_path, tiny_model, default_tokenizer, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        write(blocker / "entry", tiny_model, default_tokenizer, "none")
    assert "could not cache" in caplog.text


def test_second_load_of_the_default_model_maps_the_cached_int8_weights(tmp_path, monkeypatch, default_gguf):
    from qwen2 import load

    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))
    (tmp_path / "models").symlink_to(default_gguf.parent)  # reuse the downloaded GGUF
    first = load(quant="int8", dtype="bfloat16")
    entries = list((tmp_path / "quantized").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").exists()
    second = load(quant="int8", dtype="bfloat16")
    weight = second.model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.int8 and not weight.untyped_storage().resizable()  # a view of the file
    ids = torch.tensor([first.tokenizer.encode("def quicksort(arr):")])
    with torch.inference_mode():
        assert torch.equal(first.model(ids), second.model(ids))
    greedy = dict(max_tokens=12, temperature=0)
    assert first.generate("def add(a, b):", **greedy).tokens == second.generate("def add(a, b):", **greedy).tokens
