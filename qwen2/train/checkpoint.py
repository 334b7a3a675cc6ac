"""Checkpoints of the training loop (trainer.py, every task): OUT/checkpoints/step-N holds the
trained weights (an HF checkpoint, or a LoRA adapter; the task decides, and a reward model adds
its head) and trainer_state.pt (step, the data position, optimizer, scheduler, Python and torch
CPU RNG, the latter of every process under torchrun: each draws its own dropout masks).

Each checkpoint is written aside, flushed to the disk and renamed (qwen2.files), and older ones
are pruned only after it is complete, so a run killed at any point, even by a power cut, resumes
from the last whole one. trainer_state.pt holds only tensors and plain values and is read with
weights_only=True: a file someone altered to run code when unpickled is refused, not run.

The caller owns which weights and its data position (the trainer's: epoch and row of its
seeded order). FSDP2's shards and expert parallelism's experts go in and out as whole tensors
(qwen2.distributed), so their checkpoints are the files one process writes. Not covered: the
CUDA RNG (dropout on a GPU does not repeat exactly after a resume).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from qwen2.errors import OptionError, WeightsError
from qwen2.files import load_plain, write_folder_atomically, write_text_atomically
from qwen2.tokenizer import Tokenizer
from qwen2.train import lora
from qwen2.weights.export import export_hf

STATE = "trainer_state.pt"


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def folders(out: Path) -> list[Path]:
    """The complete checkpoints under out/checkpoints (a half-written one has a hidden .tmp name)."""
    root = out / "checkpoints"
    return [p for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit()] if root.exists() else []


def check_options(save_every: int, keep: int) -> None:
    if keep < 1:  # 0 would delete every checkpoint, the last one included
        raise OptionError(f"--keep must be at least 1 (the checkpoint --resume continues from), got {keep}")
    if save_every < 0:
        raise OptionError(f"--save-every must be 0 (only the final checkpoint) or more, got {save_every}")


def require(out: Path) -> None:
    """--resume with nothing to resume is an error, never a silent restart (as HF's resume_from_checkpoint=True)."""
    if not folders(out):
        raise OptionError(f"--resume: no checkpoint in {out / 'checkpoints'} to continue from; "
                          "check --out, or drop --resume to start at step 0")


def save(out: Path, state: dict, write_weights: Callable[[Path], None], keep: int) -> Path:
    """checkpoints/step-N with the weights `write_weights(folder)` writes and `state` (from
    training_state); then all but the newest `keep` checkpoints are deleted."""
    folder = out / "checkpoints" / f"step-{state['step']}"
    for stale in folder.parent.glob(".step-*.tmp"):  # what a kill mid-save left behind
        shutil.rmtree(stale, ignore_errors=True)

    def write(tmp: Path) -> None:
        write_weights(tmp)
        torch.save(state, tmp / STATE)

    write_folder_atomically(folder, write)
    # only now that the new checkpoint is on the disk may older ones go (keep >= 1 spares it)
    for old in sorted(folders(out), key=step_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def training_state(step: int, position: dict[str, int], optimizer: dict,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, torch_rngs: list[torch.Tensor]) -> dict:
    """What a resume needs besides the weights; tensors and plain values only, so that read_state
    can load it with weights_only=True. optimizer: its state dict; torch_rngs: every process's torch
    RNG state, by rank."""
    state = {"step": step, **position, "optimizer": optimizer, "scheduler": scheduler.state_dict(),
             "torch_rng": torch_rngs[0], "python_rng": random.getstate()}
    if len(torch_rngs) > 1:
        state["torch_rngs"] = torch_rngs
    return state


def read_state(folder: Path, position: Iterable[str]) -> dict:
    """trainer_state.pt, loaded with weights_only=True and checked for every value restore uses
    and the loop's `position` keys (whole numbers)."""
    fix = f"delete {folder} to resume from the checkpoint before it, or drop --resume to start again"
    state = load_plain(folder / STATE, fix)
    ok = (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", *position))
          and isinstance(state.get("torch_rng"), torch.Tensor) and isinstance(state.get("scheduler"), dict)
          and isinstance(state.get("optimizer"), dict) and _is_python_rng(state.get("python_rng"))
          and all(isinstance(rng, torch.Tensor) for rng in state.get("torch_rngs", [])))
    if not ok:
        raise WeightsError(f"{folder / STATE} lacks the step, data position, optimizer, scheduler or RNG state a "
                           f"checkpoint holds; {fix}")
    version, internal, gauss = state["python_rng"]
    state["python_rng"] = (version, tuple(internal), gauss)  # random.setstate takes tuples only
    return state


def _is_python_rng(value: object) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[1], (list, tuple))
            and all(isinstance(x, int) for x in value[1]))


def restore(state: dict, model: torch.nn.Module, weights: dict[str, torch.Tensor], folder: Path,
            optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, total: int,
            say: bool = True, rank: int = 0, load_whole: Callable | None = None) -> None:
    """Load a checkpoint's weights, optimizer, scheduler and RNG (the caller sets its step and position),
    and say so on stderr (`say`: this process speaks for the run). Every trained parameter must be among
    the weights: a checkpoint of another model or of other settings is refused, before anything loads.
    `rank`: this process's, whose RNG state it takes; `load_whole(model, optimizer, weights, optimizer
    state)`: loads whole tensors into a model whose processes each hold a part (FSDP2, expert parallel:
    a collective)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if missing := trained - set(weights):
        raise OptionError(f"{folder} does not hold this model's trained weights (missing "
                          f"{sorted(missing)[:3]}); resume with the same --model and settings")
    if load_whole is not None:
        load_whole(model, optimizer, weights, state["optimizer"])
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # the learning rate from this run's schedule, not the one the optimizer saved: they differ when a
    # finished run is extended with more --steps (its saved rate is the old schedule's end, 0). Stepping
    # back onto the same step recomputes it; torch would warn that no optimizer step came first.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.last_epoch -= 1
        scheduler.step()
    rngs = state.get("torch_rngs", [])
    torch.set_rng_state(rngs[rank] if rank < len(rngs) else state["torch_rng"])
    random.setstate(state["python_rng"])
    if say:
        print(f"resume: from {folder} (step {state['step']} of {total})", file=sys.stderr)


def write_weights(folder: Path, model: torch.nn.Module, tokenizer: Tokenizer, weights: dict[str, torch.Tensor],
                  adapter: bool, base: str = "") -> None:
    """The trained weights, from `weights` (the model's state dict, or as much of it as was gathered: with
    LoRA the trained tensors): the LoRA adapter alone (`base`: the model it adapts, for its config), or
    the whole model as an HF checkpoint."""
    if adapter:
        lora.save_adapter(model, folder, base, weights)
    else:
        export_hf(model.config, weights, tokenizer, folder)


def read_weights(folder: Path, adapter: bool) -> dict[str, torch.Tensor]:
    """What write_weights wrote, under the model's own names, in float32."""
    if adapter:
        from safetensors.torch import load_file

        return {k.removeprefix(lora.PEFT_PREFIX): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    from qwen2.weights.hf import load_hf

    return load_hf(folder, dtype=torch.float32)[1]


def keep_metrics(path: Path, step: int) -> None:
    """metrics.jsonl cut to the lines of steps up to `step`, so a resumed run logs each later step
    once; a run from step 0 starts it empty."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    write_text_atomically(path, "".join(line for line in lines if step and json.loads(line)["step"] <= step))
