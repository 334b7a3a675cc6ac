"""The embedded default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) against transformers
loading the very same GGUF: last-position logits agree and greedy tokens are identical in float32
and in the exact mode (gguf-f32: the file's own blocks, float32 activations); the default mode
(the same blocks, activations rounded to int8 as llama.cpp does) agrees within that rounding."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

PROMPTS = {
    "english": "The three primary colors are",
    "chinese": "北京是中国的首都，它的著名景点包括",
    "code": "def quicksort(arr):",
}


@pytest.fixture(scope="module")
def reference(default_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(default_gguf):
    from qwen2 import load

    return load(default_gguf, dtype="float32", device="cpu", quant="none", max_concurrency=1, ctx=1024)


@pytest.fixture(scope="module")
def exact_mode(default_gguf):
    from qwen2 import load

    return load(default_gguf, quant="gguf-f32", max_concurrency=1, ctx=1024)


@pytest.fixture(scope="module")
def default_mode(default_gguf):
    from qwen2 import load

    return load(default_gguf, max_concurrency=1, ctx=1024)


def prompts(llm):
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write hello world in C."}])
    return PROMPTS | {"chat": chat}


@pytest.mark.parametrize("mode", ["float32", "exact"])
def test_last_position_logits_agree(reference, llm, exact_mode, mode):
    llm = llm if mode == "float32" else exact_mode
    assert llm.model.decode_step is None  # float activations: the model's own layers
    for name, text in prompts(llm).items():
        ids = torch.tensor([llm.tokenizer.encode(text)])
        with torch.no_grad():
            expected = reference(ids).logits[0, -1]
            got = llm.model(ids)[0, -1]
        diff = (got - expected).abs().max().item()
        print(f"{name}: max |logit diff| = {diff:.2e}")
        assert diff < 1e-3, name


# float32 (--quant none): make test-slow (22 s); its logits are compared with transformers' above, and
# the exact mode, which the equality tests use, keeps its greedy tokens here
@pytest.mark.parametrize("mode", [pytest.param("float32", marks=pytest.mark.slow), "exact"])
def test_32_greedy_tokens_identical(reference, llm, exact_mode, mode):
    llm = llm if mode == "float32" else exact_mode
    for name, text in prompts(llm).items():
        ids = llm.tokenizer.encode(text)
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=None)[0, len(ids):].tolist()
        got = llm.generate(ids, max_tokens=32, temperature=0, ignore_eos=True).tokens
        assert got == expected, name


def test_default_mode_logits_move_by_int8_rounding_only(reference, llm, default_mode):
    import torch.nn.functional as F

    from qwen2.model import KVCache

    net = default_mode.model
    for name, text in prompts(llm).items():
        ids = torch.tensor([llm.tokenizer.encode(text)])
        n = ids.shape[1]
        with torch.no_grad():
            want = reference(ids).logits[0, -1]
            whole = net(ids)[0, -1]  # the prompt in one pass: GEMMs on tiles
            cache = KVCache(net.config, 1, n)  # the last token decoded alone: the int8 kernel
            net(ids[:, :-1], cache=cache)
            decoded = net(ids[:, -1:], torch.tensor([[n - 1]]), cache=cache)[0, -1]
        for got in (whole, decoded):
            kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="sum").item()
            assert got.argmax() == want.argmax() and kl < 0.01, (name, kl)


def test_default_mode_greedy_code_is_transformers_float32_greedy_for_a_long_prefix(reference, llm, default_mode):
    ids = llm.tokenizer.encode("def quicksort(arr):")
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
    got = default_mode.generate(ids, max_tokens=48, temperature=0, ignore_eos=True).tokens
    same = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(expected))
    assert same >= 24, (same, default_mode.tokenizer.decode(got))


def test_cli_generate_in_the_exact_mode_prints_transformers_float32_greedy(reference, llm, default_gguf):
    prompt = "def quicksort(arr):"
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):]
    cli = subprocess.run([sys.executable, "-m", "qwen2", "generate", "-p", prompt, "-n", "48", "--temperature",
                          "0", "--model", str(default_gguf), "--quant", "gguf-f32"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == llm.tokenizer.decode(expected.tolist()) + "\n"


@pytest.mark.parametrize("mode", ["float32", "default"])
def test_chat_answers_sensibly(llm, default_mode, mode):
    llm = llm if mode == "float32" else default_mode
    reply = llm.chat([{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
                     temperature=0, max_tokens=16)
    assert "5" in reply.text and reply.finish_reason == "stop"


def test_the_default_mode_runs_the_files_blocks_with_no_float_copy_of_any_matrix(default_mode):
    from qwen2.quant.blocks import BlockEmbedding, BlockLinear

    net = default_mode.model
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [] and isinstance(net.model.embed_tokens, BlockEmbedding)
    layers = [m for m in net.modules() if isinstance(m, BlockLinear)]
    assert len(layers) == 24 * 7 + 1 and {m.activations for m in layers} == {"int8"}
    assert net.decode_step is not None  # a decode step's layers run as one fused call each
    floats = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()) if t.is_floating_point())
    assert floats < 4 << 20, f"{floats / 2**20:.1f} MiB of float tensors: only norms, biases and rotary belong here"
