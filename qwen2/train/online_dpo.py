"""Online DPO, as Qwen2's second preference stage: each step the current policy samples N replies
per prompt, a reward scores them, and the best and the worst form a DPO pair.

The reward is a reward model's score (--reward-model, a folder `qwen2 train rm` wrote) or, with
--reward verifier, an automatic check as the report's execution feedback: the share of the
prompt's checks the reply passes (1 or 0 for an answer alone; partial credit over several
constraints, so fewer prompts see all their samples tie). What is checked comes with each prompt
record: `answer` (the reply must state that final answer: "The answer is N" or \boxed{N}, as
`qwen2 data reject-sample` keeps) and/or `constraints` (instruction constraints,
qwen2.eval.instructions: the prompt asks for them in words, each judged strictly, as
`qwen2 data instruct-feedback` judges).

Sampling runs through the engine (qwen2.engine). On a CPU with our kernels (--sample-quant auto
or q8_0) each step samples from a Q8_0 copy of the policy's current weights (LoRA merged), made
for that step and run on the integer kernels of the default inference path: sampling is most of a
step, and the float32 training model decodes at a fraction of that speed. The pairs' log-probs, the
loss and the gradient are the float policy's own, so DPO sees replies of a model within Q8_0's
rounding of the policy (as RL trainers sample through a separate inference engine). With
--sample-quant none (the default on CUDA) the engine is built once over the training model object
itself and samples from the live weights, its prefix cache cleared each step (keys cached under
older weights are stale). A reply cut by --max-new-tokens without its end token loses
--no-end-penalty from its reward. A prompt whose replies all score the same gives no pair that
step; the step's loss is the mean over its pairs. The reference log-probabilities are computed
live (the pairs are new each step). Metrics: DPO's (means over the pairs), plus sample_reward (mean
reward of all sampled replies), best_reward, unfinished (fraction cut off), paired (the share of
prompts whose replies did not all score the same); held-out:
eval_reward, the mean reward of one greedy reply per held-out prompt, and with the verifier
eval_verified, the share of those replies that pass, with its Wilson 95% interval.

`OnlineDPOTask` is the trainer's task (trainer.py). Under torchrun (or --ray) each process samples its
own prompts of a step, all at once before the step's micro-batches: from its replica under DDP (the
live model, or its Q8_0 copy), from a copy gathered whole from the shards each step under FSDP2 (Q8_0,
or float with --sample-quant none). A prompt's replies draw seeds keyed by its place in the file, so
two processes sample what one does; the held-out prompts are dealt to the processes in turn.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from qwen2 import distributed
from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import DataError, OptionError
from qwen2.eval.instructions import verdicts
from qwen2.eval.stats import wilson
from qwen2.loading import inference_copy
from qwen2.quant.blocks import kernels_available
from qwen2.train import lora
from qwen2.train.data import DataReport
from qwen2.train.dpo import DPOTask
from qwen2.train.preference import Pair, check_tokenizer, load_prompts
from qwen2.train.reward import load_reward_model, score
from qwen2.train.synth import answer_verdict
from qwen2.train.trainer import Trainer, summed


def sample_quant(choice: str, device: torch.device) -> str:
    """The weights sampling runs on: none (the live training model) or a block type's copy."""
    if choice == "auto":
        return "q8_0" if device.type == "cpu" and kernels_available() else "none"
    if choice != "none" and (device.type != "cpu" or not kernels_available()):
        raise OptionError(f"--sample-quant {choice} runs on our CPU kernels, which this "
                          f"{'device' if device.type != 'cpu' else 'machine'} lacks; use --sample-quant none")
    return choice


def checks(check: dict, reply: str) -> list[bool]:
    """One verdict per thing checked: the stated answer, then each instruction constraint."""
    answer = [answer_verdict(reply, check["answer"]) is True] if "answer" in check else []
    return answer + verdicts(reply, check.get("constraints", []))


def verified(check: dict, reply: str) -> bool:
    """True when the reply states the gold answer and meets every instruction constraint given."""
    return all(checks(check, reply))


@dataclass
class Sampled:
    """What one prompt's replies gave this step: the best-vs-worst pair (None when all scored the
    same), every reply's reward, and how many were cut off before their end token."""

    pair: Pair | None
    rewards: list[float]
    unfinished: int


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: an FSDP2 shard gathered from every process (a collective), a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class OnlineDPOTask(DPOTask):
    in_harness = False  # it evaluates by sampling through the engine, never through the wrapped forward

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        c = self.config.online
        self.reward_model = None
        if c.source == "model":
            self.reward_model, rm_tokenizer = load_reward_model(c.reward_model, self.device)
            check_tokenizer(self.tokenizer, rm_tokenizer, "--reward-model", c.reward_model)
            self.reward_model.requires_grad_(False)
        else:
            unchecked = next((p.where for p in self.train_data + self.heldout if not p.check), None)
            if unchecked:
                raise DataError(f"--reward verifier needs an 'answer' or 'constraints' in every prompt record; "
                                f"{unchecked} has neither")
        longest = max(len(p.prompt) for p in self.train_data + self.heldout)
        if longest + c.max_new_tokens > self.model.config.context_limit:
            raise OptionError(f"prompts of {longest} tokens plus --max-new-tokens {c.max_new_tokens} exceed the "
                              f"model's context of {self.model.config.context_limit}")
        d = self.config.data
        self.max_concurrency = min(16, d.batch_size * d.grad_accum * c.samples)  # a step's prompts sample at once
        self.max_seq_len = longest + c.max_new_tokens + 1
        self.sample_quant = sample_quant(c.sample_quant, self.device)
        # FSDP2: no process holds the whole live weights, so each step samples from a gathered copy
        live = self.sample_quant == "none" and not trainer.sharded
        self.engine = Engine(self.model, self.tokenizer, max_concurrency=self.max_concurrency,
                             max_seq_len=self.max_seq_len) if live else None
        self.sampled: dict[int, Sampled] = {}

    def read_data(self) -> tuple[list, DataReport]:
        d = self.config.data
        return load_prompts(self.trainer.data, self.tokenizer, d.max_len, d.on_bad_sample, d.max_prompt_len)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, temperature: float, seed: int,
                 keys: list[int] | None = None) -> list[list[tuple[list[int], bool]]]:
        """n replies to each prompt from the policy's current weights: (tokens, ended with the end token).
        Reply j of prompt i draws with seed + 1000 keys[i] + j (keys: the prompts' places in their file, so a
        prompt's replies do not depend on which process samples it, nor beside which others; default 0, 1, ...).
        Under FSDP2 every process must call it: the copy it samples from is gathered from all of them."""
        keys = list(range(len(prompts))) if keys is None else keys
        training = self.model.training
        self.model.eval()
        engine = self.engine or self.snapshot_engine()
        engine.clear_prefix_cache()
        params = [SamplingParams(max_tokens=self.config.online.max_new_tokens, temperature=temperature,
                                 seed=seed + 1000 * key + j) for key in keys for j in range(n)]
        # the engine's KV cache holds the weights' dtype: bf16 autocast (the training steps' and the
        # held-out evaluation's) would write keys of another dtype into it
        with torch.autocast(self.device.type, enabled=False):
            done = [r for r, _ in engine.run_all([p for p in prompts for _ in range(n)], params)] if prompts else []
        if engine is not self.engine:
            del engine
            gc.collect()  # a copy's model and its fused steps refer to each other: only the collector frees them
        self.model.train(training)
        failed = [r.failed_in for r in done if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"sampling failed in {failed[0]}")
        return [[(list(r.output), r.finish_reason == "stop") for r in done[i * n: (i + 1) * n]]
                for i in range(len(prompts))]

    def snapshot_engine(self) -> Engine:
        """An engine over a copy of the policy's weights as they are now (LoRA merged): block-quantized for
        our kernels, or float ("none", under FSDP2 gathered whole on every process)."""
        state = {name: whole(t) for name, t in self.model.state_dict().items()}
        snapshot = inference_copy(self.model.config, lora.merged_state_dict(self.model, state), self.sample_quant,
                                  self.device)
        return Engine(snapshot, self.tokenizer, max_concurrency=self.max_concurrency, max_seq_len=self.max_seq_len)

    def rewards(self, prompt: Pair, replies: list[tuple[list[int], bool]]) -> torch.Tensor:
        if self.reward_model is None:
            passed = [checks(prompt.check, self.tokenizer.decode(tokens, skip_special_tokens=True))
                      for tokens, _ in replies]
            r = torch.tensor([sum(p) / len(p) for p in passed], device=self.device)
        else:
            with torch.no_grad():
                r = score(self.reward_model, [prompt.prompt + tokens for tokens, _ in replies], self.pad)
        ended = torch.tensor([done for _, done in replies], device=r.device)
        return r - self.config.online.no_end_penalty * (~ended).float()

    def sample(self, prompts: list[Pair]) -> list[Sampled]:
        """Each prompt's replies from the current weights, scored, and its best-vs-worst pair."""
        c = self.config.online
        replies = self.generate([p.prompt for p in prompts], c.samples, c.temperature,
                                seed=self.config.seed * 1_000_003 + self.trainer.step * 10_007,
                                keys=[p.index for p in prompts])
        sampled = []
        for prompt, outs in zip(prompts, replies):
            r = self.rewards(prompt, outs)
            hi, lo = int(r.argmax()), int(r.argmin())
            pair = Pair(prompt.prompt, outs[hi][0], outs[lo][0], prompt.where, index=prompt.index) \
                if r[hi] > r[lo] else None
            sampled.append(Sampled(pair, r.tolist(), sum(not done for _, done in outs)))
        return sampled

    def prepare(self, prompts: list[Pair]) -> None:
        """Sample for every prompt this process trains on this step at once: the weights do not change
        between its micro-batches, and one engine run keeps more rows busy."""
        self.sampled = {p.index: s for p, s in zip(prompts, self.sample(prompts))}

    def units(self, prompts: list[Pair]) -> int:
        """The step's loss is a mean over its pairs (a prompt whose replies all tied gives none)."""
        return sum(self.sampled[p.index].pair is not None for p in prompts)

    def loss(self, prompts: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO's loss and metrics summed over this micro-batch's sampled pairs."""
        pairs = [s.pair for s in (self.sampled[p.index] for p in prompts) if s.pair is not None]
        if not pairs:  # every prompt's replies tied: nothing to prefer, yet DDP and FSDP2 await every gradient
            return sum(p.sum() for p in self.trainer.params) * 0.0, {}
        return summed(*self.preference_loss(self.pair_logps(pairs)), len(pairs))

    def step_metrics(self, prompts: list[Pair], units: int) -> dict:
        """What the step's replies scored, over every process's prompts: sample_reward and unfinished
        per reply, best_reward and paired per prompt."""
        mine = [self.sampled[p.index] for p in self.trainer.share(prompts)]
        sums = distributed.all_sum_by_key({
            "sample_reward": sum(sum(s.rewards) for s in mine), "best_reward": sum(max(s.rewards) for s in mine),
            "unfinished": sum(s.unfinished for s in mine), "paired": sum(s.pair is not None for s in mine),
            "replies": sum(len(s.rewards) for s in mine), "prompts": len(mine)})
        per = {"sample_reward": "replies", "unfinished": "replies", "best_reward": "prompts", "paired": "prompts"}
        return {key: round(sums[key] / sums[over], 6) for key, over in per.items()}

    def evaluate(self) -> dict[str, float]:
        """One greedy reply per held-out prompt, the prompts dealt to the processes in turn."""
        mine = self.trainer.share(self.heldout)
        replies = self.generate([p.prompt for p in mine], 1, 0.0, seed=0)
        total = distributed.all_sum(sum(self.rewards(p, outs)[0].item() for p, outs in zip(mine, replies)))
        result = {"reward": total / len(self.heldout)}
        if self.reward_model is None:
            passed = int(distributed.all_sum(sum(
                verified(p.check, self.tokenizer.decode(outs[0][0], skip_special_tokens=True))
                for p, outs in zip(mine, replies))))
            low, high = wilson(passed, len(self.heldout))
            result |= {"verified": passed / len(self.heldout), "verified_low": low, "verified_high": high}
        return result
