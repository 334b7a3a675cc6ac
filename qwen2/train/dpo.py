"""Direct preference optimization (Rafailov et al., 2023) on a fixed set of preference pairs.

With h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) over the reply
tokens (prompt tokens are given, not scored):
    sigmoid: -log sigmoid(beta h) (1 - e) - log sigmoid(-beta h) e   (e = --label-smoothing, cDPO)
    robust:  (-log sigmoid(beta h) (1 - e) + log sigmoid(-beta h) e) / (1 - 2e)   (Chowdhury et al., 2024)
    ipo:     (h - 1 / (2 beta))^2, each log-probability divided by its reply's length (Azar et al., 2023)
Implicit rewards beta (log pi - log pi_ref) of whole replies (for ipo too); metrics per step:
loss, reward_margin (chosen minus rejected reward), reward_accuracy (chosen reward higher),
chosen_logp, rejected_logp (policy, per sequence) and kl: the mean of log pi - log pi_ref over the
step's replies (a KL estimate only where the replies are sampled from the policy, as in online
DPO; on fixed data it is the drift of the log-ratio).

The reference: --ref MODEL (a frozen model of the same tokenizer), else the policy's starting
weights: the model with its LoRA adapters switched off, or a frozen copy for full fine-tuning.
By default its log-probabilities are computed once for every pair before training and cached in
the output folder (ref_logps.pt, reused by a later run on the same data and settings).

`DPOTask` is the trainer's task (trainer.py): under torchrun each process takes its share of a
step's pairs (DDP or FSDP2), and the loss is the mean over all of them, as one process computes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2.errors import WeightsError
from qwen2.files import load_plain, write_atomically
from qwen2.train import lora
from qwen2.train.data import DataReport
from qwen2.train.logprobs import sequence_logps
from qwen2.train.preference import Pair, check_tokenizer, heldout_group, load_pairs, pair_batch
from qwen2.train.trainer import Task, Trainer, load_float, summed


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, kind: str = "sigmoid", smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss from the sequence log-probabilities (length-normalised ones for ipo)."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h) * (1 - smoothing) - F.logsigmoid(-beta * h) * smoothing
    if kind == "robust":
        return (-F.logsigmoid(beta * h) * (1 - smoothing) + F.logsigmoid(-beta * h) * smoothing) / (1 - 2 * smoothing)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {kind!r}")


@contextmanager
def lora_off(model: torch.nn.Module):
    """The model as it was before its LoRA adapters (their contribution times zero is exactly zero)."""
    layers = lora.lora_layers(model).values()
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


class DPOTask(Task):
    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        c = self.config
        self.ref_model = None
        if c.dpo.ref:
            self.ref_model, ref_tokenizer = load_float(c.dpo.ref, self.device)
            check_tokenizer(self.tokenizer, ref_tokenizer, "--ref", c.dpo.ref)
        elif not c.lora.rank:
            self.ref_model = copy.deepcopy(self.model)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        self.cache: dict[int, tuple[float, float]] | None = None
        if c.dpo.precompute_ref and c.task == "dpo":
            self.cache = self.precompute(self.train_data + self.heldout)
            self.ref_model = None  # every value it gives is cached now: its copy of the weights is free memory

    group = staticmethod(heldout_group)  # pairs of one prompt (or group) are held out together

    def read_data(self) -> tuple[list, DataReport]:
        d = self.config.data
        return load_pairs(self.trainer.data, self.tokenizer, d.max_len, d.on_bad_sample, d.max_prompt_len)

    # -- the reference ---------------------------------------------------------------------------
    @torch.no_grad()
    def reference_live(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probability sums of each pair's (chosen, rejected), computed now."""
        tensors = [t.to(self.device) for t in pair_batch(pairs, self.pad)]
        training = self.model.training
        if self.ref_model is not None:
            sums, _ = sequence_logps(self.ref_model, *tensors[:4])
        elif not self.config.lora.rank:  # the policy itself would be no reference
            raise RuntimeError("the reference copy was released once its log-probabilities were cached")
        else:
            self.model.eval()
            with lora_off(self.model):
                sums, _ = sequence_logps(self.model, *tensors[:4])
            self.model.train(training)
        return sums[: len(pairs)], sums[len(pairs):]

    def reference(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return self.reference_live(pairs)
        values = torch.tensor([self.cache[p.index] for p in pairs], device=self.device)
        return values[:, 0], values[:, 1]

    def precompute(self, pairs: list[Pair]) -> dict[int, tuple[float, float]]:
        """Every pair's reference log-probabilities, from out/ref_logps.pt when it was made for the
        same pairs and reference, else computed now and written there (by process 0 under torchrun;
        every process computes them alike)."""
        c, out = self.config, self.trainer.out
        key = hashlib.sha256(json.dumps([c.dpo.ref, c.model.name, bool(c.lora.rank), self.trainer.autocast,
                                         [(p.index, p.prompt, p.chosen, p.rejected) for p in pairs]]).encode())
        fingerprint, path = key.hexdigest(), out / "ref_logps.pt"
        if path.exists() and (saved := _read_cache(path)) and saved.get("fingerprint") == fingerprint:
            return dict(zip(saved["index"], zip(saved["chosen"], saved["rejected"])))
        cache = {}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.trainer.autocast):
            for i in range(0, len(pairs), 2 * c.data.batch_size):
                part = pairs[i: i + 2 * c.data.batch_size]
                chosen, rejected = self.reference_live(part)
                cache |= {p.index: (a, b) for p, a, b in zip(part, chosen.tolist(), rejected.tolist())}
        if self.trainer.lead:
            out.mkdir(parents=True, exist_ok=True)
            index = sorted(cache)
            saved = {"fingerprint": fingerprint, "index": index, "chosen": [cache[i][0] for i in index],
                     "rejected": [cache[i][1] for i in index]}
            write_atomically(path, lambda tmp: torch.save(saved, tmp))  # a kill mid-write leaves no torn cache
        return cache

    # -- the loss ---------------------------------------------------------------------------------
    def pair_logps(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        tensors = [t.to(self.device) for t in pair_batch(pairs, self.pad)]
        sums, counts = sequence_logps(self.model, *tensors[:4])
        n = len(pairs)
        ref_chosen, ref_rejected = self.reference(pairs)
        return {"chosen": sums[:n], "rejected": sums[n:], "ref_chosen": ref_chosen, "ref_rejected": ref_rejected,
                "chosen_len": counts[:n].float(), "rejected_len": counts[n:].float()}

    def preference_loss(self, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and the metrics, means over the pairs."""
        c = self.config.dpo
        terms = [lp["chosen"], lp["rejected"], lp["ref_chosen"], lp["ref_rejected"]]
        if c.loss == "ipo":
            terms = [t / lp[f"{side}_len"] for t, side in zip(terms, ("chosen", "rejected") * 2)]
        losses = dpo_loss(*terms, c.beta, c.loss, c.smoothing)
        # rewards are sequence-level for every loss (ipo's length normalisation is the loss's alone), as TRL logs them
        chosen_reward = c.beta * (lp["chosen"] - lp["ref_chosen"]).detach()
        rejected_reward = c.beta * (lp["rejected"] - lp["ref_rejected"]).detach()
        kl = torch.cat([lp["chosen"] - lp["ref_chosen"], lp["rejected"] - lp["ref_rejected"]]).detach().mean()
        return losses.mean(), {
            "reward_margin": (chosen_reward - rejected_reward).mean().item(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
            "chosen_logp": lp["chosen"].detach().mean().item(),
            "rejected_logp": lp["rejected"].detach().mean().item(),
            "kl": kl.item(),
        }

    def loss(self, pairs: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        return summed(*self.preference_loss(self.pair_logps(pairs)), len(pairs))

    def evaluate(self) -> dict[str, float]:
        """Held-out preference accuracy (implicit reward of chosen above rejected), margin, loss."""
        totals, n = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, len(self.heldout)
        for i in range(0, n, 2 * self.config.data.batch_size):
            part = self.heldout[i: i + 2 * self.config.data.batch_size]
            loss, m = self.preference_loss(self.pair_logps(part))
            for key, value in (("loss", loss.item()), ("accuracy", m["reward_accuracy"]),
                               ("margin", m["reward_margin"])):
                totals[key] += value * len(part) / n
        return totals


def _read_cache(path: Path) -> dict | None:
    """ref_logps.pt as precompute wrote it, or None (with a warning) when it is unreadable or holds
    anything but plain values: it is only a cache, so it is computed again and replaced."""
    try:
        saved = load_plain(path, "computing the reference log-probabilities again")
    except WeightsError as e:
        print(f"warning: {e}", file=sys.stderr)
        return None
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("index", "chosen", "rejected"))):
        print(f"warning: {path} is not a reference log-probability cache; computing them again", file=sys.stderr)
        return None
    return saved
