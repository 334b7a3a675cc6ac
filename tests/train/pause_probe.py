"""`qwen2 train ...` that stops at a point the trainer reaches, for the SIGKILL test to kill it
there: a kill timed by the clock lands at a different step on every machine (on a fast one,
after the run had finished).

    python pause_probe.py WHERE STEP -- qwen2-cli-args...

WHERE is `before-step` (step STEP + 1 is about to start: STEP losses are logged) or
`in-checkpoint` (trainer_state.pt of checkpoint STEP is half written). The probe prints
"paused" on stdout and waits, forever, for the test's SIGKILL. `killed-before-step` is
`before-step` where the process sends itself the SIGKILL: under torchrun every process dies at
that point, before any of them starts the next step.
"""

import os
import signal
import sys
import threading
from pathlib import Path

import torch

from qwen2.cli import main
from qwen2.train import trainer


def pause() -> None:
    print("paused", flush=True)
    threading.Event().wait()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def before_step(step: int, stop=pause) -> None:
    def train_step(self, original=trainer.Trainer.train_step):  # every task's
        if self.step == step:
            stop()
        return original(self)

    trainer.Trainer.train_step = train_step


def pause_in_checkpoint(step: int) -> None:
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name == "trainer_state.pt" and obj.get("step") == step:
            Path(f).write_bytes(b"PK\x03\x04 the first bytes of a zip, and no more")
            pause()
        return original(obj, f, *args, **kwargs)

    torch.save = save  # the trainer calls it as torch.save


if __name__ == "__main__":
    where, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    {"before-step": before_step, "in-checkpoint": pause_in_checkpoint,
     "killed-before-step": lambda step: before_step(step, die)}[where](step)
    main(argv)
