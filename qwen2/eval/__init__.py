"""Evaluations, each a module with its data, its scoring and a `run` over the engine; `qwen2 eval
...` is cli.py, and harness.py the parts they share (batched generation, log-probabilities, a
resumable results file, one output shape).

Long context: strided perplexity (perplexity.py) and needle in a haystack (niah.py) on real
Wikipedia prose (data.py). The report's benchmarks: HumanEval (humaneval.py, programs run in
sandbox.py), MMLU (mmlu.py), ASDiv (asdiv.py), multilingual fertility, perplexity and
code-switching (multilingual.py), safety on MultiJail (safety.py). lm_harness.py registers our
engine as a model of lm-evaluation-harness.
"""
