"""Supervised fine-tuning (full or LoRA) and pretraining from scratch: one loop for both.

Each optimizer step gathers `grad_accum` micro-batches of `batch_size` rows, counts the target
tokens over all of them, and backpropagates sum(weight * nll) / that count per micro-batch, so
the step's gradient equals one big batch's whatever the split. The logits of the 152k
vocabulary are never held whole: the loss and its gradients are computed together over chunks
of the rows that have a target (loss.py). AdamW, linear warm-up then cosine decay to
zero, gradient clipping, bf16 autocast where the CPU or GPU computes bf16 natively, float32
master weights, seeds.

Output folder: the model as an HF checkpoint (LoRA: `adapter/` in the PEFT layout and, unless
merge=False, the merged model), metrics.jsonl (a line per step), loss.png, train_config.json,
and checkpoints/step-N (weights or adapter, plus optimizer, scheduler, RNG and the data position:
epoch and row), written and read back by checkpoint.py, so a run killed at any point resumes from
the last complete one with the same losses, step for step.

Under torchrun every process takes its share of each step's rows (DDP or FSDP2, see
qwen2.distributed.data_parallel); the target tokens are counted over all of them, so a step's
loss is the one a single process computes on the same global batch. Process 0 writes the files.

An MoE model's training loss adds router_aux_loss_coef times the router load-balancing loss of
each micro-batch, as transformers' Qwen2-MoE adds it (loss.py); held-out perplexity leaves it out.

Not covered: resuming an FSDP2 run (its checkpoints hold the whole model, not the sharded
optimizer state), LoRA under FSDP2 (use DDP).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from tqdm import tqdm

from qwen2 import distributed
from qwen2.config import Qwen2Config
from qwen2.device import cpu_has_native_bf16
from qwen2.errors import DataError, OptionError
from qwen2.files import write_text_atomically
from qwen2.memory import peak_rss_mib
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer
from qwen2.train import checkpoint, lora
from qwen2.train.data import Batch, Row, Sample, collate, load_chat, load_corpus, make_rows
from qwen2.train.datasets import DEMO, data_path
from qwen2.train.loss import loss_sum
from qwen2.weights.export import export_hf


@dataclass
class TrainConfig:
    data: str
    out: str
    task: str = "sft"  # "sft" or "pretrain"
    model: str | None = None  # sft: what to fine-tune (None: the default model)
    preset: str | None = None  # pretrain: the config to start from
    tokenizer: str | None = None  # pretrain: whose tokenizer (None: the default model's)
    steps: int | None = None
    epochs: float | None = None  # neither: one epoch
    lr: float | None = None  # None: 2e-4 with LoRA, 2e-5 full, 1e-3 pretraining
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 1024
    pack: bool = False
    seed: int = 0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # None: 2 * rank
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(lora.TARGETS)
    merge: bool = True
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    clip: float = 1.0
    grad_checkpointing: bool = False
    save_every: int = 50  # steps between checkpoints (0: only the final one)
    keep: int = 2  # checkpoints kept (at least 1: --resume needs one)
    resume: bool = False
    on_bad_sample: str = "error"
    holdout: float = 0.05  # pretrain: the fraction of blocks kept out of training, scored at the end
    device: str | None = None
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    bf16: bool | None = None  # autocast to bf16; None: where the CPU or GPU computes it natively
    progress: bool = True

    def check(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_len": self.max_len}
        for name, value in positive.items():
            if value < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and not self.epochs > 0:
            raise OptionError("--steps must be at least 1 and --epochs positive")
        if self.task not in ("sft", "pretrain"):
            raise OptionError(f"unknown task {self.task!r}; choose sft or pretrain")
        if self.on_bad_sample not in ("error", "skip"):
            raise OptionError(f"--on-bad-sample takes error or skip, not {self.on_bad_sample!r}")
        if self.lora_rank and self.task == "pretrain":
            raise OptionError("LoRA needs a trained base: pretraining trains every weight, drop --lora-rank")
        if self.parallel not in ("ddp", "fsdp"):
            raise OptionError(f"unknown --parallel {self.parallel!r}; choose ddp or fsdp")
        if self.parallel == "fsdp" and (self.lora_rank or self.resume):
            raise OptionError("--parallel fsdp trains every weight from the start: for LoRA or --resume use ddp")
        if self.lr is not None and not 0 < self.lr < 1:
            raise OptionError(f"--lr must be in (0, 1), got {self.lr}")
        checkpoint.check_options(self.save_every, self.keep)

    @property
    def learning_rate(self) -> float:
        return self.lr or (1e-3 if self.task == "pretrain" else 2e-4 if self.lora_rank else 2e-5)


# -- the loss --------------------------------------------------------------------------------
def initialize(model: Transformer, std: float = 0.02) -> Transformer:
    """Fresh weights for pretraining, as the Qwen2 configs' initializer_range says: normal(0, std)
    matrices and embedding, zero biases, unit norms (torch's defaults give the tied 152k-row
    embedding logits so large that the first losses are in the tens)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
    return model


def enable_gradient_checkpointing(model: Transformer) -> None:
    """Recompute each block in the backward pass instead of keeping its activations."""
    for block in model.model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def apply_gradients(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, clip: float) -> tuple[float, float]:
    """Clip the gradients (clip <= 0: measure only), step the optimizer and the schedule, clear the
    gradients. Returns the gradient norm before clipping and the learning rate the step used."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), lr


# -- the run ---------------------------------------------------------------------------------
class LossModule(torch.nn.Module):
    """The training loss as a module's forward, so DDP's and FSDP2's hooks run around it."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, segments, targets, weights) -> torch.Tensor:
        # the MoE balance term regularises training only: held-out perplexity (eval mode) is pure NLL
        return loss_sum(self.model, Batch(tokens, positions, segments, targets, weights), balance=self.model.training)


class Trainer:
    def __init__(self, config: TrainConfig):
        config.check()
        self.config, self.out = config, Path(config.out)
        self.rank, self.world = distributed.world()
        self.lead = self.rank == 0
        self.device = torch.device(config.device) if config.device else distributed.local_device()
        native = self.device.type == "cuda" or cpu_has_native_bf16()
        self.autocast = native if config.bf16 is None else config.bf16
        self.data = data_path(config.data)
        if not self.data.exists():  # before the model loads, which may take minutes
            raise DataError(f"no such data file or folder: {config.data} (or name a demo set: {', '.join(DEMO)})")
        if config.resume:
            checkpoint.require(self.out)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.heldout: list[Sample] = []
        self.model, self.tokenizer = self._build_model()
        self.samples = self._read_data()
        self.rows_per_step = config.batch_size * config.grad_accum * self.world
        self.loss = LossModule(self.model)
        if self.world > 1:
            from qwen2.distributed.data_parallel import wrap

            self.loss = wrap(self.loss, self.model.model.layers, config.parallel, self.autocast)
        # the rows of epoch self.epoch, made when an epoch starts (epoch 0 now, to count them)
        self._rows: list[Row] | None = make_rows(self.samples, config.max_len, config.pack, config.seed, 0)
        self.total_steps = config.steps or max(1, math.ceil((config.epochs or 1) * len(self._rows)
                                                            / self.rows_per_step))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = max(1, round(config.warmup * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(cosine_schedule, total=self.total_steps, warmup=warmup))
        self.step, self.epoch, self.row = 0, 0, 0

    def _build_model(self) -> tuple[Transformer, Tokenizer]:
        from qwen2.loading import load_model
        from qwen2.weights import load_tokenizer

        c = self.config
        if c.task == "pretrain":
            tokenizer = load_tokenizer(c.tokenizer)
            model = initialize(Transformer(Qwen2Config.from_preset(c.preset or "Qwen2-Tiny"))).to(self.device)
        else:
            model, tokenizer = load_model(c.model, quant="none", dtype="float32", device=str(self.device))
        if c.lora_rank:
            targets = tuple(t.strip() for t in c.lora_targets.split(",") if t.strip())
            lora.add_lora(model, c.lora_rank, c.lora_alpha or 2 * c.lora_rank, c.lora_dropout, targets)
        if c.grad_checkpointing:
            enable_gradient_checkpointing(model)
        return model.train(), tokenizer

    def _read_data(self) -> list[Sample]:
        c = self.config
        if c.task == "pretrain":
            blocks = load_corpus(self.data, self.tokenizer, c.max_len)
            cut = len(blocks) - int(len(blocks) * c.holdout) if len(blocks) > 1 else len(blocks)
            self.heldout = blocks[cut:]
            return blocks[:cut]
        samples, report = load_chat(self.data, self.tokenizer, c.max_len, c.on_bad_sample)
        if report.bad and self.lead:
            print(f"data: {report.summary()}", file=sys.stderr)
        return samples

    def _next_rows(self) -> list[Row]:
        """The next rows in this run's order, crossing into the next epoch where needed."""
        c, rows = self.config, []
        while len(rows) < self.rows_per_step:
            if self._rows is None:
                self._rows = make_rows(self.samples, c.max_len, c.pack, c.seed, self.epoch)
            take = self._rows[self.row: self.row + self.rows_per_step - len(rows)]
            rows += take
            self.row += len(take)
            if self.row >= len(self._rows):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
        return rows

    def backward(self, rows: list[Row]) -> tuple[float, int]:
        """Accumulate the gradient of the step's mean loss over `rows` (this process's share of
        them under torchrun), micro-batch by micro-batch; returns (that loss, its target tokens)."""
        c = self.config
        pad = self.tokenizer.pad_token_id or 0
        mine = rows[self.rank:: self.world]
        batches = [collate(mine[i: i + c.batch_size], pad) for i in range(0, len(mine), c.batch_size)]
        count = int(distributed.all_sum(sum(b.target_tokens for b in batches)))
        total = 0.0
        for batch in batches:
            tensors = (t.to(self.device) for t in dataclasses.astuple(batch))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss(*tensors) / max(1, count)
            (loss * self.world).backward()  # DDP and FSDP2 average the gradients; the step needs their sum
            total += loss.item()
        return distributed.all_sum(total), count

    def train_step(self) -> dict:
        rows = self._next_rows()
        loss, count = self.backward(rows)
        norm, lr = apply_gradients(self.params, self.optimizer, self.scheduler, self.config.clip)
        self.step += 1
        return {"step": self.step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 4),
                "target_tokens": count, "tokens": sum(len(r) for r in rows)}

    def train(self) -> dict:
        """Run to the last step (from the last checkpoint with `resume`); returns the final metrics."""
        if self.config.resume:
            self._resume()
        metrics_file = self.out / "metrics.jsonl"
        if self.lead:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.out / "train_config.json",
                                  json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
            checkpoint.keep_metrics(metrics_file, self.step)
        start, last = time.perf_counter(), {}
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training",
                   disable=not (self.config.progress and self.lead))
        with open(metrics_file if self.lead else os.devnull, "a") as log:
            while self.step < self.total_steps:
                tick = time.perf_counter()
                last = self.train_step()
                seconds = time.perf_counter() - tick
                last |= {"tokens_per_s": round(last["tokens"] / seconds, 1), "seconds": round(seconds, 3),
                         "elapsed": round(time.perf_counter() - start, 1), "rss_mib": round(peak_rss_mib())}
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                mem=f"{last['rss_mib']}M")
                bar.update(1)
                if self.config.save_every and self.step % self.config.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        bar.close()
        if self.heldout:
            last["heldout_ppl"] = round(self.heldout_perplexity(), 3)
        self.save_checkpoint()
        self.save_final()
        if self.lead:
            plot_losses(metrics_file, self.out / "loss.png")
        return last

    @torch.no_grad()
    def heldout_perplexity(self) -> float:
        """exp(mean next-token loss) over the held-out blocks."""
        self.model.eval()
        nll, count = 0.0, 0
        rows = [Row([s]) for s in self.heldout]
        for i in range(0, len(rows), self.config.batch_size):
            batch = collate(rows[i: i + self.config.batch_size], self.tokenizer.pad_token_id or 0)
            nll += self.loss(*(t.to(self.device) for t in dataclasses.astuple(batch))).item()
            count += batch.target_tokens
        self.model.train()
        return math.exp(nll / max(1, count))

    # -- checkpoints (checkpoint.py) ------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        folder = self.out / "checkpoints" / f"step-{self.step}"
        weights = self._weights()  # every process takes part in gathering sharded weights
        if self.lead:
            sharded = self.config.parallel == "fsdp" and self.world > 1  # its optimizer state is not whole here
            state = checkpoint.training_state(self.step, {"epoch": self.epoch, "row": self.row},
                                              None if sharded else self.optimizer, self.scheduler)
            checkpoint.save(self.out, state, lambda folder: checkpoint.write_weights(
                folder, self.model, self.tokenizer, bool(self.config.lora_rank), self.config.model or "", weights),
                self.config.keep)
        distributed.barrier()
        return folder

    def _weights(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict for a full-weight save (gathered from the shards under FSDP2)."""
        if self.config.lora_rank:
            return None
        if self.world > 1 and self.config.parallel == "fsdp":
            from qwen2.distributed.data_parallel import full_state_dict

            return full_state_dict(self.model)
        return self.model.state_dict()

    def _resume(self) -> None:
        folder = max(checkpoint.folders(self.out), key=checkpoint.step_of)  # __init__ checked there is one
        state = checkpoint.read_state(folder, ("epoch", "row"))  # first: a refused file leaves the model as it was
        weights = checkpoint.read_weights(folder, bool(self.config.lora_rank))
        checkpoint.restore(state, self.model, weights, folder, self.optimizer, self.scheduler, self.total_steps,
                           say=self.lead)
        self.step, self.epoch, self.row = state["step"], state["epoch"], state["row"]
        self._rows = None  # remade for the epoch resumed in

    def save_final(self) -> None:
        """The output folder: an HF checkpoint (merged for LoRA unless merge=False) and the adapter."""
        weights = self._weights()
        if not self.lead:
            return
        if self.config.lora_rank:
            lora.save_adapter(self.model, self.out / "adapter", self.config.model or "")
            if not self.config.merge:
                return
            weights = lora.merge_lora(self.model).state_dict()
        export_hf(self.model.config, weights, self.tokenizer, self.out)


def plot_losses(metrics: Path, png: Path) -> bool:
    """The loss curve as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True
