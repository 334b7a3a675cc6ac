"""The one training loop, for every task: sft and pretrain (lm.py), the reward model (reward.py),
offline DPO (dpo.py) and online DPO (online_dpo.py). A task gives what differs (its model, its
data, the loss of a micro-batch, its held-out evaluation, special parameter groups, what it saves:
`Task` below); the loop owns the rest, once:

- the device and bf16 autocast (where the CPU or GPU computes it natively), on a CPU the C allocator
  set to reuse freed memory (qwen2.memory.keep_freed_memory), seeds, the model with
  LoRA adapters and gradient checkpointing, float32 master weights;
- the optimizer (AdamW, or the Online Merging Optimizers OnDARE / OnTIES of merging_optimizer.py,
  tau from --base), linear warm-up then cosine decay to zero, gradient clipping;
- the steps: each takes `grad_accum` micro-batches of `batch_size` items per process, in a seeded
  order reshuffled each epoch. The step's loss is the mean over its units (target tokens for
  language modelling, pairs or prompts for preference training): each micro-batch backpropagates
  its loss sum over the units of the whole step, so the gradient equals one big batch's whatever
  the split;
- metrics.jsonl (a line per step; held-out `eval_` metrics before the first step, every
  `eval_every` steps and after the last, where the task holds data out), the plot of it,
  train_config.json (the settings under their flat keys);
- checkpoints/step-N every `save_every` steps (checkpoint.py: weights or adapter, optimizer,
  scheduler, RNG and the data position, epoch and row), so a run killed at any point resumes from
  the last complete one with the same losses, step for step; then the model in the output folder.

Under torchrun (or Ray Train, ray_launcher.py) every process takes its share of each step's items
(DDP or FSDP2, see qwen2.distributed.data_parallel); the units are counted over all of them, so a
step's loss is the one a single process computes on the same global batch. Process 0 writes the
files; under FSDP2 every process first takes part in gathering the whole tensors it writes (the
trained weights and the optimizer state for a checkpoint, the whole model for the output), so the
files are those of one process, and a resume hands them back for each process to keep its shard.

Online DPO samples each process's prompts on that process, from its replica (DDP) or from a copy
gathered whole from the shards each step (FSDP2). Under --parallel ep an MoE model's experts are
dealt out over the processes (qwen2.distributed.expert_parallel), the rest replicated as under DDP;
its checkpoints too are one process's files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

from qwen2 import distributed
from qwen2.device import cpu_has_native_bf16
from qwen2.errors import DataError
from qwen2.files import write_text_atomically
from qwen2.memory import keep_freed_memory, peak_rss_mib
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer
from qwen2.train import checkpoint, lora
from qwen2.train.config import TrainConfig
from qwen2.train.data import DataReport, split
from qwen2.train.datasets import DEMO, data_path
from qwen2.train.merging_optimizer import OnlineMergingAdamW, task_vectors
from qwen2.train.preference import check_tokenizer
from qwen2.weights.export import export_hf


def enable_gradient_checkpointing(model: Transformer) -> None:
    """Recompute each block in the backward pass instead of keeping its activations."""
    for block in model.model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def apply_gradients(params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, clip: float,
                    grad_norm: Callable[[list[nn.Parameter]], torch.Tensor] | None = None) -> tuple[float, float]:
    """Clip the gradients (clip <= 0: measure only), step the optimizer and the schedule, clear the
    gradients. Returns the gradient norm before clipping and the learning rate the step used.
    `grad_norm`: how to measure it, where the parameters are not all on this process."""
    if grad_norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = grad_norm(params)
    torch.nn.utils.clip_grads_with_norm_(params, clip if clip > 0 else float("inf"), norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), lr


def load_float(spec: str | None, device: torch.device,
               experts_of: tuple[int, int] | None = None) -> tuple[Transformer, Tokenizer]:
    """A model to train (or to train against) in float32, and its tokenizer (`experts_of`: see load_model)."""
    from qwen2.loading import load_model

    return load_model(spec, quant="none", dtype="float32", device=str(device), experts_of=experts_of)


def expert_share(config: TrainConfig) -> tuple[int, int] | None:
    """(rank, world) where --parallel ep runs on several processes: the experts this process reads."""
    rank, world = distributed.world()
    return (rank, world) if config.parallel.mode == "ep" and world > 1 else None


# -- what a task gives ---------------------------------------------------------------------------
class Task:
    """One kind of training. `build_model` makes the model before the trainer adds LoRA; __init__
    (the model and tokenizer built) reads the data, holding out the configured fraction; then the
    loop asks for each epoch's items, the units of a micro-batch, its loss and metrics as sums over
    those units, the held-out metrics, and the weights a checkpoint and the output folder hold."""

    plot = "metrics.png"  # where the metrics are drawn
    new_modules: tuple[str, ...] = ()  # modules that start untrained: they train beside LoRA adapters
    in_harness = True  # evaluate() runs the model's forward: inside the DDP / FSDP2 wrapper, as the losses do

    def __init__(self, trainer: Trainer):
        self.trainer, self.config = trainer, trainer.config
        self.model, self.tokenizer, self.device = trainer.model, trainer.tokenizer, trainer.device
        self.pad = self.tokenizer.pad_token_id or 0
        items, report = self.read_data()
        if report.bad and trainer.lead:
            print(f"data: {report.summary()}", file=sys.stderr)
        self.train_data, self.heldout = split(items, self.config.data.heldout, self.config.seed, self.group)
        if not self.train_data:
            raise DataError(f"{self.config.data.path}: nothing left to train on after holding out "
                            f"{self.config.data.heldout:g} of {len(items)}; lower --heldout")

    @classmethod
    def build_model(cls, config: TrainConfig, device: torch.device) -> tuple[nn.Module, Tokenizer]:
        return load_float(config.model.name, device, expert_share(config))

    def read_data(self) -> tuple[list, DataReport]:
        raise NotImplementedError

    def group(self, item) -> Hashable:
        """What keeps items together on one side of the held-out split (here: nothing, each its own)."""
        return id(item)

    def epoch(self, number: int) -> list:
        """The training items in the order of epoch `number`."""
        order = list(self.train_data)
        random.Random(self.config.seed * 1_000_003 + number).shuffle(order)
        return order

    def prepare(self, items: list) -> None:
        """Called with this process's items of a step before their micro-batches (here: nothing to do)."""

    def units(self, items: list) -> int:
        """What the step's loss is a mean over, in these items (here: the items themselves)."""
        return len(items)

    def loss(self, items: list) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of a micro-batch summed over its units, and its metrics summed the same way."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics of the held-out items (called in eval mode, without gradients)."""
        raise NotImplementedError

    def step_metrics(self, items: list, units: int) -> dict:
        """What a step logs of its items beyond the loss and the metrics (a `tokens` count also gets
        its rate, tokens_per_s)."""
        return {}

    def param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        """The trained parameters as the optimizer's groups (one group, at the configured rate)."""
        return [{"params": params}]

    def write_weights(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        """A checkpoint's weights from `weights`, the model's state dict (with LoRA, at least its trained tensors)."""
        c = self.config
        checkpoint.write_weights(folder, self.model, self.tokenizer, weights, bool(c.lora.rank), c.model.name or "")

    def read_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        return checkpoint.read_weights(folder, bool(self.config.lora.rank))

    def save(self, out: Path, weights: dict[str, torch.Tensor]) -> None:
        """The output folder from `weights`, the model's state dict: an HF checkpoint (LoRA: adapter/ and,
        unless merge=False, the merged model)."""
        c = self.config
        if c.lora.rank:
            lora.save_adapter(self.model, out / "adapter", c.model.name or "", weights)
            if not c.lora.merge:
                return
            weights = lora.merged_state_dict(self.model, weights)
        export_hf(self.model.config, weights, self.tokenizer, out)


def summed(loss: torch.Tensor, metrics: dict[str, float], n: int) -> tuple[torch.Tensor, dict[str, float]]:
    """A loss and metrics that are means over `n` units, as the sums Task.loss gives."""
    return loss * n, {key: value * n for key, value in metrics.items()}


def body(model: nn.Module) -> Transformer:
    """The Transformer a task trains (a reward model holds one under its scalar head)."""
    return getattr(model, "transformer", model)


def task_class(name: str) -> type[Task]:
    from qwen2.train import dpo, lm, online_dpo, reward  # here: each of them builds on this module

    return {"sft": lm.SFTTask, "pretrain": lm.PretrainTask, "rm": reward.RewardTask, "dpo": dpo.DPOTask,
            "online-dpo": online_dpo.OnlineDPOTask}[name]


class Harness(nn.Module):
    """The model, with a forward that runs a task's computation on it, so that DDP's and FSDP2's
    hooks run around every loss and evaluation. The computation comes with its arguments bound:
    the task moves its own tensors, and the wrappers have no inputs to copy or cast."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[], object]) -> object:
        return compute()


# -- the run ---------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig):
        config.check()
        c = config
        self.config, self.out = config, Path(c.out)
        self.rank, self.world = distributed.world()
        self.lead = self.rank == 0
        self.sharded = self.world > 1 and c.parallel.mode == "fsdp"  # FSDP2: no process holds a whole tensor
        self.expert_parallel = self.world > 1 and c.parallel.mode == "ep"  # each process holds some experts
        # where no process holds the whole model: the module that gathers whole tensors and hands them back
        self.parts = None
        if self.sharded or self.expert_parallel:
            from qwen2.distributed import data_parallel, expert_parallel

            self.parts = data_parallel if self.sharded else expert_parallel
        self.device = torch.device(c.parallel.device) if c.parallel.device else distributed.local_device()
        if self.device.type == "cpu":
            keep_freed_memory()  # each step's gigabytes reuse the last one's pages: half a 0.5B step was page faults
        native = self.device.type == "cuda" or cpu_has_native_bf16()
        self.autocast = native if c.parallel.bf16 is None else c.parallel.bf16
        self.data = data_path(c.data.path)
        if not self.data.exists():  # before the model loads, which may take minutes
            raise DataError(f"no such data file or folder: {c.data.path} (or name a demo set: {', '.join(DEMO)})")
        if c.checkpoint.resume:
            checkpoint.require(self.out)
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        kind = task_class(c.task)
        self.model, self.tokenizer = self._build_model(kind)
        self.task = kind(self)
        taus = self._task_vectors()  # before FSDP2 shards the weights
        self.harness = Harness(self.model)
        if self.world > 1:
            from qwen2.distributed.data_parallel import wrap

            self.harness = wrap(self.harness, body(self.model).model.layers, c.parallel.mode, self.autocast)
        self.per_step = c.data.batch_size * c.data.grad_accum * self.world  # items, over every process
        self.step, self.epoch, self.row = 0, 0, 0
        self._order: list | None = self.task.epoch(0)  # the items of epoch self.epoch, made when it starts
        self.total_steps = c.steps or max(1, math.ceil((c.epochs or 1) * len(self._order) / self.per_step))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # expert parallelism: the gradient norm adds every process's experts
        self.grad_norm = self.parts.grad_norm(self.model) if self.expert_parallel else None
        self._sparse_embedding_gradient()
        self.optimizer = self._optimizer(taus)
        warmup = max(1, round(c.optim.warmup * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(cosine_schedule, total=self.total_steps, warmup=warmup))

    def _build_model(self, kind: type[Task]) -> tuple[nn.Module, Tokenizer]:
        c = self.config
        model, tokenizer = kind.build_model(c, self.device)
        if c.lora.rank:
            targets = tuple(t.strip() for t in c.lora.targets.split(",") if t.strip())
            lora.add_lora(model, c.lora.rank, c.lora.alpha or 2 * c.lora.rank, c.lora.dropout, targets)
            for name in kind.new_modules:
                model.get_submodule(name).requires_grad_(True)
        if self.expert_parallel:  # after LoRA: an expert's adapters go with it
            from qwen2.distributed.expert_parallel import shard

            shard(body(model), self.rank, self.world)
        if c.model.grad_checkpointing:
            enable_gradient_checkpointing(body(model))
        return model.train(), tokenizer

    def _sparse_embedding_gradient(self) -> None:
        """A language-model task's tied head gives the shared matrix a dense gradient first in the backward
        pass; the embedding's own, made sparse, then adds only the batch's rows to it, where a dense one
        filled a (vocabulary x hidden) zeros, added the rows and was added whole (0.5 s of a 0.5B step).
        One process only: data parallelism reduces dense gradients."""
        embedding = body(self.model).model.embed_tokens
        if (self.config.task in ("sft", "pretrain") and self.world == 1 and isinstance(embedding, nn.Embedding)
                and body(self.model).config.tie_word_embeddings and embedding.weight.requires_grad):
            embedding.sparse = True

    def _task_vectors(self) -> list[torch.Tensor | None] | None:
        """tau = model - base for the merging optimizers, where --base names the base."""
        spec = self.config.optim.base
        if not spec:
            return None
        base, base_tokenizer = load_float(spec, torch.device("cpu"))
        check_tokenizer(self.tokenizer, base_tokenizer, "--base", spec)
        return task_vectors(self.model, base)

    def _optimizer(self, taus: list[torch.Tensor | None] | None) -> torch.optim.Optimizer:
        o, lr = self.config.optim, self.config.learning_rate
        if o.name == "adamw":
            # one fused pass per step where torch has it (6x the default's speed on a CPU: 34 vs 195 ms over
            # 40M parameters); FSDP2's sharded parameters keep the default
            fused = not self.sharded and self.device.type in ("cpu", "cuda")
            return torch.optim.AdamW(self.task.param_groups(self.params), lr=lr, weight_decay=o.weight_decay,
                                     fused=fused)
        return OnlineMergingAdamW(self.params, taus, method=o.name, lr=lr, weight_decay=o.weight_decay,
                                  reserve_rate=o.reserve_rate, alpha=o.merge_alpha, merge_every=o.merge_every,
                                  seed=self.config.seed)

    def next_items(self) -> list:
        """The next step's items (every process's) in this run's order, crossing into the next epoch where needed."""
        items: list = []
        while len(items) < self.per_step:
            if self._order is None:
                self._order = self.task.epoch(self.epoch)
            take = self._order[self.row: self.row + self.per_step - len(items)]
            items += take
            self.row += len(take)
            if self.row >= len(self._order):
                self.epoch, self.row, self._order = self.epoch + 1, 0, None
        return items

    def share(self, items: list) -> list:
        """This process's items of `items`: every world-th, from its rank on."""
        return items[self.rank:: self.world]

    def backward(self, items: list) -> tuple[float, int, dict[str, float]]:
        """Accumulate the gradient of the step's loss over `items` (this process's share of them under
        torchrun), micro-batch by micro-batch; returns that loss, its units and the metrics' means."""
        size = self.config.data.batch_size
        mine = self.share(items)
        self.task.prepare(mine)
        batches = [mine[i: i + size] for i in range(0, len(mine), size)]
        units = int(distributed.all_sum(sum(self.task.units(b) for b in batches)))
        total, sums = 0.0, {}
        for batch in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, metrics = self.harness(functools.partial(self.task.loss, batch))
                loss = loss / max(1, units)
            (loss * self.world).backward()  # DDP and FSDP2 average the gradients; the step needs their sum
            total += loss.item()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        means = {key: value / max(1, units) for key, value in distributed.all_sum_by_key(sums).items()}
        return distributed.all_sum(total), units, means

    def train_step(self) -> dict:
        items = self.next_items()
        loss, units, metrics = self.backward(items)
        norm, lr = apply_gradients(self.params, self.optimizer, self.scheduler, self.config.optim.clip,
                                   self.grad_norm)
        self.step += 1
        return {"step": self.step, "loss": round(loss, 6), **{k: round(v, 6) for k, v in metrics.items()}, "lr": lr,
                "grad_norm": round(norm, 4), **self.task.step_metrics(items, units)}

    def evaluate(self) -> dict:
        """The task's held-out metrics, as `eval_` keys."""
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            result = self.harness(self.task.evaluate) if self.task.in_harness else self.task.evaluate()
        self.model.train()
        return {f"eval_{k}": round(v, 6) for k, v in result.items()}

    def train(self) -> dict:
        """Run to the last step (from the last checkpoint with `resume`); returns the final metrics."""
        c = self.config
        if c.checkpoint.resume:
            self._resume()
        metrics_file = self.out / "metrics.jsonl"
        if self.lead:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.out / "train_config.json", json.dumps(c.flat(), indent=2) + "\n")
            checkpoint.keep_metrics(metrics_file, self.step)
        start, last = time.perf_counter(), {}
        bar = tqdm(total=self.total_steps, initial=self.step, desc=c.task, disable=not (c.progress and self.lead))
        with open(metrics_file if self.lead else os.devnull, "a") as log:
            if self.task.heldout and self.step == 0:
                log.write(json.dumps({"step": 0, **self.evaluate()}) + "\n")
            while self.step < self.total_steps:
                tick = time.perf_counter()
                last = self.train_step()
                seconds = time.perf_counter() - tick
                if "tokens" in last:
                    last["tokens_per_s"] = round(last["tokens"] / seconds, 1)
                last |= {"seconds": round(seconds, 3), "elapsed": round(time.perf_counter() - start, 1),
                         "rss_mib": round(peak_rss_mib())}
                if self.task.heldout and (self.step == self.total_steps or
                                          c.eval_every and self.step % c.eval_every == 0):
                    last |= self.evaluate()
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", mem=f"{last['rss_mib']}M")
                bar.update(1)
                if c.checkpoint.save_every and self.step % c.checkpoint.save_every == 0 and \
                        self.step < self.total_steps:
                    self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        weights = self._weights()
        if self.lead:
            self.task.save(self.out, weights)
            plot_metrics(metrics_file, self.out / self.task.plot)
        return last

    # -- checkpoints (checkpoint.py) ------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoints/step-N; every process takes part, in gathering what FSDP2 shards and the RNG states."""
        folder = self.out / "checkpoints" / f"step-{self.step}"
        weights = self._weights(trained_only=bool(self.config.lora.rank))
        optimizer = self._optimizer_state()
        rngs = distributed.gather(torch.get_rng_state())
        if self.lead:
            state = checkpoint.training_state(self.step, {"epoch": self.epoch, "row": self.row}, optimizer,
                                              self.scheduler, rngs)
            checkpoint.save(self.out, state, lambda folder: self.task.write_weights(folder, weights),
                            self.config.checkpoint.keep)
        distributed.barrier()
        return folder

    def _weights(self, trained_only: bool = False) -> dict[str, torch.Tensor]:
        """The model's state dict to save (under FSDP2 gathered whole on process 0 from every process's
        shards; `trained_only`: the frozen weights need not be gathered)."""
        return self.parts.full_state_dict(self.model, trained_only) if self.parts else self.model.state_dict()

    def _optimizer_state(self) -> dict:
        """The optimizer's state dict (under FSDP2 and ep gathered whole)."""
        return self.parts.full_optimizer_state(self.model, self.optimizer) if self.parts else \
            self.optimizer.state_dict()

    def _resume(self) -> None:
        folder = max(checkpoint.folders(self.out), key=checkpoint.step_of)  # __init__ checked there is one
        state = checkpoint.read_state(folder, ("epoch", "row"))  # first: a refused file leaves the model as it was
        checkpoint.restore(state, self.model, self.task.read_weights(folder), folder, self.optimizer, self.scheduler,
                           self.total_steps, say=self.lead, rank=self.rank,
                           load_whole=self.parts.load_full_state if self.parts else None)
        self.step, self.epoch, self.row = state["step"], state["epoch"], state["row"]
        self._order = None  # remade for the epoch resumed in


def plot_metrics(metrics: Path, png: Path) -> bool:
    """The loss and each held-out metric (and online DPO's sample reward) over the steps, a panel
    each; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    found = {k for r in rows for k in r}
    keys = ["loss", *sorted(k for k in found if k.startswith("eval_") and not k.endswith(("_low", "_high"))),
            *(["sample_reward"] if "sample_reward" in found else [])]
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
