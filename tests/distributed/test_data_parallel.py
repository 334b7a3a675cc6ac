"""Two real processes under torchrun (gloo on the CPU): DDP and FSDP2 take the same steps as one
process with the same global batch, and a sharded run's checkpoint loads in a single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2.loading import load_model

TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = ["--steps", "3", "--max-len", "64", "--lr", "1e-3", "--no-bf16", "--save-every", "0"]


@pytest.fixture(scope="module")
def single(tiny_hf, tiny_chat_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, "-m", "qwen2", "train", "sft", "--model", str(tiny_hf), "--data",
                    str(tiny_chat_file), "--out", str(out), "--batch-size", "2", *SETTINGS], check=True,
                   capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return out


def steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(parallel, tiny_hf, tiny_chat_file, single,
                                                                        tmp_path):
    run = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 500),
                          "-m", "qwen2", "train", "sft", "--model", str(tiny_hf), "--data", str(tiny_chat_file),
                          "--out", str(tmp_path), "--batch-size", "1", "--parallel", parallel, *SETTINGS],
                         capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ours, alone = steps(tmp_path), steps(single)
    assert [s["target_tokens"] for s in ours] == [s["target_tokens"] for s in alone]
    assert [s["loss"] for s in ours] == pytest.approx([s["loss"] for s in alone], rel=1e-5)
    # the checkpoint a sharded run writes holds the whole model, and one process loads it
    model, tokenizer = load_model(tmp_path, quant="none", dtype="float32")
    reference, _ = load_model(single, quant="none", dtype="float32")
    ids = torch.tensor([tokenizer.encode("Name a colour.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-3, rtol=1e-3)
