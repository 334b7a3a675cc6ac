"""Model merging: each method equals a direct float64 computation of mergekit's formulas;
merged checkpoints load in our loader and in transformers; LoRA adapters merge as lora.py
merges them; mismatched checkpoints are refused naming the tensor; memory stays at a few
tensors whatever the model size."""

import json
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen2.cli import main
from qwen2.errors import OptionError, WeightsError
from qwen2.loading import load_model
from qwen2.train import merge as merge_module
from qwen2.train.lora import add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from qwen2.train.merge import METHODS, merge, merge_tensor, tensor_seed
from qwen2.weights.export import export_hf
from qwen2.weights.hf import load_hf
from tests.conftest import tiny_config

WEIGHTS = [0.6, -0.3, 1.1]
DENSITY = 0.5
SEED = 7
NAME = "model.layers.0.mlp.up_proj.weight"


def drop_masks(shape, n, name):
    """The DARE keep masks merge.py documents: rand < density from a generator per (model, tensor)."""
    return [(torch.rand(shape, generator=torch.Generator().manual_seed(tensor_seed(SEED, i, name))) < DENSITY).numpy()
            for i in range(n)]


def direct(method, base, models, weights, normalize=None, name=NAME):
    """mergekit's formulas written out in numpy float64, one method at a time."""
    w = np.array(weights).reshape((-1,) + (1,) * base.ndim)
    x = np.stack(models)
    m = METHODS[method]
    normalize = m.normalize if normalize is None else normalize
    if method == "linear":
        return (w * x).sum(0) / (w.sum() if normalize else 1)
    deltas = x - base
    if m.sparsify == "magnitude":
        k = int(DENSITY * base.size)
        kept = [np.abs(d) >= np.sort(np.abs(d).ravel())[-k] for d in deltas]
        deltas = np.stack([d * keep for d, keep in zip(deltas, kept)])
    elif m.sparsify == "random":
        deltas = np.stack([d * keep / DENSITY for d, keep in zip(deltas, drop_masks(base.shape, len(models), name))])
    weighted = w * deltas
    if m.elect_sign:
        elected = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(weighted) == elected
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum()
    return base + (mixed / divisor if normalize else mixed)


def run_method(method, base, models, weights, normalize=None):
    generators = [torch.Generator().manual_seed(tensor_seed(SEED, i, NAME)) for i in range(len(models))]
    density = DENSITY if METHODS[method].sparsify else 1.0
    out = merge_tensor(METHODS[method], (torch.from_numpy(x) for x in models), weights, torch.from_numpy(base),
                       density, normalize, generators)
    assert out.dtype == torch.float64
    return out.numpy()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("normalize", [None, True, False])
def test_each_method_equals_the_direct_float64_formula(method, normalize):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(16, 24))
    models = [base + rng.normal(scale=0.1, size=base.shape) for _ in WEIGHTS]
    got = run_method(method, base, models, WEIGHTS, normalize)
    np.testing.assert_allclose(got, direct(method, base, models, WEIGHTS, normalize), rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, base)


def test_sign_election_drops_the_minority_and_averages_the_rest():
    base = torch.zeros(1, 3, dtype=torch.float64)
    models = [torch.tensor([[1.0, 2.0, -4.0]], dtype=torch.float64), torch.tensor([[3.0, -1.0, 2.0]]).double()]
    got = merge_tensor(METHODS["ties"], models, [1.0, 1.0], base, density=1.0)
    # weighted sums 4, 1, -2 elect +, +, -: model 1's -1 and 2 disagree and are left out of sum and divisor
    assert got.tolist() == [[2.0, 2.0, -4.0]]
    trimmed = merge_tensor(METHODS["ties"], models, [1.0, 1.0], base, density=0.5)  # keeps 1 of 3: the largest
    assert trimmed.tolist() == [[3.0, 0.0, -4.0]]


def test_dare_keeps_about_density_and_rescales():
    base = torch.zeros(200, 200, dtype=torch.float64)
    ones = torch.ones_like(base)
    gen = [torch.Generator().manual_seed(tensor_seed(SEED, 0, NAME))]
    out = merge_tensor(METHODS["dare_linear"], [ones], [1.0], base, 0.3, None, gen)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    again = merge_tensor(METHODS["dare_linear"], [ones], [1.0], base, 0.3, None,
                         [torch.Generator().manual_seed(tensor_seed(SEED, 0, NAME))])
    assert torch.equal(out, again)


def perturbed(tiny_model, tokenizer, folder, seed, scale=0.02):
    torch.manual_seed(seed)
    state = {k: v + scale * torch.randn_like(v) for k, v in tiny_model.state_dict().items()}
    export_hf(tiny_model.config, state, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def fine_tunes(tiny_model, default_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tunes")
    return [perturbed(tiny_model, default_tokenizer, root / f"ft{i}", seed=10 + i) for i in range(2)]


def test_merged_checkpoint_loads_and_equals_the_direct_computation(tiny_hf, fine_tunes, tmp_path):
    summary = merge("dare_ties", [str(f) for f in fine_tunes], tmp_path / "out", base=str(tiny_hf),
                    weights=[0.7, 0.5], density=DENSITY, seed=SEED, progress=False)
    assert summary["tensors"] == len(load_hf(tiny_hf)[1]) and summary["shards"] == 1
    _, merged = load_hf(tmp_path / "out")
    _, base = load_hf(tiny_hf)
    models = [load_hf(f)[1] for f in fine_tunes]
    for name, b in base.items():
        expected = direct("dare_ties", b.double().numpy(), [m[name].double().numpy() for m in models], [0.7, 0.5],
                          name=name)
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (fine_tunes[0] / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["method"] == "dare_ties"
    model, _ = load_model(tmp_path / "out", quant="none", dtype="float32", device="cpu")
    ids = torch.tensor([[9707, 11, 1879, 0]])
    with torch.no_grad():
        ours = model(ids)
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_sharded_output_loads_and_equals_the_direct_computation(tiny_hf, fine_tunes, tmp_path):
    summary = merge("ties", [str(f) for f in fine_tunes], tmp_path / "many", base=str(tiny_hf), density=DENSITY,
                    weights=[1.0, 0.5], max_shard_bytes=10**6, progress=False)
    assert summary["shards"] >= 2 and (tmp_path / "many" / "model.safetensors.index.json").exists()
    merged, base = load_hf(tmp_path / "many")[1], load_hf(tiny_hf)[1]
    models = [load_hf(f)[1] for f in fine_tunes]
    # small tensors: in the 9.7M-entry embedding, float32 and float64 rank near-equal magnitudes differently
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.bias", "model.norm.weight"):
        expected = direct("ties", base[name].double().numpy(), [m[name].double().numpy() for m in models], [1.0, 0.5])
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_merging_in_row_blocks_equals_merging_whole_tensors(method, tiny_hf, fine_tunes, tmp_path, monkeypatch):
    models = [str(f) for f in fine_tunes]
    merge(method, models, tmp_path / "whole", base=str(tiny_hf), density=DENSITY, progress=False)
    monkeypatch.setattr(merge_module, "BLOCK_ELEMENTS", 2**15)  # the embedding in 297 blocks of 512 rows
    merge(method, models, tmp_path / "blocks", base=str(tiny_hf), density=DENSITY, progress=False)
    whole, blocks = load_hf(tmp_path / "whole")[1], load_hf(tmp_path / "blocks")[1]
    assert all(torch.equal(whole[name], blocks[name]) for name in whole)


def test_lora_adapter_merges_as_lora_py_merges_it(tiny_hf, tmp_path):
    model = load_model(tiny_hf, quant="none", dtype="float32", device="cpu")[0]
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "down_proj"))
    torch.manual_seed(3)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, tmp_path / "adapter", base_model=str(tiny_hf))
    folded = merge_lora(load_adapter(load_model(tiny_hf, quant="none", dtype="float32")[0], tmp_path / "adapter"))
    expected = folded.state_dict()
    # task arithmetic with weight 1 over the adapter's own base is the adapted model itself
    merge("task_arithmetic", [str(tmp_path / "adapter")], tmp_path / "ta", base=str(tiny_hf), progress=False)
    # linear over the adapter alone finds the base in adapter_config.json
    merge("linear", [str(tmp_path / "adapter")], tmp_path / "lin", progress=False)
    for out in ("ta", "lin"):
        merged = load_hf(tmp_path / out)[1]
        for name, tensor in merged.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], load_hf(tiny_hf)[1][q])  # the adapter did change the weight


def test_mismatched_shapes_are_refused_naming_the_tensor(tiny_hf, default_tokenizer, tmp_path):
    from qwen2.model import Transformer

    other = Transformer(tiny_config(intermediate_size=96))
    export_hf(other.config, other.state_dict(), default_tokenizer, tmp_path / "other")
    with pytest.raises(WeightsError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 96\]"):
        merge("ties", [str(tmp_path / "other")], tmp_path / "out", base=str(tiny_hf), progress=False)
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_refused(tiny_hf, fine_tunes, tmp_path):
    config = json.loads((fine_tunes[0] / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "llama" / "model.safetensors").symlink_to(fine_tunes[0] / "model.safetensors")
    with pytest.raises(WeightsError, match="LlamaForCausalLM"):
        merge("task_arithmetic", [str(tmp_path / "llama")], tmp_path / "out", base=str(tiny_hf), progress=False)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(method_name="ties", models=["A"]), "give --base"),
    (dict(method_name="linear", models=["A", "B"], density=0.5), "--density applies"),
    (dict(method_name="ties", models=["A"], base="B", density=1.5), "must be in (0, 1]"),
    (dict(method_name="linear", models=["A", "B"], weights=[1.0, 2.0, 3.0]), "3 value(s) for 2 MODEL(s)"),
    (dict(method_name="linear", models=["A", "B"], weights=[1.0, -1.0]), "sum to 0"),
    (dict(method_name="slerp", models=["A", "B"]), "unknown merge method"),
])
def test_bad_options_are_refused_before_reading_anything(kwargs, phrase, tmp_path):
    with pytest.raises(OptionError) as error:
        merge(out=tmp_path / "out", progress=False, **kwargs)
    assert phrase in str(error.value)


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_memory_stays_at_a_few_tensors(tmp_path):
    """Three synthetic checkpoints of 16 tensors of 2 MiB: the process's anonymous memory (the
    memory-mapped inputs are file pages the kernel may drop, not counted) grows by a few
    tensors during a TIES merge, not by the 96 MiB of input."""
    tensor_bytes, count = 2 * 2**20, 16
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    folders = []
    for m in range(3):
        folder = tmp_path / f"m{m}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        gen = torch.Generator().manual_seed(m)
        save_file({f"w{i:02d}": torch.randn(tensor_bytes // 4, generator=gen) for i in range(count)},
                  folder / "model.safetensors")
        folders.append(folder)
    peak, start, running = [0], rss_anon(), [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        merge("ties", [str(f) for f in folders[1:]], tmp_path / "out", base=str(folders[0]), density=0.5,
              progress=False)
    finally:
        running[0] = False
        sampler.join()
    growth = peak[0] - start
    total_input = 3 * count * tensor_bytes
    print(f"anonymous memory grew by {growth / 2**20:.1f} MiB for {total_input / 2**20:.0f} MiB of input")
    assert growth < 12 * tensor_bytes, f"anonymous memory grew by {growth / 2**20:.1f} MiB"
    assert growth < total_input / 4


def test_cli_merges_and_reports_errors_in_one_line(tiny_hf, fine_tunes, tmp_path, capsys):
    main(["merge", "--method", "task_arithmetic", "--base", str(tiny_hf), *map(str, fine_tunes), "--weights",
          "0.5,0.5", "--out", str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tensors"] == len(load_hf(tiny_hf)[1])
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--method", "linear", *map(str, fine_tunes), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qwen2: error: --out {tmp_path / 'out'} exists and is not an empty folder; choose a new folder"]
