"""A reward model: the Qwen2 body with a scalar head, trained on preference pairs.

The score of a sequence is score(norm(h)) at its last real token, found from the sequence's
length, never by looking for a pad or end token (Qwen's pad and end tokens coincide, so the
first one may be a real token of the reply). Batches may be right- or left-padded: left pads form
a segment of their own that real tokens cannot attend to, and real tokens keep positions 0..n-1.

Loss (Bradley-Terry): -log sigmoid(r_chosen - r_rejected - margin), the margin from the pair's
record (0 by default, as in Llama 2), plus center * mean((r_chosen + r_rejected)^2), which keeps
the scores near zero (Eisenstein et al., 2023).

The head starts at zero, so every pair first ties and the first loss is exactly ln 2: a head drawn
at random scores the body's large final-norm features by whole units (a first loss near 3 on the
default model), and training spent its steps undoing that noise. It learns at --head-lr-scale
times the body's rate: it is the only part that starts with nothing, and with LoRA the adapters
get no gradient until it moves. Held-out accuracy comes with its Wilson 95% interval.

Saved as transformers' Qwen2ForSequenceClassification (config architectures and num_labels = 1,
tensors `model.*` and `score.weight`), so `AutoModelForSequenceClassification.from_pretrained`
gives the same scores. The config says tie_word_embeddings: a classifier has no output head,
and this way no lm_head is expected by either loader.

`RewardTask` trains it through the trainer (trainer.py): under torchrun each process scores its
share of a step's pairs (DDP or FSDP2), and the loss is the mean over all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qwen2.eval.stats import wilson
from qwen2.files import write_text_atomically
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer
from qwen2.train import lora
from qwen2.train.config import TrainConfig
from qwen2.train.data import DataReport
from qwen2.train.preference import Pair, heldout_group, load_pairs
from qwen2.train.trainer import Task, expert_share, load_float, summed

HEAD = "score.safetensors"  # a LoRA checkpoint's head, beside the adapter


class RewardModel(nn.Module):
    def __init__(self, transformer: Transformer, std: float = 0.0):
        super().__init__()
        self.transformer = transformer
        weight = transformer.model.embed_tokens.weight
        self.score = nn.Linear(transformer.config.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.score.weight, std=std) if std else nn.init.zeros_(self.score.weight)

    @property
    def config(self):
        return self.transformer.config

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor,
                last: torch.Tensor) -> torch.Tensor:
        """Scores (B,) read at index `last` (B,) of each row."""
        t = self.transformer
        hidden = t.body(tokens, positions, segments=segments)
        picked = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, H)
        return self.score(t.model.norm(picked)).squeeze(-1).float()

    def hf_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The HF classifier's tensors (model.* and score.weight) of `state`, this model's state dict
        (None: its own)."""
        state = self.state_dict() if state is None else state
        return {k.removeprefix("transformer."): v for k, v in state.items()
                if k.startswith("transformer.model.") or k == "score.weight"}


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, ...]:
    """(tokens, positions, segments, last) of sequences padded on the right or the left."""
    width = max(map(len, sequences))
    shape = (len(sequences), width)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    last = torch.empty(len(sequences), dtype=torch.long)
    for b, ids in enumerate(sequences):
        n = len(ids)
        start = width - n if left else 0
        tokens[b, start: start + n] = torch.tensor(ids)
        positions[b, start: start + n] = torch.arange(n)
        if not left:  # right pads continue the positions, so the causal rule hides them
            positions[b, n:] = torch.arange(n, width)
        segments[b, start: start + n] = 0
        last[b] = start + n - 1
    return tokens, positions, segments, last


def score(model: RewardModel, sequences: list[list[int]], pad_id: int, left: bool = False) -> torch.Tensor:
    device = model.score.weight.device
    return model(*(t.to(device) for t in pad_batch(sequences, pad_id, left)))


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                  center: float = 0.0) -> torch.Tensor:
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    return loss + center * ((chosen + rejected) ** 2).mean() if center else loss


def save_hf(model: RewardModel, tokenizer: Tokenizer, folder: str | Path,
            weights: dict[str, torch.Tensor] | None = None) -> None:
    """The reward model as an HF Qwen2ForSequenceClassification folder (`weights`: its state dict
    where the caller has it, e.g. gathered from shards)."""
    from qwen2.weights.export import export_hf

    pad = tokenizer.pad_token_id
    export_hf(model.config, model.hf_state_dict(weights), tokenizer, folder)
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config |= {"architectures": ["Qwen2ForSequenceClassification"], "num_labels": 1,
               "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "tie_word_embeddings": True,
               "pad_token_id": pad if pad is not None else config.get("eos_token_id")}
    write_text_atomically(path, json.dumps(config, indent=2) + "\n")


def load_reward_model(folder: str | Path, device: torch.device | str = "cpu") -> tuple[RewardModel, Tokenizer]:
    """A reward model from the folder save_hf (or transformers) wrote."""
    from qwen2.errors import WeightsError
    from qwen2.weights.hf import load_hf

    folder = Path(folder)
    config, state = load_hf(folder, dtype=torch.float32)
    head = state.pop("score.weight", None)
    if head is None or head.shape[0] != 1:
        raise WeightsError(f"{folder} is not a reward model (no score.weight of one row); train one with "
                           "`qwen2 train rm`")
    model = RewardModel(Transformer.from_state_dict(config, state, device=device))
    with torch.no_grad():
        model.score.weight.copy_(head)
    return model.eval(), Tokenizer.from_files(folder)


class RewardTask(Task):
    new_modules = ("score",)  # the head starts at zero: with LoRA it trains beside the adapters

    @classmethod
    def build_model(cls, config: TrainConfig, device: torch.device) -> tuple[nn.Module, Tokenizer]:
        transformer, tokenizer = load_float(config.model.name, device, expert_share(config))
        if not transformer.config.tie_word_embeddings:  # scores replace the LM head: it is neither trained nor saved
            transformer.lm_head.requires_grad_(False)
        torch.manual_seed(config.seed)
        return RewardModel(transformer), tokenizer

    group = staticmethod(heldout_group)  # pairs of one prompt (or group) are held out together

    def read_data(self) -> tuple[list, DataReport]:
        d = self.config.data
        return load_pairs(self.trainer.data, self.tokenizer, d.max_len, d.on_bad_sample, d.max_prompt_len)

    def param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        head = [p for p in self.model.score.parameters() if p.requires_grad]
        body = [p for p in params if all(p is not h for h in head)]
        return [{"params": body}, {"params": head, "lr": self.config.learning_rate * self.config.rm.head_lr_scale}]

    def scores(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        r = score(self.model, sequences, self.pad)
        return r[: len(pairs)], r[len(pairs):]

    def loss(self, pairs: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.scores(pairs)
        margin = torch.tensor([p.margin for p in pairs], device=chosen.device)
        loss = bradley_terry(chosen, rejected, margin, self.config.rm.center)
        return summed(loss, {"accuracy": (chosen > rejected).float().mean().item(),
                             "reward_margin": (chosen - rejected).mean().item(),
                             "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item()},
                      len(pairs))

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (chosen scored above rejected, ties half), its interval, mean margin and loss."""
        chosen, rejected = [], []
        for i in range(0, len(self.heldout), 2 * self.config.data.batch_size):
            c, r = self.scores(self.heldout[i: i + 2 * self.config.data.batch_size])
            chosen.append(c)
            rejected.append(r)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        right = float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())  # a tie is a coin toss
        low, high = wilson(right, len(chosen))
        return {"accuracy": right / len(chosen), "accuracy_low": low, "accuracy_high": high,
                "margin": (chosen - rejected).mean().item(), "loss": bradley_terry(chosen, rejected).item()}

    def save(self, out: Path, weights: dict[str, torch.Tensor]) -> None:
        if self.config.lora.rank:  # the adapters merged into the body
            weights = lora.merged_state_dict(self.model, weights)
        save_hf(self.model, self.tokenizer, out, weights)

    def write_weights(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        """A checkpoint: the reward model as save_hf writes it, or with LoRA the adapter and the head."""
        if not self.config.lora.rank:
            save_hf(self.model, self.tokenizer, folder, weights)
            return
        lora.save_adapter(self.model, folder, self.config.model.name or "", weights)
        save_file({"score.weight": weights["score.weight"].detach().contiguous()}, folder / HEAD)

    def read_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        if self.config.lora.rank:
            return super().read_weights(folder) | load_file(folder / HEAD)
        from qwen2.weights.hf import load_hf

        state = load_hf(folder, dtype=torch.float32)[1]  # HF names: model.* and score.weight
        return {k if k == "score.weight" else f"transformer.{k}": v for k, v in state.items()}
