"""LoRA: a zero B is the base model, merging changes nothing (a model, or its state dict to the merged
model's), and the saved adapter is the PEFT layout that peft loads onto transformers' model with equal
logits."""

import json

import pytest
import torch

from qwen2.loading import load_model
from qwen2.train.lora import (
    TARGETS,
    LoRALinear,
    add_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    merged_state_dict,
    save_adapter,
)

IDS = torch.tensor([[9707, 11, 1879, 0, 3555, 374, 264, 1273]])


@pytest.fixture
def base(tiny_hf):
    return load_model(tiny_hf, quant="none", dtype="float32", device="cpu")[0]


def randomize_b(model):
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)


def logits(model):
    with torch.no_grad():
        return model(IDS)


def test_zero_b_is_the_base_model(base):
    before = logits(base)
    wrapped = add_lora(base, rank=4, alpha=8, targets=TARGETS)
    assert len(wrapped) == 2 * 7 and all(isinstance(m, LoRALinear) for m in lora_layers(base).values())
    assert torch.equal(logits(base), before)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_merged_equals_unmerged(base):
    add_lora(base, rank=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    randomize_b(base)
    unmerged = logits(base)
    merge_lora(base)
    assert not lora_layers(base) and type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(base), unmerged, atol=1e-5, rtol=1e-5)


def test_a_state_dict_merges_to_the_merged_models_own_and_leaves_the_model_as_it_was(base):
    # what the trainer writes from a state dict gathered from FSDP2's shards
    add_lora(base, rank=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    randomize_b(base)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merged_state_dict(base, state)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items()) and lora_layers(base)
    expected = merge_lora(base).state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name


def test_adapter_round_trips_through_our_loader(base, tiny_hf, tmp_path):
    add_lora(base, rank=2, alpha=4, targets=("k_proj", "o_proj"))
    randomize_b(base)
    save_adapter(base, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["k_proj", "o_proj"] and config["peft_type"] == "LORA"
    again = load_adapter(load_model(tiny_hf, quant="none", dtype="float32")[0], tmp_path)
    assert torch.equal(logits(again), logits(base))


def test_peft_loads_the_adapter_with_equal_logits(base, tiny_hf, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    plain = logits(base)
    add_lora(base, rank=4, alpha=8)
    randomize_b(base)
    save_adapter(base, tmp_path / "adapter", str(tiny_hf))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = reference(IDS).logits
    torch.testing.assert_close(logits(base), theirs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(theirs, plain, atol=1e-3)  # the adapter does change the outputs
