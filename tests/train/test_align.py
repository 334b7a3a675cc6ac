"""The preference tasks (rm, dpo) through the one trainer, with checkpoint.py: a run stopped, or
killed with SIGKILL, and resumed logs the same losses and metrics step for step as one that ran
through, LoRA or full, AdamW or OnDARE, the reward model's head included; two torchrun processes
take the steps of one with the same global batch (DDP or FSDP2); a checkpoint that would run code is refused in
one line, and --resume with nothing to resume is an error before any model loads."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2.errors import OptionError, WeightsError
from qwen2.loading import load_model
from qwen2.train.config import TrainConfig
from qwen2.train.reward import load_reward_model, score
from qwen2.train.trainer import Trainer
from tests.conftest import PickledPayload
from tests.train.test_trainer import ENV, PACKAGE_ROOT, PROBE, checkpoint_names, kill_when_paused

TIMING = {"seconds", "elapsed", "rss_mib"}  # the only values two runs may differ in


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}: is {i} a number?", "chosen": "Yes, it is.", "rejected": "No way."}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tiny_hf, pairs, out, **overrides):
    # 6 training pairs, 2 a step: step 4 starts the second epoch's order, so a resume from step-4
    # must restore that order and the place in it
    fields = dict(data=str(pairs), out=str(out), model=str(tiny_hf), device="cpu", bf16=False, progress=False,
                  heldout=0.25, batch_size=2, max_len=64, steps=6, save_every=4, lr=1e-2, eval_every=2)
    return TrainConfig.from_flat(fields | overrides)


def metrics(out):
    """Every logged line, timings left out."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


class Stop(Exception):
    pass


def stop_before(trainer, step):
    """Make `trainer` stop as a kill would, before `step` + 1 starts (its `step` losses logged)."""
    original = trainer.train_step

    def train_step():
        if trainer.step == step:
            raise Stop
        return original()

    trainer.train_step = train_step


@pytest.mark.parametrize("settings", [
    dict(task="dpo", lora_rank=4, lora_dropout=0.1),  # dropout: the RNG state matters
    dict(task="dpo", optimizer="ondare", reserve_rate=0.5, lr=1e-4),  # full weights; OnDARE's masks
    dict(task="rm", lora_rank=4, lora_dropout=0.1),  # the adapter and the head
    dict(task="rm", lr=1e-4),
], ids=["dpo-lora", "dpo-full-ondare", "rm-lora", "rm-full"])  # fmt: skip
def test_a_stopped_run_resumes_to_the_same_losses_and_metrics(settings, tiny_hf, pairs, tmp_path):
    whole = Trainer(config(tiny_hf, pairs, tmp_path / "whole", **settings))
    whole.train()
    stopped = Trainer(config(tiny_hf, pairs, tmp_path / "stopped", **settings))
    stop_before(stopped, 5)  # step 5 is logged but in no checkpoint: it is done again
    with pytest.raises(Stop):
        stopped.train()
    assert [m["step"] for m in metrics(tmp_path / "stopped")] == [0, 1, 2, 3, 4, 5]
    resumed = Trainer(config(tiny_hf, pairs, tmp_path / "stopped", **settings, resume=True))
    resumed.train()
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "whole")
    assert [m["step"] for m in metrics(tmp_path / "whole")] == [0, 1, 2, 3, 4, 5, 6]
    assert len({m["loss"] for m in metrics(tmp_path / "whole")[1:]}) == 6  # the losses do move
    assert checkpoint_names(tmp_path / "stopped") == ["step-4", "step-6"]


def dpo_args(tiny_hf, pairs, out, *extra):
    return ["train", "dpo", "--model", str(tiny_hf), "--data", str(pairs), "--out", str(out), "--steps", "6",
            "--save-every", "2", "--batch-size", "2", "--max-len", "64", "--lr", "1e-2", "--no-bf16",
            "--device", "cpu", "--heldout", "0.25", "--lora-rank", "4", "--lora-dropout", "0.1", *extra]


def qwen2_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen2", *args], env=ENV, cwd=PACKAGE_ROOT, capture_output=True,
                          text=True)


@pytest.mark.parametrize("where, step, logged, left, resumed_from", [
    # between steps 5 and 6: step 5 is logged (with the eval line of step 0) but in no checkpoint
    ("before-step", 5, 6, ["step-2", "step-4"], 4),
    # while checkpoint 4's trainer_state.pt is half written: step-2 is the latest whole one
    # make test-slow (11 s): test_trainer's SIGKILL test kills mid-checkpoint on every task's loop
    pytest.param("in-checkpoint", 4, 5, ["step-2"], 2, marks=pytest.mark.slow),
])  # fmt: skip
def test_a_dpo_run_killed_with_sigkill_resumes_to_the_same_losses(where, step, logged, left, resumed_from,
                                                                   tiny_hf, pairs, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = qwen2_cli(*dpo_args(tiny_hf, pairs, whole))
    assert run.returncode == 0, run.stderr[-2000:]
    kill_when_paused(where, step, dpo_args(tiny_hf, pairs, killed), tmp_path / "killed.log")
    assert len(metrics(killed)) == logged and [n for n in checkpoint_names(killed) if n.startswith("step-")] == left
    done = qwen2_cli(*dpo_args(tiny_hf, pairs, killed, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resume: from {killed / 'checkpoints' / f'step-{resumed_from}'} (step {resumed_from} of 6)" in done.stderr
    assert metrics(killed) == metrics(whole)
    assert checkpoint_names(killed) == ["step-4", "step-6"]  # the half-written one's folder is gone


def test_a_checkpoint_that_would_run_code_is_refused_with_one_line_and_not_run(tiny_hf, pairs, tmp_path, capsys):
    from qwen2.cli import main

    Trainer(config(tiny_hf, pairs, tmp_path, task="dpo", lora_rank=4, steps=2)).train()
    state_file = tmp_path / "checkpoints" / "step-2" / "trainer_state.pt"
    state, marker = torch.load(state_file, weights_only=True), tmp_path / "payload-ran"
    torch.save(state | {"row": PickledPayload(marker)}, state_file)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(dpo_args(tiny_hf, pairs, tmp_path, "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1, err
    assert "trainer_state.pt was not loaded" in err[0] and "could run code" in err[0] and "delete" in err[0]
    assert not marker.exists()
    torch.save(state | {"row": "two"}, state_file)  # plain values, but not a data position
    with pytest.raises(WeightsError, match="lacks the step, data position"):
        Trainer(config(tiny_hf, pairs, tmp_path, task="dpo", lora_rank=4, steps=4, resume=True)).train()


@pytest.mark.parametrize("task", ["rm", "dpo", "online-dpo"])
def test_resume_without_a_checkpoint_is_an_error_before_the_model_loads(task, pairs, tmp_path, capsys):
    from qwen2.cli import main

    extra = {"reward": "verifier"} if task == "online-dpo" else {}
    # no such model: were it loaded first, the error would be about the model
    with pytest.raises(OptionError, match="--resume: no checkpoint in .*checkpoints.*drop --resume"):
        Trainer(TrainConfig.from_flat(dict(data=str(pairs), out=str(tmp_path), task=task, model="/no/such/model",
                                           resume=True, **extra)))
    with pytest.raises(SystemExit) as exit_:
        main(["train", task, "--data", str(pairs), "--out", str(tmp_path), "--model", "/no/such/model", "--resume",
              *(["--reward", "verifier"] if extra else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and "--resume: no checkpoint" in err[0], err
    assert not (tmp_path / "metrics.jsonl").exists()


TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_and_two_processes(common: list[str], out: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    """`qwen2 COMMON` in one process, two rows a step (out/alone), and under torchrun in two, a row each
    (out/two, with `extra`); their metrics, the two processes' first."""
    alone = qwen2_cli(*common, "--out", str(out / "alone"), "--batch-size", "2")
    assert alone.returncode == 0, alone.stderr[-2000:]
    run = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "qwen2",
                          *common, "--out", str(out / "two"), "--batch-size", "1", *extra],
                         capture_output=True, text=True, env=ENV, cwd=PACKAGE_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return metrics(out / "two"), metrics(out / "alone")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
# make test-slow (25 s): OnDARE's state is whole-tensor shaped as AdamW's, whose FSDP2 resume
# test_data_parallel runs in the suite
@pytest.mark.slow
def test_an_fsdp2_ondare_run_killed_after_a_checkpoint_resumes_to_the_steps_of_one_process(tiny_model,
                                                                                         default_tokenizer, tiny_hf,
                                                                                         pairs, tmp_path):
    # OnDARE's moments and tau are gathered whole into the checkpoint like AdamW's and cut again on resume;
    # its masks hash each entry's place in the whole tensor, so the two shards keep what one process keeps
    from qwen2.weights.export import export_hf

    torch.manual_seed(0)
    base = {k: v + 0.01 * torch.randn_like(v) for k, v in tiny_model.state_dict().items()}
    export_hf(tiny_model.config, base, default_tokenizer, tmp_path / "base")
    common = ["train", "dpo", "--model", str(tiny_hf), "--data", str(pairs), "--steps", "4", "--save-every", "2",
              "--max-len", "64", "--lr", "1e-4", "--no-bf16", "--heldout", "0.25", "--device", "cpu",
              "--optimizer", "ondare", "--reserve-rate", "0.5", "--merge-alpha", "0.5",
              "--base", str(tmp_path / "base")]
    alone = qwen2_cli(*common, "--out", str(tmp_path / "alone"), "--batch-size", "2")
    assert alone.returncode == 0, alone.stderr[-2000:]

    def two(*extra, probe=()):
        start = [str(PROBE), *probe, "--"] if probe else ["-m", "qwen2"]
        return subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()), *start,
                               *common, "--out", str(tmp_path / "two"), "--batch-size", "1", "--parallel", "fsdp",
                               *extra], capture_output=True, text=True, env=ENV, cwd=PACKAGE_ROOT, timeout=300)

    killed = two(probe=("killed-before-step", "2"))
    assert killed.returncode != 0 and [m["step"] for m in metrics(tmp_path / "two")] == [0, 1, 2]
    resumed = two("--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resume: from {tmp_path / 'two' / 'checkpoints' / 'step-2'} (step 2 of 4)" in resumed.stderr
    ours, theirs = metrics(tmp_path / "two"), metrics(tmp_path / "alone")
    assert [m["step"] for m in ours] == [0, 1, 2, 3, 4]
    for mine, single in zip(ours, theirs):  # as the test below: the same sums in another order
        assert mine == pytest.approx(single, rel=1e-3, abs=1e-6), (mine, single)
    model, tokenizer = load_model(tmp_path / "two", quant="none", dtype="float32")
    reference, _ = load_model(tmp_path / "alone", quant="none", dtype="float32")
    ids = torch.tensor([tokenizer.encode("Question 3: is 3 a number?")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("task, extra", [
    # rm every weight: make test-slow (12 s); rm-lora-fsdp runs the reward model in two processes
    ("dpo", ["--lora-rank", "4"]), pytest.param("rm", [], marks=pytest.mark.slow),
    # every weight at 1e-2: the loss is 0 after one step; make test-slow (15 s): rm-lora-fsdp covers FSDP2 here
    pytest.param("dpo", ["--parallel", "fsdp", "--lr", "1e-4"], marks=pytest.mark.slow),
    ("rm", ["--lora-rank", "4", "--parallel", "fsdp"]),
], ids=["dpo-lora", "rm-full", "dpo-full-fsdp", "rm-lora-fsdp"])  # fmt: skip
def test_two_torchrun_processes_take_the_steps_of_one_with_the_same_global_batch(task, extra, tiny_hf, pairs,
                                                                                  tmp_path):
    # 6 training pairs, 2 a step (one per process): the third step ends the epoch
    common = ["train", task, "--model", str(tiny_hf), "--data", str(pairs), "--steps", "3", "--max-len", "64",
              "--lr", "1e-2", "--no-bf16", "--heldout", "0.25", "--save-every", "0", "--device", "cpu", *extra]
    ours, theirs = one_and_two_processes(common, tmp_path)
    assert [m["step"] for m in ours] == [0, 1, 2, 3] and [sorted(m) for m in ours] == [sorted(m) for m in theirs]
    # the same sums in another order: float32 rounding, which three steps at lr 1e-2 grow to 1e-4;
    # the gradient norm (before clipping) would show a gradient of the wrong scale that Adam's steps hide
    for mine, single in zip(ours, theirs):
        assert mine == pytest.approx(single, rel=1e-3, abs=1e-6), (mine, single)
    assert len({m["loss"] for m in ours[1:]}) == 3  # the steps do train
    if task == "dpo":  # the merged policy each run wrote
        model, tokenizer = load_model(tmp_path / "two", quant="none", dtype="float32")
        reference, _ = load_model(tmp_path / "alone", quant="none", dtype="float32")
        ids = torch.tensor([tokenizer.encode("Question 3: is 3 a number?")])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), reference(ids), atol=1e-3, rtol=1e-3)
    else:  # the reward model each run wrote (LoRA: merged into its body) scores alike
        (model, tokenizer), (reference, _) = (load_reward_model(tmp_path / run) for run in ("two", "alone"))
        ids = [tokenizer.encode("Question 3: is 3 a number? Yes, it is.")]
        with torch.no_grad():
            torch.testing.assert_close(score(model, ids, 0), score(reference, ids, 0), atol=1e-3, rtol=1e-3)
