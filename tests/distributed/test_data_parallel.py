"""Two real processes under torchrun (gloo on the CPU): DDP and FSDP2 take the same steps as one
process with the same global batch, full or LoRA, and a sharded run's checkpoint and output are the
files one process writes: the whole model loads in a single process, the LoRA adapter holds the same
tensors, and a run killed after a checkpoint resumes to the steps of one that never stopped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen2.loading import load_model
from tests.train.test_align import free_port
from tests.train.test_trainer import ENV, PACKAGE_ROOT, PROBE

TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = ["--max-len", "64", "--lr", "1e-3", "--no-bf16"]
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")


@pytest.fixture(scope="module")
def one_process(tiny_hf, tiny_chat_file, tmp_path_factory):
    """The output folder of `qwen2 train sft` in one process, two rows a step (run once per option list)."""
    runs = {}

    def run(*options: str) -> Path:
        if options not in runs:
            runs[options] = tmp_path_factory.mktemp("single")
            subprocess.run([sys.executable, "-m", "qwen2", "train", "sft", "--model", str(tiny_hf), "--data",
                            str(tiny_chat_file), "--out", str(runs[options]), "--batch-size", "2", *SETTINGS,
                            *options], check=True, capture_output=True, env=ENV)
        return runs[options]

    return run


def two_processes(tiny_hf, tiny_chat_file, out, *options, probe=()):
    """`qwen2 train sft` under torchrun, one row a step each (the one-process run's global batch);
    `probe`: pause_probe.py's arguments, to run it under the probe."""
    start = [str(PROBE), *probe, "--"] if probe else ["-m", "qwen2"]
    return subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           *start, "train", "sft", "--model", str(tiny_hf), "--data", str(tiny_chat_file),
                           "--out", str(out), "--batch-size", "1", *SETTINGS, *options],
                          capture_output=True, text=True, env=ENV, cwd=PACKAGE_ROOT, timeout=300)


def steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_model(out, reference):
    model, tokenizer = load_model(out, quant="none", dtype="float32")
    expected, _ = load_model(reference, quant="none", dtype="float32")
    ids = torch.tensor([tokenizer.encode("Name a colour.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected(ids), atol=1e-3, rtol=1e-3)


@needs_torchrun
# DDP: make test-slow (12 s); DPO's torchrun test and expert parallelism's (DDP beside the experts) run it
@pytest.mark.parametrize("parallel", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(parallel, tiny_hf, tiny_chat_file,
                                                                        one_process, tmp_path):
    options = ("--steps", "3", "--save-every", "0")
    run = two_processes(tiny_hf, tiny_chat_file, tmp_path, "--parallel", parallel, *options)
    assert run.returncode == 0, run.stderr[-2000:]
    ours, alone = steps(tmp_path), steps(one_process(*options))
    assert [s["target_tokens"] for s in ours] == [s["target_tokens"] for s in alone]
    assert [s["loss"] for s in ours] == pytest.approx([s["loss"] for s in alone], rel=1e-5)
    # the checkpoint a sharded run writes holds the whole model, and one process loads it
    assert_same_model(tmp_path, one_process(*options))


@needs_torchrun
# every weight: make test-slow (21 s); LoRA, the case FSDP2 gained last, stays in the default suite
@pytest.mark.parametrize("lora", [pytest.param((), marks=pytest.mark.slow), ("--lora-rank", "4")],
                         ids=["full", "lora"])
def test_an_fsdp2_run_killed_after_a_checkpoint_resumes_to_the_steps_of_one_process(lora, tiny_hf, tiny_chat_file,
                                                                                    one_process, tmp_path):
    # killed before step 3, after checkpoint step-2: its weights give step 3's loss, its Adam moments
    # (gathered whole from the shards, cut again on resume) step 4's
    options = ("--parallel", "fsdp", "--steps", "4", "--save-every", "2", *lora)
    killed = two_processes(tiny_hf, tiny_chat_file, tmp_path, *options, probe=("killed-before-step", "2"))
    assert killed.returncode != 0 and len(steps(tmp_path)) == 2
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    assert (tmp_path / "checkpoints" / "step-2" / weights).exists()
    resumed = two_processes(tiny_hf, tiny_chat_file, tmp_path, *options, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resume: from {tmp_path / 'checkpoints' / 'step-2'} (step 2 of 4)" in resumed.stderr
    alone = one_process("--steps", "4", "--save-every", "2", *lora)
    ours, theirs = steps(tmp_path), steps(alone)
    assert [(s["step"], s["target_tokens"], s["lr"]) for s in ours] == [(s["step"], s["target_tokens"], s["lr"])
                                                                       for s in theirs]
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in ours] == pytest.approx([s[key] for s in theirs], rel=1e-5), key
    assert_same_model(tmp_path, alone)  # the whole model, or the adapters merged into it
    if lora:  # and the adapter, in the PEFT layout one process writes
        adapter, expected = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (tmp_path, alone))
        assert adapter.keys() == expected.keys()
        for name in adapter:
            torch.testing.assert_close(adapter[name], expected[name], atol=1e-6, rtol=1e-4)
        configs = [json.loads((out / "adapter" / "adapter_config.json").read_text()) for out in (tmp_path, alone)]
        assert configs[0] == configs[1]
