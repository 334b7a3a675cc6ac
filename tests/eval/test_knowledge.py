"""MMLU letter scoring against a direct forward pass, ASDiv answer extraction, and resuming."""

import json

import pytest
import torch

from qwen2.cli import main
from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.errors import OptionError
from qwen2.eval import asdiv, mmlu
from qwen2.eval.harness import Results


def test_mmlu_questions_parse_into_four_options_and_a_letter():
    items = mmlu.questions()
    assert len(items) == 2850
    assert all(len(q["options"]) == 4 and q["answer"] in "ABCD" for q in items)
    assert items[0]["answer"] == "D" and items[0]["options"][3] == "$0 $25000 $0"


def test_mmlu_scores_equal_a_direct_forward(tiny_model, default_tokenizer):
    llm = LLM(tiny_model, default_tokenizer, Engine(tiny_model, default_tokenizer, max_concurrency=3, max_seq_len=512))
    every = mmlu.questions()
    shots = every[:1]  # the tiny model holds 512 positions: one shot and the shortest questions
    items = sorted(every[5:60], key=lambda q: len(mmlu.prompt(q, shots)))[:4]
    results = Results("mmlu", {}, None)
    mmlu.run(llm, items, shots, results)
    letters = [default_tokenizer.encode(f" {letter}")[0] for letter in mmlu.LETTERS]
    for item in items:
        ids = torch.tensor([default_tokenizer.encode(mmlu.prompt(item, shots))])
        with torch.no_grad():
            logits = tiny_model(ids, torch.arange(ids.shape[1])[None]).float()[0, -1]
        expected = torch.log_softmax(logits, -1)[letters]
        record = results.records[item["id"]]
        assert record["logprobs"] == pytest.approx(expected.tolist(), abs=2e-3)
        assert record["predicted"] == "ABCD"[int(expected.argmax())]


@pytest.mark.parametrize("reply,value", [
    ("3 + 4 = 7 apples. 7 + 2 = 9.\nThe answer is 9", 9),
    ("The answer is 1,250 dollars, since 1000 + 250 = 1250.", 1250),
    ("First 12 / 4 = 3. So the answer is: 3/4 of the cake", 0.75),
    ("She has 5 left, then buys 2, so 7", 7),  # no stated answer: the last number
    ("The answer is -2.5.", -2.5),
    ("I cannot tell.", None),
])
def test_asdiv_answer_extraction(reply, value):
    assert asdiv.extract_answer(reply) == (pytest.approx(value) if value is not None else None)


def test_asdiv_correctness_rule():
    assert asdiv.is_correct("... The answer is 9", "9 apples")
    assert not asdiv.is_correct("The answer is 8", "9 apples")
    assert asdiv.is_correct("The answer is 0.50", "0.5 (liters)")
    assert asdiv.is_correct("So the answer is Mary.", "Mary")  # no number in the gold answer


def run_mmlu(gguf, path, limit, capsys):
    main(["eval", "mmlu", "--model", str(gguf), "--quant", "none", "--dtype", "float32", "--limit", str(limit),
          "--json", str(path), "--max-concurrency", "2"])
    capsys.readouterr()
    return json.loads(path.read_text())


def test_mmlu_resumes_from_a_partial_file_and_refuses_another_setting(tiny_hf, tmp_path, capsys):
    fresh = run_mmlu(tiny_hf, tmp_path / "fresh.json", 4, capsys)
    partial = tmp_path / "resumed.json"
    first = run_mmlu(tiny_hf, partial, 2, capsys)
    resumed = run_mmlu(tiny_hf, partial, 4, capsys)
    lines = partial.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == 1 + 4  # header, then each question once: the first two were not redone
    assert resumed["results"][:2] == first["results"]
    assert resumed["summary"] == fresh["summary"] and resumed["summary"]["questions"] == 4
    with pytest.raises(SystemExit):
        main(["eval", "mmlu", "--shots", "5", "--model", str(tiny_hf), "--quant", "none", "--dtype", "float32",
              "--limit", "4", "--json", str(partial)])
    assert "holds results of another run" in capsys.readouterr().err
    with pytest.raises(OptionError, match="holds results of another run"):
        Results("asdiv", resumed["settings"], partial)
