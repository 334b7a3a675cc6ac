"""One config for every training task (sft, pretrain, rm, dpo, online-dpo), in sections as
torchtitan's `Trainer.Config` is: the run's own fields (task, out, steps, ...), then model, lora,
optim, data, checkpoint, parallel, and the preference tasks' own sections dpo, rm and online.

The command line and TOML files (`--config FILE`, the recipe's stage tables) speak in flat keys,
the options' names with underscores (`lora_rank = 8`); FLAT maps each to its place, and
`TrainConfig.from_flat` and `flat()` are the only translation between the two, so
train_config.json holds the flat keys a `--config` file takes. Every command takes every key (a key
of another task's section is read by nobody, as it always was); an unknown key is one OptionError
naming it.

A field that is None where the comment says "the task's" takes its task's default when the config
is made (TASK_DEFAULTS): language modelling reads rows of up to 1024 tokens four at a time,
preference training pairs of up to 512 two at a time.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from qwen2.errors import OptionError
from qwen2.train.checkpoint import check_options
from qwen2.train.lora import TARGETS
from qwen2.train.merging_optimizer import METHODS

TASKS = ("sft", "pretrain", "rm", "dpo", "online-dpo")
LOSSES = ("sigmoid", "ipo", "robust")
OPTIMIZERS = ("adamw", *METHODS)
SAMPLE_QUANTS = ("auto", "none", "q8_0")
LANGUAGE = dict(batch_size=4, max_len=1024, warmup=0.05)
PREFERENCE = dict(batch_size=2, max_len=512, warmup=0.1, heldout=0.1)
TASK_DEFAULTS = {"sft": LANGUAGE | dict(heldout=0.0), "pretrain": LANGUAGE | dict(heldout=0.05),
                 "rm": PREFERENCE, "dpo": PREFERENCE, "online-dpo": PREFERENCE}


@dataclass
class ModelConfig:
    name: str | None = None  # the model to train (None: the default model); pretrain: unused
    preset: str | None = None  # pretrain: the config to start from (None: Qwen2-Tiny)
    tokenizer: str | None = None  # pretrain: whose tokenizer (None: the default model's)
    grad_checkpointing: bool = False


@dataclass
class LoraConfig:
    rank: int = 0  # 0: every weight trains
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.0
    targets: str = ",".join(TARGETS)
    merge: bool = True  # write the merged model beside the adapter


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float | None = None  # None: the task's, see TrainConfig.learning_rate
    warmup: float | None = None  # fraction of the steps; None: the task's
    weight_decay: float = 0.0
    clip: float = 1.0
    reserve_rate: float = 0.01  # ondare, onties
    merge_alpha: float = 1e-7
    merge_every: int = 1
    base: str | None = None  # ondare, onties: tau = model - base (None: no SFT delta to merge)


@dataclass
class DataConfig:
    path: str = ""  # a file, a folder (pretrain) or a demo set's name
    batch_size: int | None = None  # rows, pairs or prompts per micro-batch and process; None: the task's
    grad_accum: int = 1
    max_len: int | None = None  # None: the task's
    max_prompt_len: int | None = None  # preference: longer prompts are bad samples
    pack: bool = False  # sft, pretrain
    heldout: float | None = None  # fraction held out for evaluation; None: the task's
    on_bad_sample: str = "error"


@dataclass
class CheckpointConfig:
    save_every: int = 50  # steps between checkpoints (0: only the final one)
    keep: int = 2  # checkpoints kept (at least 1: resume needs one)
    resume: bool = False


@dataclass
class ParallelConfig:
    mode: str = "ddp"  # under torchrun or Ray: "ddp" or "fsdp"
    device: str | None = None  # None: this process's GPU, else the CPU
    bf16: bool | None = None  # autocast to bf16; None: where the CPU or GPU computes it natively


@dataclass
class DPOConfig:
    ref: str | None = None  # None: the policy's starting weights (LoRA off, or a frozen copy)
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float | None = None  # None: 0.1 for robust, else 0
    precompute_ref: bool = True  # reference log-probs computed once before training, cached in out/

    @property
    def smoothing(self) -> float:
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 0.1 if self.loss == "robust" else 0.0


@dataclass
class RewardConfig:
    center: float = 0.0  # weight of mean((r_chosen + r_rejected)^2)
    head_lr_scale: float = 10.0  # the new head's learning rate over the body's


@dataclass
class OnlineConfig:
    reward_model: str | None = None  # the scorer (an HF folder `qwen2 train rm` wrote)
    reward: str | None = None  # "model" (reward_model) or "verifier"; None: model if one is given
    samples: int = 4  # responses per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    no_end_penalty: float = 1.0  # subtracted from the reward of a response cut by max_new_tokens
    sample_quant: str = "auto"  # what samples: none (the live model) or q8_0 (a copy each step); auto: q8_0 on CPU

    @property
    def source(self) -> str | None:
        return self.reward or ("model" if self.reward_model else None)


@dataclass
class TrainConfig:
    task: str = "sft"
    out: str = ""
    steps: int | None = None
    epochs: float | None = None  # neither: one epoch
    seed: int = 0
    eval_every: int = 0  # steps between held-out evaluations (0: only before and after)
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self) -> None:
        for key, value in TASK_DEFAULTS.get(self.task, {}).items():
            section, name = FLAT[key]
            if getattr(getattr(self, section), name) is None:
                setattr(getattr(self, section), name, value)

    @classmethod
    def from_flat(cls, values: dict, where: str = "the training settings") -> TrainConfig:
        """The config the flat keys set (the rest at their defaults); an unknown key is an OptionError."""
        if unknown := set(values) - set(FLAT):
            raise OptionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; the keys are the options' "
                              f"names with underscores: {', '.join(sorted(FLAT))}")
        sections: dict[str, dict] = {}
        for key, value in values.items():
            section, name = FLAT[key]
            sections.setdefault(section, {})[name] = value
        top = sections.pop("", {})
        hints = typing.get_type_hints(cls)
        return cls(**top, **{name: hints[name](**fields) for name, fields in sections.items()})

    def flat(self) -> dict:
        """Every setting under its flat key (as train_config.json records them)."""
        return {key: getattr(getattr(self, section) if section else self, name)
                for key, (section, name) in FLAT.items() if key not in ALIASES}

    @property
    def learning_rate(self) -> float:
        if self.optim.lr:
            return self.optim.lr
        adapter = bool(self.lora.rank)
        if self.task == "pretrain":
            return 1e-3
        if self.task == "sft":
            return 2e-4 if adapter else 2e-5
        if self.task == "rm":
            return 1e-4 if adapter else 1e-5
        return 5e-5 if adapter else 1e-6

    def check(self) -> None:
        """Every mistake an option can make, as one OptionError naming the option, before anything loads."""
        d, o, m = self.data, self.optim, self.online
        if self.task not in TASKS:
            raise OptionError(f"unknown task {self.task!r}; choose {', '.join(TASKS)}")
        counts = {"batch_size": d.batch_size, "grad_accum": d.grad_accum, "max_len": d.max_len,
                  "max_prompt_len": d.max_prompt_len, "samples": m.samples, "max_new_tokens": m.max_new_tokens,
                  "merge_every": o.merge_every}
        for name, value in counts.items():
            if value is not None and value < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and not self.epochs > 0:
            raise OptionError("--steps must be at least 1 and --epochs positive")
        if d.on_bad_sample not in ("error", "skip"):
            raise OptionError(f"--on-bad-sample takes error or skip, not {d.on_bad_sample!r}")
        if o.lr is not None and not 0 < o.lr < 1:
            raise OptionError(f"--lr must be in (0, 1), got {o.lr}")
        if not 0 <= d.heldout < 1:
            raise OptionError(f"--heldout must be in [0, 1), got {d.heldout}")
        if self.eval_every < 0:
            raise OptionError(f"--eval-every must be 0 (only before and after) or more, got {self.eval_every}")
        check_options(self.checkpoint.save_every, self.checkpoint.keep)
        if self.lora.rank and self.task == "pretrain":
            raise OptionError("LoRA needs a trained base: pretraining trains every weight, drop --lora-rank")
        if self.parallel.mode not in ("ddp", "fsdp", "ep"):
            raise OptionError(f"unknown --parallel {self.parallel.mode!r}; choose ddp, fsdp or ep")
        if self.parallel.mode == "ep" and self.task == "online-dpo":
            raise OptionError("--parallel ep cannot run online DPO: each process samples replies of its own "
                              "lengths, and the experts' exchanges must pair up; use --parallel ddp or fsdp")
        if self.parallel.mode == "ep" and self.optim.name != "adamw":
            raise OptionError(f"--optimizer {self.optim.name} keys its masks by a parameter's place, which differs "
                              "between processes under --parallel ep; use --optimizer adamw, or --parallel ddp or fsdp")
        self._check_optimizer()
        self._check_preference()

    def _check_optimizer(self) -> None:
        o = self.optim
        if o.name not in OPTIMIZERS:
            raise OptionError(f"unknown --optimizer {o.name!r}; choose {', '.join(OPTIMIZERS)}")
        if o.base and self.lora.rank:
            raise OptionError("--base sets tau for full fine-tuning; a LoRA adapter has no SFT delta to merge "
                              "(drop --base: the merging optimizers then sparsify the adapter's updates alone)")
        if o.base and o.name == "adamw":
            raise OptionError("--base is for --optimizer ondare or onties")

    def _check_preference(self) -> None:
        dpo, online = self.dpo, self.online
        if dpo.loss not in LOSSES:
            raise OptionError(f"unknown --loss {dpo.loss!r}; choose {', '.join(LOSSES)}")
        if not dpo.beta > 0:
            raise OptionError(f"--beta must be positive, got {dpo.beta}")
        if not 0 <= dpo.smoothing < 0.5:
            raise OptionError(f"--label-smoothing must be in [0, 0.5), got {dpo.smoothing}")
        if not self.rm.head_lr_scale > 0:
            raise OptionError(f"--head-lr-scale must be positive, got {self.rm.head_lr_scale}")
        if self.task != "online-dpo":
            return
        if online.source not in ("model", "verifier"):
            raise OptionError("online-dpo needs --reward-model (a folder written by `qwen2 train rm`) or "
                              "--reward verifier (prompts with an 'answer' or 'constraints' to check)")
        if online.source == "model" and not online.reward_model:
            raise OptionError("--reward model needs --reward-model (a folder written by `qwen2 train rm`)")
        if online.sample_quant not in SAMPLE_QUANTS:
            raise OptionError(f"unknown --sample-quant {online.sample_quant!r}; choose {', '.join(SAMPLE_QUANTS)}")
        if online.source == "verifier" and online.reward_model:
            raise OptionError("--reward verifier checks replies itself; drop --reward-model")


# flat key (the option's name with underscores) -> (section, field); "" is the run's own level
FLAT = {
    "task": ("", "task"), "out": ("", "out"), "steps": ("", "steps"), "epochs": ("", "epochs"),
    "seed": ("", "seed"), "eval_every": ("", "eval_every"), "progress": ("", "progress"),
    "model": ("model", "name"), "preset": ("model", "preset"), "tokenizer": ("model", "tokenizer"),
    "grad_checkpointing": ("model", "grad_checkpointing"),
    "lora_rank": ("lora", "rank"), "lora_alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "lora_targets": ("lora", "targets"), "merge": ("lora", "merge"),
    "optimizer": ("optim", "name"), "lr": ("optim", "lr"), "warmup": ("optim", "warmup"),
    "weight_decay": ("optim", "weight_decay"), "clip": ("optim", "clip"), "reserve_rate": ("optim", "reserve_rate"),
    "merge_alpha": ("optim", "merge_alpha"), "merge_every": ("optim", "merge_every"), "base": ("optim", "base"),
    "data": ("data", "path"), "batch_size": ("data", "batch_size"), "grad_accum": ("data", "grad_accum"),
    "max_len": ("data", "max_len"), "max_prompt_len": ("data", "max_prompt_len"), "pack": ("data", "pack"),
    "heldout": ("data", "heldout"), "holdout": ("data", "heldout"), "on_bad_sample": ("data", "on_bad_sample"),
    "save_every": ("checkpoint", "save_every"), "keep": ("checkpoint", "keep"), "resume": ("checkpoint", "resume"),
    "parallel": ("parallel", "mode"), "device": ("parallel", "device"), "bf16": ("parallel", "bf16"),
    "ref": ("dpo", "ref"), "beta": ("dpo", "beta"), "loss": ("dpo", "loss"),
    "label_smoothing": ("dpo", "label_smoothing"), "precompute_ref": ("dpo", "precompute_ref"),
    "center": ("rm", "center"), "head_lr_scale": ("rm", "head_lr_scale"),
    "reward_model": ("online", "reward_model"), "reward": ("online", "reward"), "samples": ("online", "samples"),
    "max_new_tokens": ("online", "max_new_tokens"), "temperature": ("online", "temperature"),
    "no_end_penalty": ("online", "no_end_penalty"), "sample_quant": ("online", "sample_quant"),
}
ALIASES = ("holdout",)  # pretrain's earlier name for heldout, still read


def flat_types() -> dict[str, object]:
    """Each flat key's type, as its field declares it (the recipe checks its tables' values by these)."""
    hints = typing.get_type_hints(TrainConfig)
    return {key: typing.get_type_hints(hints[section])[name] if section else hints[name]
            for key, (section, name) in FLAT.items()}
