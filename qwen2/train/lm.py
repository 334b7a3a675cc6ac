"""Language modelling as the trainer's tasks: supervised fine-tuning on chat data (`SFTTask`, full
or LoRA) and pretraining from scratch on raw text (`PretrainTask`).

The loss of a micro-batch is sum(weight * nll) over its target tokens and the step's mean is over
the target tokens of all its rows, so packing and gradient accumulation leave it unchanged. The
logits of the 152k vocabulary are never held whole: the loss and its gradients are computed
together over chunks of the rows that have a target (loss.py). An MoE model's training loss adds
router_aux_loss_coef times the router load-balancing loss of each micro-batch, as transformers'
Qwen2-MoE adds it; held-out metrics leave it out.

Rows are the samples in a seeded order per epoch, packed with --pack (data.py). Held out
(--heldout; pretraining's default 0.05 of the blocks, SFT's none): eval_loss and eval_ppl, the
mean next-token loss and its exponential. Output: the model as an HF checkpoint, loss.png.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qwen2.config import Qwen2Config
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer
from qwen2.train.config import TrainConfig
from qwen2.train.data import Batch, DataReport, Row, collate, load_chat, load_corpus, make_rows
from qwen2.train.loss import loss_sum
from qwen2.train.trainer import Task


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


def next_token_loss(model: Transformer, batch: Batch) -> torch.Tensor:
    """The batch's loss sum; the MoE balance term regularises training only (eval mode: pure NLL)."""
    return loss_sum(model, batch, balance=model.training)


def target_count(rows: list[Row]) -> int:
    """The tokens these rows predict (collate's targets that are not IGNORE)."""
    return sum(w > 0 for row in rows for sample in row.samples for w in sample.weights[1:])


class SFTTask(Task):
    plot = "loss.png"

    def read_data(self) -> tuple[list, DataReport]:
        c = self.config.data
        return load_chat(self.trainer.data, self.tokenizer, c.max_len, c.on_bad_sample)

    def epoch(self, number: int) -> list[Row]:
        c = self.config
        return make_rows(self.train_data, c.data.max_len, c.data.pack, c.seed, number)

    def units(self, rows: list[Row]) -> int:
        return target_count(rows)

    def _batch(self, rows: list[Row]) -> Batch:
        return Batch(*(t.to(self.device) for t in dataclasses.astuple(collate(rows, self.pad))))

    def loss(self, rows: list[Row]) -> tuple[torch.Tensor, dict[str, float]]:
        return next_token_loss(self.model, self._batch(rows)), {}

    def step_metrics(self, rows: list[Row], units: int) -> dict:
        return {"target_tokens": units, "tokens": sum(len(r) for r in rows)}

    def evaluate(self) -> dict[str, float]:
        rows, size = [Row([s]) for s in self.heldout], self.config.data.batch_size
        nll = sum(next_token_loss(self.model, self._batch(rows[i: i + size])).item()
                  for i in range(0, len(rows), size))
        mean = nll / max(1, target_count(rows))
        return {"loss": mean, "ppl": math.exp(mean)}


class PretrainTask(SFTTask):
    @classmethod
    def build_model(cls, config: TrainConfig, device: torch.device) -> tuple[Transformer, Tokenizer]:
        from qwen2.weights import load_tokenizer

        model = initialize(Transformer(Qwen2Config.from_preset(config.model.preset or "Qwen2-Tiny")))
        return model.to(device), load_tokenizer(config.model.tokenizer)

    def read_data(self) -> tuple[list, DataReport]:
        blocks = load_corpus(self.trainer.data, self.tokenizer, self.config.data.max_len)
        return blocks, DataReport(kept=len(blocks))
