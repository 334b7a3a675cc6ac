"""The options of `qwen2 train rm`, `qwen2 train dpo` and `qwen2 train online-dpo` (the tasks of
reward.py, dpo.py and online_dpo.py, trained by trainer.py; cli.py runs them).

    qwen2 train rm --data PAIRS --out DIR [--lora-rank R] [--center C] [--save-every N] [--resume] ...
    qwen2 train dpo --data PAIRS --out DIR [--ref MODEL] [--beta B] [--loss sigmoid|ipo|robust]
        [--optimizer adamw|ondare|onties] [--reserve-rate P] [--merge-alpha A] [--base MODEL] [--lora-rank R] ...
    qwen2 train online-dpo --data PROMPTS (--reward-model RM_DIR | --reward verifier) --out DIR [--samples N] ...

PAIRS: JSONL/JSON `{"prompt" or "messages", "chosen", "rejected"}`, or a demo set by name
(dpo_en_demo, dpo_zh_demo). A TOML --config sets the same keys; flags override it. rm and dpo
train under torchrun and --ray as sft does (DDP or FSDP2: --parallel).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def add_arguments(sub: argparse._SubParsersAction, run: Callable[[argparse.Namespace], None]) -> None:
    """The three subcommands, each running `run` (cli.run: every task trains the same way)."""
    from qwen2.train.cli import add_parallel_options  # here: train.cli imports this module

    p = sub.add_parser("rm", help="train a reward model (Bradley-Terry) on preference pairs")
    _common(p)
    p.add_argument("--center", type=float, help="weight of the centering term mean((r_chosen + r_rejected)^2)")
    p.add_argument("--head-lr-scale", type=float, help="the new score head's learning rate over the body's "
                   "(default 10)")
    add_parallel_options(p)
    p.set_defaults(func=run, task="rm")

    p = sub.add_parser("dpo", help="direct preference optimization on preference pairs")
    _common(p)
    _preference(p)
    p.add_argument("--no-precompute-ref", dest="precompute_ref", action="store_const", const=False,
                   help="compute the reference log-probs every step instead of once before training")
    add_parallel_options(p)
    p.set_defaults(func=run, task="dpo")

    p = sub.add_parser("online-dpo", help="DPO on best-vs-worst pairs the policy samples and a reward model scores")
    _common(p)
    _preference(p)
    p.add_argument("--reward-model", help="the scorer: a folder written by `qwen2 train rm`")
    p.add_argument("--reward", choices=["model", "verifier"], help="model: --reward-model scores the replies; "
                   "verifier: 1 for a reply that states the prompt record's 'answer' and meets its "
                   "'constraints', else 0 (default: model)")
    p.add_argument("--samples", type=int, help="replies sampled per prompt each step (default 4)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per sampled reply (default 128)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--no-end-penalty", type=float, help="reward lost by a reply cut off before its end token "
                   "(default 1.0)")
    p.add_argument("--sample-quant", choices=["auto", "none", "q8_0"], help="what samples the replies: a Q8_0 "
                   "copy of the policy made each step, on our CPU kernels (q8_0), or the training model itself "
                   "(none); default auto: q8_0 on a CPU")
    add_parallel_options(p)
    p.set_defaults(func=run, task="online-dpo")


def _preference(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", help="the reference model (default: the policy's starting weights: LoRA off, or a "
                   "frozen copy)")
    p.add_argument("--beta", type=float, help="strength of the pull to the reference (default 0.1)")
    p.add_argument("--loss", choices=["sigmoid", "ipo", "robust"], help="DPO loss (default sigmoid)")
    p.add_argument("--label-smoothing", type=float, help="assumed fraction of flipped labels (sigmoid: cDPO; "
                   "default 0.1 for robust, else 0)")
    p.add_argument("--optimizer", choices=["adamw", "ondare", "onties"], help="AdamW or an Online Merging "
                   "Optimizer (default adamw)")
    p.add_argument("--reserve-rate", type=float, help="ondare/onties: fraction of each update kept (default 0.01)")
    p.add_argument("--merge-alpha", type=float, help="ondare/onties: weight of the SFT delta (default 1e-7)")
    p.add_argument("--merge-every", type=int, help="ondare/onties: merge every K steps (default 1)")
    p.add_argument("--base", help="ondare/onties: the model the policy was fine-tuned from; tau = policy - base")


def _common(p: argparse.ArgumentParser) -> None:
    # no defaults here: a flag left out falls back to the --config file, then to the task's default
    p.add_argument("--model", "-m", help="the model to train (default: the embedded Qwen2.5-Coder-0.5B-Instruct, "
                   "dequantized to float)")
    p.add_argument("--data", help="a .jsonl/.json file or a demo set (dpo_en_demo, dpo_zh_demo)")
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, metrics.png, the model)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float, help="peak learning rate (default DPO 5e-5 LoRA / 1e-6 full; "
                   "reward model 1e-4 LoRA / 1e-5 full)")
    p.add_argument("--batch-size", type=int, help="pairs (online: prompts) per micro-batch (default 2)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-len", type=int, help="tokens of prompt + reply (default 512; longer replies are cut, "
                   "longer prompts are bad samples)")
    p.add_argument("--max-prompt-len", type=int, help="prompts longer than this are bad samples (default: any "
                   "shorter than --max-len; replies are cut to what is left)")
    p.add_argument("--heldout", type=float, help="fraction of the data held out for evaluation (default 0.1)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: first and last)")
    p.add_argument("--seed", type=int)
    p.add_argument("--warmup", type=float, help="warm-up as a fraction of the steps (default 0.1)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip", type=float, help="gradient norm clip (default 1.0; 0 disables)")
    from qwen2.train.cli import add_checkpoint_options, add_lora_options  # here: train.cli imports this module

    add_lora_options(p)
    p.add_argument("--grad-checkpointing", action="store_const", const=True,
                   help="recompute activations in the backward pass (less memory, more time)")
    add_checkpoint_options(p)
    p.add_argument("--on-bad-sample", choices=["error", "skip"], help="a record that cannot be used stops the "
                   "run (error, the default) or is counted and reported (skip)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: where native)")
    p.add_argument("--config", type=Path, help="a TOML file setting any of these keys")
