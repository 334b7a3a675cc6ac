"""The `qwen2` model of EleutherAI's lm-evaluation-harness (lm_eval), so its tasks run on our engine.

lm_eval knows its own models by name and has no plugin discovery for others: a model joins its
registry when the module defining it is imported before the harness looks the name up. So run
the harness through this module, which registers `qwen2` and hands the rest of its command line
to lm_eval's own:

    python -m qwen2.eval.lm_harness run --model qwen2 --model_args quant=none,ctx=4k --tasks arc_easy

which also finds our offline tasks, qwen2_mmlu and qwen2_asdiv (qwen2.eval.lm_tasks), unless the
command names an --include_path of its own (lm_eval takes one); or, in Python, `import
qwen2.eval.lm_harness` before `lm_eval.simple_evaluate(model="qwen2", ...)` (our tasks:
`task_manager=TaskManager(include_path=str(qwen2.eval.lm_tasks.TASKS))`),
or pass `Qwen2LM(llm=llm)` as the model to reuse a loaded one. The model args are the shared
model options (model, dtype, device, quant, ctx, rope_scaling, dca), checked as our commands check
them (lm_eval's own --device is ignored: it defaults to cuda:0 on any machine); `--batch_size N`
caps the sequences the engine runs at once (lm_eval's default is 1: give more, or `auto` for the
engine's default).

- loglikelihood: lm_eval's own tokenization of (context, continuation) (its TemplateLM); the
  engine teacher-forces every continuation with all requests submitted at once
  (harness.continuation_logprobs), so the choices of one question share their context's prefill.
- loglikelihood_rolling: the text after `<|endoftext|>`, through the perplexity eval's chunked
  prefill (a text longer than the context is scored in windows overlapping by half).
- generate_until: all requests submitted at once, each stopped at its `until` strings or after
  `max_gen_toks` tokens (default 256); greedy unless `do_sample` is true.
A context too long for the context length loses its oldest tokens, as in lm_eval's HF model.
Left out: multimodal tasks, several ranks. Needs the optional extra `lm-eval` (lm_eval==0.4.13).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import asdict

import lm_eval.models  # noqa: F401  (lm_eval fills its registry itself only while the registry is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import OptionError, Qwen2Error
from qwen2.eval.harness import continuation_logprobs, generate_all
from qwen2.eval.perplexity import mean_nll
from qwen2.options import DEFAULTS, add_model_options, model_options

MODEL_ARGS = tuple(k for k in asdict(DEFAULTS) if k != "speculative")  # teacher forcing and drafts do not mix
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
              "seed")
MAX_GEN_TOKS = 256


class _ArgsParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise OptionError(f"qwen2 model_args: {message.replace('--', '')}")


def load_options(model_args: dict) -> dict:
    """lm_eval's model args -> load() keyword arguments, parsed as our command line parses them."""
    unknown = sorted(set(model_args) - set(MODEL_ARGS))
    if unknown:
        raise OptionError(f"unknown qwen2 model_args {', '.join(unknown)}; choose from {', '.join(MODEL_ARGS)}")
    parser = _ArgsParser(add_help=False)
    add_model_options(parser, speculative=False)
    argv = []
    for key, value in model_args.items():
        if key == "quant" and value is None:  # lm_eval reads "quant=none" as None
            value = "none"
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return model_options(parser.parse_args(argv))


def concurrency(batch_size: int | str | None) -> dict:
    """lm_eval's batch size as load()'s max_concurrency; "auto" (or none) leaves the engine's default."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return {}
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise OptionError(f"--batch_size must be a positive number or auto, got {batch_size!r}")
    return dict(max_concurrency=int(batch_size))


@register_model("qwen2")
class Qwen2LM(TemplateLM):
    def __init__(self, llm=None, batch_size: int | str | None = None, max_batch_size: int | None = None,
                 device: str | None = None, **model_args):
        # lm_eval's --device defaults to cuda:0 whatever the machine has, so the device is a model arg
        super().__init__()
        if llm is None:
            from qwen2.loading import load

            llm = load(**load_options(model_args), **concurrency(batch_size))
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.max_length = llm.engine.max_seq_len

    @property
    def eot_token_id(self) -> int:
        eot = self.tokenizer.token_to_id("<|endoftext|>")
        return eot if eot is not None else self.tokenizer.eos_token_ids[0]

    @property
    def tokenizer_name(self) -> str:
        template = (self.tokenizer.chat_template or "").encode()
        return f"qwen2-{self.llm.config.vocab_size}-{hashlib.sha256(template).hexdigest()[:12]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = {}
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) >= self.max_length:
                raise OptionError(f"a continuation of {len(continuation)} tokens does not fit the context length "
                                  f"{self.max_length}; raise ctx in --model_args")
            if continuation:
                pairs[str(i)] = (context[-(self.max_length - len(continuation)):], continuation)
        scored = continuation_logprobs(self.llm, pairs, desc="loglikelihood")
        results = []
        for i, (strings, _, _) in enumerate(requests):
            logprobs, greedy = scored.get(str(i), ([], True))  # an empty continuation is certain
            results.append((sum(logprobs), greedy))
            self.cache_hook.add_partial("loglikelihood", strings, results[-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in (request.args for request in requests):
            ids = [self.eot_token_id] + self.tok_encode(text)
            total = -mean_nll(self.llm, ids, ctx=min(self.max_length, len(ids))) * (len(ids) - 1) if len(ids) > 1 \
                else 0.0
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params, stops = {}, {}, {}
        for i, (context, gen_kwargs) in enumerate(request.args for request in requests):
            key = str(i)
            params[key], stops[key] = self._sampling(dict(gen_kwargs))
            ids = self.tok_encode(context) or [self.eot_token_id]
            prompts[key] = ids[-(self.max_length - params[key].max_tokens):]
        texts: dict[str, str] = {}
        generate_all(self.llm, prompts, params.__getitem__, texts.__setitem__, desc="generate_until")
        results = []
        for i, request in enumerate(requests):
            text = texts[str(i)]
            for stop in stops[str(i)]:  # the engine stops at the first 16 only
                text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise OptionError(f"gen_kwargs {', '.join(unknown)} are not supported by the qwen2 model; "
                              f"it takes {', '.join(GEN_KWARGS)}")
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(gen_kwargs.pop("max_gen_toks", MAX_GEN_TOKS))
        if not 1 <= max_tokens < self.max_length:
            raise OptionError(f"max_gen_toks must be between 1 and the context length {self.max_length - 1}, "
                              f"got {max_tokens}")
        if not gen_kwargs.pop("do_sample", False):
            gen_kwargs["temperature"] = 0.0
        params = SamplingParams(max_tokens=max_tokens, stop=[s for s in until if s][:16], **gen_kwargs)
        params.validate(self.llm.config.vocab_size)
        return params, [s for s in until if s]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    from qwen2.eval.lm_tasks import TASKS

    if sys.argv[1:2] in (["run"], ["ls"], ["validate"]) and not any(a.startswith("--include_path") for a in sys.argv):
        sys.argv += ["--include_path", str(TASKS)]
    try:
        cli_evaluate()
    except Qwen2Error as e:
        sys.exit(f"qwen2: error: {e}")
