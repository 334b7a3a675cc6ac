"""A dense Qwen2 upcycled into a Qwen2-MoE (qwen2.weights.upcycle, written by bench/upcycle_moe.py): the
folder loads in transformers' Qwen2MoeForCausalLM and in ours with equal float32 logits, each expert is the
recipe's noisy slice of the dense MLP, and bad shapes are one clear error. The real default model's
upcycled folder is checked the same way (slow: 2.3B parameters)."""

import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2.errors import ConfigError, OptionError, WeightsError
from qwen2.loading import load_model
from qwen2.weights.upcycle import NOISE, upcycle
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")

SCRIPT = Path(__file__).parents[2] / "bench" / "upcycle_moe.py"
MOE_FIELDS = ("model_type", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")


def write_upcycled(model: str | Path, out: Path, *options: str) -> dict:
    run = subprocess.run([sys.executable, str(SCRIPT), str(out), "--model", str(model), *options],
                         capture_output=True, text=True, timeout=1800, cwd=SCRIPT.parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    return json.loads(run.stdout.strip().splitlines()[-1])


def logits_of_both(folder: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' and our logits (float32), one model in memory at a time."""
    # read in the file's dtype, then upcast: asked for float32 directly, transformers 5 peaked at 15 GB
    # of its own memory on the real upcycled folder (bf16 on disk), 10 GB this way
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto").float().eval()
    assert isinstance(reference, transformers.Qwen2MoeForCausalLM)
    with torch.no_grad():
        expected = reference(tokens).logits
    del reference
    gc.collect()
    ours, _ = load_model(folder, quant="none", dtype="float32", device="cpu")
    with torch.no_grad():
        got = ours(tokens)
    return got, expected


def test_upcycled_folder_loads_in_transformers_and_ours_with_equal_logits(tiny_hf, tmp_path):
    report = write_upcycled(tiny_hf, tmp_path, "--dtype", "float32")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["model_type"] == "qwen2_moe"
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (48, 8, 16)
    assert (tmp_path / "tokenizer.json").exists() and report["bytes"] > 0
    tokens = torch.randint(0, 151936, (2, 17), generator=torch.Generator().manual_seed(0))
    got, expected = logits_of_both(tmp_path, tokens)
    assert (got - expected).abs().max() < 1e-4
    assert got.isfinite().all() and got.std() > 1  # not flat


def test_experts_are_noisy_slices_of_the_dense_mlp(tiny_model):
    dense = tiny_model.config
    config, state = upcycle(tiny_model, experts=16, top_k=8, seed=0)
    assert {f: getattr(config, f) for f in MOE_FIELDS} == dict(
        model_type="qwen2_moe", num_experts=16, num_experts_per_tok=8, moe_intermediate_size=16,
        shared_expert_intermediate_size=128, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    same = [f.name for f in dataclasses.fields(dense) if f.name not in MOE_FIELDS]
    assert all(getattr(config, f) == getattr(dense, f) for f in same)  # rope, tied embeddings, layer types...
    source = tiny_model.state_dict()
    for i in range(dense.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (source[f"{p}{w}_proj.weight"] for w in ("gate", "up", "down"))
        for w, t in (("gate", gate), ("up", up), ("down", down)):
            assert torch.equal(state[f"{p}shared_expert.{w}_proj.weight"], t)
        assert not state[f"{p}shared_expert_gate.weight"].any()  # sigmoid(0): half the shared expert
        assert state[f"{p}gate.weight"].shape == (16, 64)
        for e in range(16):
            s = slice(e % 8 * 16, (e % 8 + 1) * 16)
            expert = {w: state[f"{p}experts.{e}.{w}_proj.weight"] for w in ("gate", "up", "down")}
            for w, got, want in (("gate", expert["gate"], gate[s]), ("up", expert["up"], up[s]),
                                 ("down", expert["down"] / 8, down[:, s])):  # down scaled by experts / 2
                bound = 6 * NOISE * source[f"{p}{w}_proj.weight"].std()
                assert 0 < (got - want).abs().max() < bound, (i, e, w)
    assert not any(k.startswith("model.layers.0.mlp.gate_proj") for k in state)
    again = upcycle(tiny_model, experts=16, top_k=8, seed=0)[1]
    other = upcycle(tiny_model, experts=16, top_k=8, seed=1)[1]
    assert all(torch.equal(again[k], v) for k, v in state.items())
    assert not torch.equal(other["model.layers.0.mlp.gate.weight"], state["model.layers.0.mlp.gate.weight"])


@pytest.mark.parametrize("experts, top_k, match", [(50, 8, "multiple of top_k"), (4, 8, "multiple of top_k"),
                                                   (6, 3, "does not split"), (8, 0, "multiple")])
def test_shapes_that_do_not_split_are_option_errors(tiny_model, experts, top_k, match):
    with pytest.raises(OptionError, match=match):
        upcycle(tiny_model, experts=experts, top_k=top_k)


def test_moe_or_incomplete_input_is_refused(tiny_model):
    config, state = upcycle(tiny_model, experts=8, top_k=8)
    with pytest.raises(ConfigError, match="already a mixture of experts"):
        upcycle(state, config)
    partial = {k: v for k, v in tiny_model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(WeightsError, match="layers.1.mlp.up_proj"):
        upcycle(partial, tiny_config())


@pytest.mark.slow  # writes 4.7 GB, then holds 9 GB of float32 weights per model, one model at a time
def test_the_default_model_upcycled_loads_in_both_with_equal_logits(tmp_path, default_tokenizer):
    report = write_upcycled("qwen2.5-coder-0.5b-instruct", tmp_path)
    assert report["params"]["total"] > 2e9
    tokens = torch.tensor([default_tokenizer.encode("def quicksort(arr):")])
    got, expected = logits_of_both(tmp_path, tokens)
    diff = (got - expected).abs().max().item()
    following = default_tokenizer.decode([int(got[0, -1].argmax())])
    print(f"max |logit diff| vs transformers = {diff:.2e}; next token {following!r}")
    assert diff < 1e-3 and got.isfinite().all() and got.std() > 1
