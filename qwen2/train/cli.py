"""`qwen2 train ...`: every task through the one trainer (trainer.py), with the config of config.py.

    qwen2 train sft --model M --data FILE --out DIR [--steps N | --epochs E] [--lora-rank R] [--lr X]
        [--batch-size B] [--grad-accum G] [--max-len L] [--pack] [--seed S] [--resume] [--config FILE.toml]
    qwen2 train pretrain --preset NAME --data PATH --out DIR ...
    qwen2 train rm|dpo|online-dpo ...  (preference training: their options are in align_cli.py)
    qwen2 train recipe RECIPE.toml  (SFT -> data -> reward -> DPO / online DPO -> evals, see recipe.py)
    torchrun --nproc-per-node 2 -m qwen2 train sft|pretrain|rm|dpo|online-dpo ... [--parallel ddp|fsdp|ep]
    qwen2 train sft|pretrain|rm|dpo|online-dpo ... --ray local:2|ADDRESS  (the same run on Ray Train, ray_launcher.py)

A TOML config file sets the same keys (underscored: lora_rank = 8); flags given on the
command line override it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from qwen2.errors import OptionError
from qwen2.train import align_cli, ray_launcher, recipe

if TYPE_CHECKING:
    from qwen2.train.config import TrainConfig


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="fine-tune (full or LoRA) or pretrain; HF checkpoints out")
    sub = train.add_subparsers(dest="train_command", required=True)
    p = sub.add_parser("sft", help="supervised fine-tuning on chat data (JSONL/JSON: messages, alpaca, sharegpt)")
    p.add_argument("--model", "-m", help="what to fine-tune, as for every command (default: the embedded "
                   "Qwen2.5-Coder-0.5B-Instruct, dequantized to float)")
    _common(p)
    add_lora_options(p)
    p.add_argument("--on-bad-sample", choices=["error", "skip"], help="a record that cannot be used stops the "
                   "run (error, the default) or is counted and reported (skip)")
    p.set_defaults(func=run, task="sft")

    p = sub.add_parser("pretrain", help="train a model from scratch on raw text")
    p.add_argument("--preset", help="the config to start from (default Qwen2-Tiny; `qwen2 info --preset`)")
    p.add_argument("--tokenizer", help="whose tokenizer, as --model (default: the embedded model's)")
    _common(p)
    p.set_defaults(func=run, task="pretrain")
    align_cli.add_arguments(sub, run)
    recipe.add_arguments(sub)


def _common(p: argparse.ArgumentParser) -> None:
    # no defaults here: a flag left out falls back to the --config file, then to the task's default
    p.add_argument("--data", help="sft: a .jsonl/.json file; pretrain: a .txt/.jsonl file or a folder")
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, loss.png, the model)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 LoRA, 2e-5 full, 1e-3 pretrain)")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-len", type=int, help="tokens per row (default 1024)")
    p.add_argument("--pack", action="store_const", const=True, help="pack several samples into each row")
    p.add_argument("--seed", type=int)
    p.add_argument("--warmup", type=float, help="warm-up as a fraction of the steps (default 0.05)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip", type=float, help="gradient norm clip (default 1.0; 0 disables)")
    p.add_argument("--grad-checkpointing", action="store_const", const=True,
                   help="recompute activations in the backward pass (less memory, ~30%% more time)")
    add_checkpoint_options(p)
    p.add_argument("--device", help="cpu or cuda (default: cuda if present; under torchrun or --ray each "
                   "process's own)")
    add_parallel_options(p)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: where native)")
    p.add_argument("--config", type=Path, help="a TOML file setting any of these keys")


def at_least_one(text: str) -> int:
    """argparse type for counts that 0 would make destructive (--keep 0 would delete every checkpoint)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """The checkpoint options every training task shares (checkpoint.py)."""
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default 50)")
    p.add_argument("--keep", type=at_least_one, help="checkpoints kept, at least 1 (default 2)")
    p.add_argument("--resume", action="store_const", const=True, help="continue from the last checkpoint in --out "
                   "(an error if there is none)")


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    """The options of a run on several processes, which sft, pretrain, rm and dpo share (qwen2.distributed)."""
    p.add_argument("--parallel", choices=["ddp", "fsdp", "ep"], help="under torchrun or --ray: replicas (ddp, the "
                   "default), sharded parameters, gradients and optimizer state (fsdp, FSDP2), or an MoE "
                   "model's experts dealt out over the processes, the rest replicated (ep)")
    p.add_argument("--ray", metavar="ADDRESS|local[:N]", help=ray_launcher.HELP)


def add_lora_options(p: argparse.ArgumentParser) -> None:
    """The LoRA options every training task shares."""
    p.add_argument("--lora-rank", type=int, help="train a LoRA adapter of this rank instead of every weight")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2 x rank)")
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma-separated of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                   "down_proj (default: all)")
    p.add_argument("--no-merge", dest="merge", action="store_const", const=False,
                   help="LoRA: write only the adapter, not the merged model")


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The config --config (TOML, flat keys) sets, overlaid with the options given on the command line."""
    from qwen2.train.config import FLAT, TrainConfig

    values = read_toml(args.config) if args.config else {}
    values |= {k: v for k, v in vars(args).items() if k in FLAT and v is not None}
    for key in ("data", "out"):
        if not values.get(key):
            raise OptionError(f"--{key} is required (on the command line or in --config)")
    return TrainConfig.from_flat(values, str(args.config or "the options"))


def read_toml(path: Path, what: str = "--config") -> dict:
    """A TOML file's tables; a missing, unreadable or malformed file is one OptionError naming `what`."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise OptionError(f"{what} needs Python 3.11 or newer (tomllib)") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OptionError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{what} {path} is not valid TOML: {e}") from None


def run(args: argparse.Namespace) -> None:
    config = config_from(args)
    last = train(config) if args.ray is None else ray_launcher.launch(args.ray, config, train)
    if last is not None:
        print(json.dumps({"out": config.out, **last}))


def train(config: TrainConfig) -> dict | None:
    """This process's part of the run (all of it alone, one rank under torchrun or Ray Train): the
    final metrics on rank 0, None on the other ranks."""
    from qwen2 import distributed
    from qwen2.train.trainer import Trainer

    try:
        trainer = Trainer(config)
        last = trainer.train()
    finally:
        distributed.shutdown()
    return last if trainer.lead else None
