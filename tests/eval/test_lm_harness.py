"""The `qwen2` model of lm-evaluation-harness: a local task definition over a local JSONL file run
through lm_eval's own `simple_evaluate` (offline), scores equal to a direct forward pass of our
model, `until` and `max_gen_toks` obeyed, the model args checked as our options, and our offline
MMLU and ASDiv tasks (qwen2.eval.lm_tasks) scored alike through our model and lm_eval's `hf` one
(transformers) on the same HF folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm_eval is not installed (the optional extra: pip install -e '.[lm-eval]')")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import simple_parse_args_string  # noqa: E402

from qwen2.engine.engine import Engine  # noqa: E402
from qwen2.engine.llm import LLM  # noqa: E402
from qwen2.errors import OptionError  # noqa: E402
from qwen2.eval import mmlu  # noqa: E402
from qwen2.eval.lm_harness import Qwen2LM, concurrency, load_options  # noqa: E402
from qwen2.eval.lm_tasks import TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = [
    dict(question="What colour is the sky on a clear day?", choices=["blue", "green", "red"], answer=0),
    dict(question="How many legs does a spider have?", choices=["six", "eight", "ten"], answer=1),
    dict(question="Which one is a fruit?", choices=["carrot", "potato", "apple"], answer=2),
]
PROMPTS = [dict(prompt="def add(a, b):", target="return a + b"),
           dict(prompt="The capital of France is", target="Paris")]


@pytest.fixture(scope="module")
def llm(tiny_model, default_tokenizer):
    return LLM(tiny_model, default_tokenizer, Engine(tiny_model, default_tokenizer, max_concurrency=4, max_seq_len=512))


def direct(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The log-probability of `continuation` after `context` from one forward pass, and whether greedy."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None]).float()[0, len(context) - 1: -1]
    logprobs = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def free_greedy(llm, prompt: str, tokens: int) -> list[int]:
    return llm.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True).tokens


def a_stop_string(tokenizer, tokens: list[int], start: int) -> str:
    """The text of the first token from `start` on that is printable text of its own (the random model
    also draws pieces of multi-byte characters)."""
    text = tokenizer.decode(tokens)
    for token in tokens[start:]:
        piece = tokenizer.decode([token])
        if piece.strip() and piece.isprintable() and piece in text:
            return piece
    pytest.fail(f"no printable token in {text!r}")


def write_tasks(folder: Path, until: str) -> None:
    """A multiple-choice task and a generation task, each a YAML over a JSONL file in `folder`."""
    (folder / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "gen.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: qwen2_tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        f"  cache_dir: {folder / 'hf-cache'}\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        f"task: qwen2_tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        f"  cache_dir: {folder / 'hf-cache'}\noutput_type: generate_until\n"
        "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        f"generation_kwargs:\n  until: [{json.dumps(until)}]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def test_qwen2_is_in_lm_evals_registry_beside_its_own_models():
    assert get_model("qwen2") is Qwen2LM
    assert get_model("dummy").__name__ == "DummyLM"


def test_model_args_are_parsed_as_our_options():
    assert load_options(simple_parse_args_string("quant=none,ctx=4k,dtype=float32")) == \
        dict(quant="none", ctx=4096, dtype="float32")
    assert load_options(simple_parse_args_string("model=/m.gguf,ctx=2048")) == dict(model="/m.gguf", ctx=2048)
    with pytest.raises(OptionError, match="unknown qwen2 model_args pretrained; choose from model, dtype"):
        load_options(simple_parse_args_string("pretrained=gpt2"))
    with pytest.raises(OptionError, match="invalid choice: 'int3'"):
        load_options(simple_parse_args_string("quant=int3"))
    with pytest.raises(OptionError, match="not a token count"):
        load_options(simple_parse_args_string("ctx=lots"))
    assert concurrency(8) == concurrency("8") == dict(max_concurrency=8) and concurrency("auto:4") == {}
    with pytest.raises(OptionError, match="positive number or auto"):
        concurrency("eight")


def test_a_local_task_runs_offline_and_scores_equal_a_direct_forward(llm, tiny_model, tmp_path):
    # the generation task stops at a string the model really produces: the text of its third greedy token
    tokenizer = llm.tokenizer
    first = free_greedy(llm, PROMPTS[0]["prompt"], 6)
    until = a_stop_string(tokenizer, first, 2)
    write_tasks(tmp_path, until)
    out = simple_evaluate(model=Qwen2LM(llm=llm), tasks=["qwen2_tiny_mc", "qwen2_tiny_gen"],
                          task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    mc = out["samples"]["qwen2_tiny_mc"]
    assert len(mc) == 3 and "acc,none" in out["results"]["qwen2_tiny_mc"]
    for sample in mc:
        doc = sample["doc"]
        for choice, (logprob, greedy) in zip(doc["choices"], (r[0] for r in sample["resps"])):
            context = f"Question: {doc['question']}\nAnswer:"
            whole = tokenizer.encode(f"{context} {choice}")
            n = len(tokenizer.encode(context))
            expected, expected_greedy = direct(tiny_model, whole[:n], whole[n:])
            assert logprob == pytest.approx(expected, abs=2e-3) and greedy == expected_greedy
    gen = {s["doc"]["prompt"]: s["resps"][0][0] for s in out["samples"]["qwen2_tiny_gen"]}
    text = tokenizer.decode(first)
    assert gen[PROMPTS[0]["prompt"]] == text[: text.index(until)]
    other = tokenizer.decode(free_greedy(llm, PROMPTS[1]["prompt"], 6))
    assert gen[PROMPTS[1]["prompt"]] == other.split(until)[0]


def test_generate_until_stops_at_the_first_until_string_and_after_max_gen_toks(llm):
    tokenizer, prompt = llm.tokenizer, "Once upon a time"
    tokens = free_greedy(llm, prompt, 8)
    text = tokenizer.decode(tokens)
    stops = [a_stop_string(tokenizer, tokens, 5), a_stop_string(tokenizer, tokens, 2)]
    requests = [Instance("generate_until", {}, (prompt, dict(until=stops, max_gen_toks=8)), 0),
                Instance("generate_until", {}, (prompt, dict(until=["never in the text"], max_gen_toks=3)), 1)]
    stopped, capped = Qwen2LM(llm=llm).generate_until(requests)
    assert stopped == text[: min(text.index(s) for s in stops)] and not any(s in stopped for s in stops)
    assert capped == tokenizer.decode(tokens[:3])
    with pytest.raises(OptionError, match="gen_kwargs num_beams are not supported"):
        Qwen2LM(llm=llm).generate_until([Instance("generate_until", {}, (prompt, dict(num_beams=4)), 0)])


def test_rolling_loglikelihood_is_the_whole_text_after_endoftext(llm, tiny_model):
    text = "The quick brown fox jumps over the lazy dog. It was not amused."
    lm = Qwen2LM(llm=llm)
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = llm.tokenizer.encode(text)
    assert total == pytest.approx(direct(tiny_model, [lm.eot_token_id], ids)[0], abs=5e-3)


def test_an_empty_context_is_scored_after_endoftext(llm, tiny_model):
    lm = Qwen2LM(llm=llm)
    ((logprob, _),) = lm.loglikelihood([Instance("loglikelihood", {}, ("", "hello world"), 0)])
    assert logprob == pytest.approx(direct(tiny_model, [lm.eot_token_id], llm.tokenizer.encode("hello world"))[0],
                                    abs=2e-3)


@pytest.mark.slow  # 9 s: the next test runs the command line, the one before a local task
def test_the_command_line_runs_a_local_task_with_the_qwen2_model(tiny_gguf, tmp_path):
    write_tasks(tmp_path, "\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "qwen2.eval.lm_harness", "run", "--model", "qwen2",
                          "--model_args", f"model={tiny_gguf},quant=none,ctx=512", "--batch_size", "4",
                          "--tasks", "qwen2_tiny_mc", "--include_path", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "qwen2_tiny_mc" in run.stdout and "acc" in run.stdout


def test_the_command_line_finds_our_offline_tasks_without_an_include_path(tiny_gguf):
    run = subprocess.run([sys.executable, "-m", "qwen2.eval.lm_harness", "run", "--model", "qwen2",
                          "--model_args", f"model={tiny_gguf},quant=none,ctx=512", "--tasks", "qwen2_mmlu",
                          "--limit", "2"], cwd=ROOT, env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "|qwen2_mmlu|" in run.stdout.replace(" ", "")


def test_bad_model_args_on_the_command_line_are_one_clear_line(tmp_path):
    write_tasks(tmp_path, "\n")
    run = subprocess.run([sys.executable, "-m", "qwen2.eval.lm_harness", "run", "--model", "qwen2",
                          "--model_args", "quant=int3", "--tasks", "qwen2_tiny_mc", "--include_path", str(tmp_path)],
                         cwd=ROOT, env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("qwen2: error: qwen2 model_args: argument quant: invalid")
    assert "Traceback" not in run.stderr


def both_models(folder: Path, tasks: list[str], **kwargs) -> tuple[dict, dict]:
    """`tasks` through our model and through lm_eval's `hf` model, both float32 on the CPU, on one folder."""
    common = dict(tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)), log_samples=True, batch_size=4,
                  **kwargs)
    ours = simple_evaluate(model="qwen2", model_args=f"model={folder},quant=none,dtype=float32,ctx=512", **common)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu", **common)
    return ours, theirs


def test_our_mmlu_task_scores_as_transformers_does_on_the_same_weights(tiny_hf):
    ours, theirs = both_models(tiny_hf, ["qwen2_mmlu"], limit=8)
    mine, hf = ours["samples"]["qwen2_mmlu"], theirs["samples"]["qwen2_mmlu"]
    assert len(mine) == len(hf) == 8
    # the task asks what `qwen2 eval mmlu` asks, over the same questions (the 5-shot examples left out)
    first = mmlu.questions()[mmlu.SHOTS]
    assert mine[0]["doc"]["id"] == first["id"]
    assert mine[0]["arguments"] == [(mmlu.prompt(first, []), f" {letter}") for letter in mmlu.LETTERS]
    for a, b in zip(mine, hf):
        assert a["doc"] == b["doc"]
        ours_ll, hf_ll = ([r[0][0] for r in s["resps"]] for s in (a, b))
        assert max(ours_ll) - min(ours_ll) > 0.1  # the letters are told apart, so agreeing means something
        assert ours_ll == pytest.approx(hf_ll, abs=1e-4)
        assert a["acc"] == b["acc"]
    assert ours["results"]["qwen2_mmlu"]["acc,none"] == theirs["results"]["qwen2_mmlu"]["acc,none"]


def test_our_asdiv_task_generates_as_transformers_does_on_the_same_weights(tiny_hf):
    ours, theirs = both_models(tiny_hf, ["qwen2_asdiv"], limit=3, gen_kwargs="max_gen_toks=8")
    mine, hf = ours["samples"]["qwen2_asdiv"], theirs["samples"]["qwen2_asdiv"]
    assert [s["resps"] for s in mine] == [s["resps"] for s in hf] and len(mine) == 3
    assert all(len(s["resps"][0][0]) > 0 for s in mine)
    assert ours["results"]["qwen2_asdiv"]["acc,none"] == theirs["results"]["qwen2_asdiv"]["acc,none"]
