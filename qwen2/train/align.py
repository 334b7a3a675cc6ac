"""The loop shared by reward-model training, offline DPO and online DPO: the policy (full or
LoRA), the optimizer (AdamW, OnDARE or OnTIES), warm-up then cosine decay, gradient clipping,
a line of metrics per step in `metrics.jsonl` and held-out metrics every `eval_every` steps
(`eval_` keys), checkpoints every `save_every` steps that `resume` continues from with the same
losses step for step (checkpoint.py, shared with trainer.py; the data position is the place in
the shuffled order and the step that shuffled it), then the model in the output folder.

Each task (reward.py, dpo.py, online_dpo.py) subclasses AlignTrainer with its loss and its
evaluation. Single process; not covered: torchrun (the merging optimizer itself works on FSDP2
shards, see merging_optimizer.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qwen2.device import cpu_has_native_bf16
from qwen2.errors import DataError, OptionError
from qwen2.files import write_text_atomically
from qwen2.memory import peak_rss_mib
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer
from qwen2.train import checkpoint, lora
from qwen2.train.datasets import DEMO, data_path
from qwen2.train.merging_optimizer import METHODS, OnlineMergingAdamW, task_vectors
from qwen2.train.preference import Pair, load_pairs, same_tokenizer, split
from qwen2.train.trainer import apply_gradients, cosine_schedule, enable_gradient_checkpointing
from qwen2.weights.export import export_hf

LOSSES = ("sigmoid", "ipo", "robust")


@dataclass
class AlignConfig:
    data: str
    out: str
    task: str = "dpo"  # "rm", "dpo" or "online-dpo"
    model: str | None = None  # the policy (or the reward model's starting point); None: the default model
    ref: str | None = None  # DPO reference; None: the policy's starting weights (LoRA off, or a frozen copy)
    reward_model: str | None = None  # online DPO: the scorer (an HF folder `qwen2 train rm` wrote)
    reward: str | None = None  # online DPO: "model" (reward_model) or "verifier"; None: model if one is given
    base: str | None = None  # merging optimizers: tau = model - base (None: no SFT delta to merge)
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float | None = None  # None: 0.1 for robust, else 0
    precompute_ref: bool = True  # reference log-probs computed once before training, cached in out/
    optimizer: str = "adamw"
    reserve_rate: float = 0.01
    merge_alpha: float = 1e-7
    merge_every: int = 1
    center: float = 0.0  # reward model: weight of mean((r_chosen + r_rejected)^2)
    head_lr_scale: float = 10.0  # reward model: the new head's learning rate over the body's
    samples: int = 4  # online DPO: responses per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    no_end_penalty: float = 1.0  # subtracted from the reward of a response cut by max_new_tokens
    steps: int | None = None
    epochs: float | None = None  # neither: one epoch
    lr: float | None = None  # None: 5e-5 LoRA, 1e-6 full (DPO); 1e-5 for the reward model
    batch_size: int = 2  # pairs (online: prompts) per micro-batch
    grad_accum: int = 1
    max_len: int = 512
    max_prompt_len: int | None = None  # longer prompts are bad samples (None: any shorter than max_len)
    heldout: float = 0.1  # fraction of the pairs held out for evaluation
    eval_every: int = 0  # steps between held-out evaluations (0: only before and after)
    seed: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(lora.TARGETS)
    merge: bool = True
    warmup: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    grad_checkpointing: bool = False
    save_every: int = 50  # steps between checkpoints (0: only the final one)
    keep: int = 2  # checkpoints kept (at least 1: --resume needs one)
    resume: bool = False
    on_bad_sample: str = "error"
    device: str | None = None
    bf16: bool | None = None
    progress: bool = True

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "max_len", "samples", "max_new_tokens", "merge_every",
                     "max_prompt_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.task not in ("rm", "dpo", "online-dpo"):
            raise OptionError(f"unknown task {self.task!r}; choose rm, dpo or online-dpo")
        if self.loss not in LOSSES:
            raise OptionError(f"unknown --loss {self.loss!r}; choose {', '.join(LOSSES)}")
        if self.optimizer not in ("adamw", *METHODS):
            raise OptionError(f"unknown --optimizer {self.optimizer!r}; choose adamw, {', '.join(METHODS)}")
        if not self.beta > 0:
            raise OptionError(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.smoothing < 0.5:
            raise OptionError(f"--label-smoothing must be in [0, 0.5), got {self.smoothing}")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and not self.epochs > 0:
            raise OptionError("--steps must be at least 1 and --epochs positive")
        if not self.head_lr_scale > 0:
            raise OptionError(f"--head-lr-scale must be positive, got {self.head_lr_scale}")
        if self.on_bad_sample not in ("error", "skip"):
            raise OptionError(f"--on-bad-sample takes error or skip, not {self.on_bad_sample!r}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise OptionError(f"--lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.heldout < 1:
            raise OptionError(f"--heldout must be in [0, 1), got {self.heldout}")
        checkpoint.check_options(self.save_every, self.keep)
        if self.base and self.lora_rank:
            raise OptionError("--base sets tau for full fine-tuning; a LoRA adapter has no SFT delta to merge "
                              "(drop --base: the merging optimizers then sparsify the adapter's updates alone)")
        if self.base and self.optimizer == "adamw":
            raise OptionError("--base is for --optimizer ondare or onties")
        if self.task == "online-dpo":
            if self.reward_source not in ("model", "verifier"):
                raise OptionError("online-dpo needs --reward-model (a folder written by `qwen2 train rm`) or "
                                  "--reward verifier (prompts with an 'answer' or 'constraints' to check)")
            if self.reward_source == "model" and not self.reward_model:
                raise OptionError("--reward model needs --reward-model (a folder written by `qwen2 train rm`)")
            if self.reward_source == "verifier" and self.reward_model:
                raise OptionError("--reward verifier checks replies itself; drop --reward-model")

    @property
    def reward_source(self) -> str | None:
        return self.reward or ("model" if self.reward_model else None)

    @property
    def smoothing(self) -> float:
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 0.1 if self.loss == "robust" else 0.0

    @property
    def learning_rate(self) -> float:
        if self.lr:
            return self.lr
        if self.task == "rm":
            return 1e-4 if self.lora_rank else 1e-5
        return 5e-5 if self.lora_rank else 1e-6


def load_float(spec: str | None, device: torch.device) -> tuple[Transformer, Tokenizer]:
    from qwen2.loading import load_model

    return load_model(spec, quant="none", dtype="float32", device=str(device))


def check_tokenizer(policy: Tokenizer, other: Tokenizer, what: str, spec: str | None) -> None:
    if not same_tokenizer(policy, other):
        raise OptionError(f"{what} {spec or 'the default model'} has a different tokenizer than the policy; its "
                          "scores or log-probabilities would be of other tokens: use one of the same model family")


class AlignTrainer:
    def __init__(self, config: AlignConfig):
        config.check()
        self.config, self.out = config, Path(config.out)
        self.device = torch.device(config.device) if config.device else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        native = self.device.type == "cuda" or cpu_has_native_bf16()
        self.autocast = native if config.bf16 is None else config.bf16
        self.data = data_path(config.data)
        if not self.data.exists():
            raise DataError(f"no such data file: {config.data} (or name a demo set: {', '.join(DEMO)})")
        if config.resume:  # before the model loads, which may take minutes
            checkpoint.require(self.out)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model, self.tokenizer = self.build_model()
        if config.lora_rank:
            targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip())
            lora.add_lora(self.model, config.lora_rank, config.lora_alpha or 2 * config.lora_rank,
                          config.lora_dropout, targets)
            if hasattr(self.model, "score"):  # a reward model's head is new: it trains with the adapters
                self.model.score.requires_grad_(True)
        if config.grad_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        self.pad = self.tokenizer.pad_token_id or 0
        self.train_pairs, self.heldout_pairs = self.read_data()
        self.per_step = config.batch_size * config.grad_accum
        self.total_steps = config.steps or max(1, round((config.epochs or 1) * len(self.train_pairs) / self.per_step))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.make_optimizer()
        warmup = max(1, round(config.warmup * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(cosine_schedule, total=self.total_steps, warmup=warmup))
        # the data position: the pairs in the order the step `_shuffled_at` shuffled them, `_at` of them taken
        self.step, self._order, self._at, self._shuffled_at = 0, [], 0, 0

    # -- what a task provides -------------------------------------------------------------------
    def build_model(self) -> tuple[torch.nn.Module, Tokenizer]:
        return load_float(self.config.model, self.device)

    def read_data(self) -> tuple[list[Pair], list[Pair]]:
        c = self.config
        pairs, report = load_pairs(self.data, self.tokenizer, c.max_len, c.on_bad_sample, c.max_prompt_len)
        if report.bad:
            print(f"data: {report.summary()}", file=sys.stderr)
        return split(pairs, c.heldout, c.seed)

    def loss(self, pairs: list[Pair]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The trained parameters as the optimizer's groups (one group, at the configured rate)."""
        return [{"params": self.params}]

    def save(self) -> None:
        raise NotImplementedError

    def write_weights(self, folder: Path) -> None:
        """The trained weights of a checkpoint (read_weights reads them back)."""
        c = self.config
        checkpoint.write_weights(folder, self.model, self.tokenizer, bool(c.lora_rank), c.model or "")

    def read_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        return checkpoint.read_weights(folder, bool(self.config.lora_rank))

    # -- the loop ---------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "adamw":
            return torch.optim.AdamW(self.param_groups(), lr=c.learning_rate, weight_decay=c.weight_decay,
                                     foreach=False)
        taus = None
        if c.base:
            base, base_tokenizer = load_float(c.base, torch.device("cpu"))
            check_tokenizer(self.tokenizer, base_tokenizer, "--base", c.base)
            taus = task_vectors(self.model, base)
            del base
        return OnlineMergingAdamW(self.params, taus, method=c.optimizer, lr=c.learning_rate,
                                  weight_decay=c.weight_decay, reserve_rate=c.reserve_rate, alpha=c.merge_alpha,
                                  merge_every=c.merge_every, seed=c.seed)

    def next_pairs(self) -> list[Pair]:
        """The next step's pairs in a seeded order, reshuffled each epoch."""
        taken = []
        while len(taken) < self.per_step:
            if self._at >= len(self._order):
                self._order, self._at, self._shuffled_at = self.shuffled(self.step), 0, self.step
            chunk = self._order[self._at: self._at + self.per_step - len(taken)]
            taken += chunk
            self._at += len(chunk)
        return taken

    def shuffled(self, step: int) -> list[Pair]:
        order = list(self.train_pairs)
        random.Random(self.config.seed * 1_000_003 + step).shuffle(order)
        return order

    def train_step(self) -> dict:
        c, pairs = self.config, self.next_pairs()
        sums: dict[str, float] = {}
        for i in range(0, len(pairs), c.batch_size):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, metrics = self.loss(pairs[i: i + c.batch_size])
            (loss / c.grad_accum).backward()
            for key, value in {"loss": loss.item(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value / c.grad_accum
        norm, lr = apply_gradients(self.params, self.optimizer, self.scheduler, c.clip)
        self.step += 1
        return {"step": self.step, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr, "grad_norm": round(norm, 4)}

    def train(self) -> dict:
        """Run to the last step (from the last checkpoint with `resume`); returns the final metrics."""
        c = self.config
        if c.resume:
            self._resume()
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.out / "train_config.json", json.dumps(dataclasses.asdict(c), indent=2) + "\n")
        metrics_file = self.out / "metrics.jsonl"
        checkpoint.keep_metrics(metrics_file, self.step)
        start, last = time.perf_counter(), {}
        with open(metrics_file, "a") as log:
            if self.heldout_pairs and self.step == 0:
                log.write(json.dumps({"step": 0, **self._evaluate()}) + "\n")
            bar = tqdm(total=self.total_steps, initial=self.step, desc=c.task, disable=not c.progress)
            while self.step < self.total_steps:
                tick = time.perf_counter()
                last = self.train_step()
                last |= {"seconds": round(time.perf_counter() - tick, 3),
                         "elapsed": round(time.perf_counter() - start, 1), "rss_mib": round(peak_rss_mib())}
                if self.heldout_pairs and (self.step == self.total_steps or
                                           c.eval_every and self.step % c.eval_every == 0):
                    last |= self._evaluate()
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                bar.update(1)
                if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            bar.close()
        self.save_checkpoint()  # before save(), which merges LoRA adapters into the weights
        self.save()
        plot_metrics(metrics_file, self.out / "metrics.png")
        return last

    def save_checkpoint(self) -> Path:
        position = {"at": self._at, "shuffled_at": self._shuffled_at}
        state = checkpoint.training_state(self.step, position, self.optimizer, self.scheduler)
        return checkpoint.save(self.out, state, self.write_weights, self.config.keep)

    def _resume(self) -> None:
        folder = max(checkpoint.folders(self.out), key=checkpoint.step_of)  # __init__ checked there is one
        state = checkpoint.read_state(folder, ("at", "shuffled_at"))  # first: a refused file changes nothing
        checkpoint.restore(state, self.model, self.read_weights(folder), folder, self.optimizer, self.scheduler,
                           self.total_steps)
        self.step, self._at, self._shuffled_at = state["step"], state["at"], state["shuffled_at"]
        self._order = self.shuffled(self._shuffled_at)

    def _evaluate(self) -> dict:
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            result = {f"eval_{k}": round(v, 6) for k, v in self.evaluate().items()}
        self.model.train()
        return result

    def save_policy(self) -> None:
        """The policy as an HF checkpoint (LoRA: adapter/ and, unless merge=False, the merged model)."""
        c = self.config
        if c.lora_rank:
            lora.save_adapter(self.model, self.out / "adapter", c.model or "")
            if not c.merge:
                return
            lora.merge_lora(self.model)
        export_hf(self.model.config, self.model.state_dict(), self.tokenizer, self.out)


def plot_metrics(metrics: Path, png: Path) -> bool:
    """Loss and, where evaluated, held-out accuracy and margin over steps; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    wanted = ("loss", "eval_accuracy", "eval_margin", "sample_reward", "eval_reward")
    keys = [k for k in wanted if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="o" if key != "loss" else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True
