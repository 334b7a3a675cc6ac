"""LoRA adapters per request: in one batch, base rows get exactly the base model's output and
adapter rows the output of the model with that adapter merged; HF peft agrees on the logits;
the prefix cache never shares blocks across adapters; the fused decode step (quantized blocks)
steps aside for adapter rows; a bad adapter is a clear error. Tiny random model, real tokenizer,
and the real default model for a few tokens."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from qwen2.engine.engine import Engine
from qwen2.engine.lora import AdapterSet, parse_lora, read_adapter
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import OptionError, RequestError, WeightsError
from qwen2.loading import load, load_model
from qwen2.train.lora import PEFT_PREFIX, add_lora, lora_layers, merge_lora, save_adapter

PROMPTS = ["def quicksort(arr):", "The capital of France is", "x"]
GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)
TARGETS = {"a": ("q_proj", "v_proj", "down_proj"), "b": ("k_proj", "o_proj", "gate_proj", "up_proj")}


def tune(model, folder, seed: int, targets: tuple[str, ...]):
    """An adapter as `qwen2 train` saves it, with a random (non-zero) B; returns the merged model."""
    tuned = copy.deepcopy(model)
    torch.manual_seed(seed)  # A's draw too: the adapter must not depend on which tests ran before
    add_lora(tuned, rank=4, alpha=8, targets=targets)
    for layer in lora_layers(tuned).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=1.0)
    save_adapter(tuned, folder)
    return merge_lora(tuned).eval()


@pytest.fixture(scope="module")
def base(tiny_hf):
    return load_model(tiny_hf, quant="none", dtype="float32", device="cpu")[0]


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """{name: (folder, merged model)}"""
    root = tmp_path_factory.mktemp("adapters")
    return {name: (root / name, tune(base, root / name, seed, targets))
            for seed, (name, targets) in enumerate(TARGETS.items())}


def adapter_set(model, adapters) -> AdapterSet:
    return AdapterSet(model, [read_adapter(name, folder) for name, (folder, _) in adapters.items()])


def run_alone(model, tok, prompt, adapters=None, adapter=None):
    engine = Engine(model, tok, max_concurrency=1, max_seq_len=256, adapters=adapters)
    request = engine.submit(prompt, SamplingParams(**GREEDY), adapter=adapter)
    list(engine.stream(request))
    return request.output


def drain(engine):
    while engine.has_work:
        engine.step()


def test_adapter_rows_have_the_merged_models_logits_and_base_rows_the_base_models(base, adapters,
                                                                                  default_tokenizer):
    ids = torch.tensor([default_tokenizer.encode(PROMPTS[0])] * 3)
    with torch.no_grad():
        plain = base(ids)
        with adapter_set(base, adapters).applied([0, 1, 2]):
            mixed = base(ids)
        assert torch.equal(base(ids), plain)  # nothing stays behind after the block
        for row, name in ((1, "a"), (2, "b")):
            torch.testing.assert_close(mixed[row], adapters[name][1](ids[:1])[0], atol=1e-4, rtol=1e-4)
            assert not torch.allclose(mixed[row], plain[row], atol=1e-2)
    assert torch.equal(mixed[0], plain[0])


@pytest.mark.parametrize("static_decode", [False, True])  # True: CUDA's fixed-shape step, run eagerly here
def test_a_mixed_batch_gives_each_row_the_tokens_of_its_own_model(base, adapters, default_tokenizer, static_decode):
    engine = Engine(base, default_tokenizer, max_concurrency=8, max_seq_len=256, prefill_chunk=16,
                    static_decode=static_decode, adapters=adapter_set(base, adapters))
    plan = [(p, name) for p in PROMPTS for name in (None, "a", "b")]
    requests = [engine.submit(p, SamplingParams(**GREEDY), adapter=name) for p, name in plan]
    drain(engine)
    for (prompt, name), r in zip(plan, requests):
        model = base if name is None else adapters[name][1]
        assert r.output == run_alone(model, default_tokenizer, prompt), (prompt, name)
    for k in (1, 2):  # each adapter changes the greedy text of some prompt
        assert any(requests[i + k].output != requests[i].output for i in range(0, len(plan), 3)), k


def test_the_prefix_cache_is_shared_within_an_adapter_never_across(base, adapters, default_tokenizer):
    engine = Engine(base, default_tokenizer, max_concurrency=1, max_seq_len=256, adapters=adapter_set(base, adapters))
    prompt = " ".join(PROMPTS * 6)  # several full blocks
    expected = {None: run_alone(base, default_tokenizer, prompt), "a": run_alone(adapters["a"][1], default_tokenizer,
                                                                                 prompt)}
    for name, cached in ((None, False), ("a", False), ("a", True), (None, True)):
        request = engine.submit(prompt, SamplingParams(**GREEDY), adapter=name)
        list(engine.stream(request))
        assert (request.cached_tokens > 0) == cached and request.output == expected[name], name


def test_peft_computes_the_same_logits(base, tiny_hf, adapters, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[9707, 11, 1879, 0, 3555, 374, 264, 1273]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    # one adapter of ours, and one that peft makes and saves itself (random B, rank-stabilized scale)
    ours = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapters["a"][0]).eval()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                             init_lora_weights=False, use_rslora=True)
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    adapters_set = AdapterSet(base, [read_adapter("a", adapters["a"][0]), read_adapter("p", tmp_path / "peft")])
    with torch.no_grad():
        for reference, row in ((ours, 1), (theirs, 2)):
            with adapters_set.applied([row]):
                torch.testing.assert_close(base(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


def scored(engine, plan) -> list[tuple[list[int], list[float]]]:
    """Each (prompt, adapter) request's greedy tokens and their logprobs, all run together."""
    requests = [engine.submit(p, SamplingParams(**GREEDY, logprobs=0), adapter=name) for p, name in plan]
    logprobs = {r.id: [] for r in requests}
    while engine.has_work:
        for out in engine.step():
            logprobs[out.request_id].append(out.logprob)
    return [(r.output, logprobs[r.id]) for r in requests]


def test_the_fused_decode_step_steps_aside_for_adapter_rows(tiny_hf, adapters, default_tokenizer):
    blocks = load_model(tiny_hf, quant="q8_0", dtype="float32", device="cpu")[0]  # int8 blocks: fused decode
    assert blocks.decode_step is not None
    lora = adapter_set(blocks, adapters)
    plan = [(p, name) for p in PROMPTS[:2] for name in (None, "a")]
    # two at a time: a forward stays under 16 rows, which take int8 products at any batch (from 16 rows AMX
    # multiplies on bf16 tiles, a rounding of its own), so the runs alone below compute alike
    mixed = scored(Engine(blocks, default_tokenizer, max_concurrency=2, max_seq_len=256, adapters=lora), plan)
    assert blocks.decode_step is not None
    expected = {(p, None): scored(Engine(blocks, default_tokenizer, max_concurrency=1, max_seq_len=256), [(p, None)])[0]
                for p in PROMPTS[:2]}
    fused, blocks.decode_step = blocks.decode_step, None  # the model's own code at every step
    try:
        expected |= {(p, "a"): scored(Engine(blocks, default_tokenizer, max_concurrency=1, max_seq_len=256,
                                             adapters=lora), [(p, "a")])[0] for p in PROMPTS[:2]}
    finally:
        blocks.decode_step = fused
    for key, (tokens, logprobs) in zip(plan, mixed):
        assert tokens == expected[key][0], key
        torch.testing.assert_close(logprobs, expected[key][1], atol=1e-4, rtol=0)


def test_an_unknown_adapter_is_a_request_error(base, default_tokenizer):
    engine = Engine(base, default_tokenizer, max_concurrency=1, max_seq_len=64)
    with pytest.raises(RequestError, match="no LoRA adapter 'x'"):
        engine.submit("hi", SamplingParams(), adapter="x")


def write_adapter(folder, tensors: dict[str, torch.Tensor], **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4} | config))
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def pair(module: str, rank: int, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_A.weight": torch.randn(rank, n_in), f"{module}.lora_B.weight": torch.randn(n_out, rank)}


Q = "model.layers.0.self_attn.q_proj"
BAD = {  # what the adapter folder holds -> what the error says
    "missing": (lambda f: f / "nothing-here", "no adapter_config.json"),
    "no tensors file": (lambda f: (f.mkdir(), (f / "adapter_config.json").write_text("{}"), f)[-1],
                        "no adapter_model.safetensors"),
    "wrong shape": (lambda f: write_adapter(f, pair(Q, 2, 896, 896)), "belongs to another model"),
    "unknown module": (lambda f: write_adapter(f, pair("model.layers.7.self_attn.q_proj", 2, 64, 64)),
                       "does not have"),
    "lm_head": (lambda f: write_adapter(f, pair("lm_head", 2, 64, 151936)), "does not have"),
    "rank mismatch": (lambda f: write_adapter(f, pair(Q, 3, 64, 64)), "r = 2"),
    "half a pair": (lambda f: write_adapter(f, {f"{Q}.lora_A.weight": torch.randn(2, 64)}), "not both"),
    "dora": (lambda f: write_adapter(f, pair(Q, 2, 64, 64), use_dora=True), "use_dora"),
    "not lora": (lambda f: write_adapter(f, pair(Q, 2, 64, 64), peft_type="IA3"), "IA3"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_adapter_is_a_clear_error(base, tmp_path, case):
    make, message = BAD[case]
    with pytest.raises(WeightsError, match=message) as error:
        AdapterSet(base, [read_adapter("bad", make(tmp_path / "adapter"))])
    assert "--lora bad=" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("specs, message", [(["sql"], "NAME=PATH"), (["=x"], "NAME=PATH"), (["a="], "NAME=PATH"),
                                            (["a=x", "a=y"], "another adapter"), (["tiny=x"], "the base model")])
def test_bad_lora_options_are_clear_errors(specs, message):
    with pytest.raises(OptionError, match=message):
        parse_lora(specs, base="tiny")


def test_parse_lora_keeps_the_names_and_paths():
    assert {k: str(v) for k, v in parse_lora(["sql=/a/b", "chat=c=d"]).items()} == {"sql": "/a/b", "chat": "c=d"}


def test_the_default_model_runs_an_adapter_beside_the_unchanged_base(default_gguf, default_tokenizer, tmp_path):
    hidden, kv = 896, 128  # Qwen2.5-0.5B: 14 query heads and 2 key/value heads of 64
    torch.manual_seed(0)
    tensors = {}
    for i in range(24):
        for name, n_out in (("q_proj", hidden), ("v_proj", kv)):
            tensors |= {k: v * 0.1 for k, v in pair(f"model.layers.{i}.self_attn.{name}", 8, hidden, n_out).items()}
    llm = load(default_gguf, ctx=256, max_concurrency=2,
               lora={"x": write_adapter(tmp_path / "adapter", tensors, r=8, lora_alpha=16)})
    assert llm.model.decode_step is not None  # the quantized model decodes through the fused call
    engine, prompt = llm.engine, "def fibonacci(n):"
    alone = engine.submit(prompt, SamplingParams(**GREEDY))
    list(engine.stream(alone))
    both = [engine.submit(prompt, SamplingParams(**GREEDY), adapter=name) for name in (None, "x")]
    drain(engine)
    assert both[0].output == alone.output and both[1].output != alone.output
