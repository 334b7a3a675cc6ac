"""The training loop on its language-modelling tasks (sft, pretrain): packing and gradient
accumulation leave the loss unchanged, a run writes a checkpoint that we and transformers load with
equal logits, a run killed with SIGKILL resumes to the same losses step for step (each process with
its own RNG state), a checkpoint that would run code is refused, --resume with nothing to resume and
--keep 0 are errors, and pretraining from scratch lowers the loss and the held-out perplexity on
real text."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import qwen2
from qwen2.errors import OptionError, WeightsError
from qwen2.loading import load_model
from qwen2.train import checkpoint
from qwen2.train.config import TrainConfig
from qwen2.train.data import Row, collate
from qwen2.train.loss import loss_sum
from qwen2.train.trainer import Trainer
from tests.conftest import PickledPayload

QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Say hello in French.", "What is the capital of Italy?",
             "Spell 'cat' backwards.", "Is water wet?", "Count to three.", "Name a planet."]
ANSWERS = ["4.", "Blue.", "Bonjour.", "Rome.", "tac", "Yes, it is.", "1, 2, 3.", "Mars."]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in zip(QUESTIONS, ANSWERS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(tiny_hf, chat_file, out, **overrides):
    settings = dict(data=str(chat_file), out=str(out), model=str(tiny_hf), steps=2, batch_size=2, max_len=64,
                    lr=1e-3, bf16=False, progress=False, save_every=0)
    return TrainConfig.from_flat(settings | overrides)


def test_packed_loss_equals_unpacked_loss(tiny_hf, chat_file, tmp_path):
    trainer = Trainer(config(tiny_hf, chat_file, tmp_path))
    model, samples = trainer.model.eval(), trainer.task.train_data
    with torch.no_grad():
        alone = sum(loss_sum(model, collate([Row([s])], 0)).item() for s in samples)
        packed = loss_sum(model, collate([Row(samples[:4]), Row(samples[4:])], 0)).item()
    assert packed == pytest.approx(alone, rel=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch(tiny_hf, chat_file, tmp_path):
    big = Trainer(config(tiny_hf, chat_file, tmp_path / "big", batch_size=4, grad_accum=1))
    small = Trainer(config(tiny_hf, chat_file, tmp_path / "small", batch_size=1, grad_accum=4))
    rows = big.next_items()
    (a, count_a, _), (b, count_b, _) = big.backward(rows), small.backward(rows)
    # normalised by the target tokens of the whole step, not per micro-batch
    assert count_a == count_b and a == pytest.approx(b, rel=1e-5)
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-4, msg=name)


def test_the_tied_embeddings_sparse_gradient_takes_the_same_steps_as_a_dense_one(tiny_hf, chat_file, tmp_path,
                                                                                   monkeypatch):
    sparse = Trainer(config(tiny_hf, chat_file, tmp_path / "sparse", steps=3))
    assert sparse.model.model.embed_tokens.sparse
    monkeypatch.setattr(Trainer, "_sparse_embedding_gradient", lambda self: None)
    dense = Trainer(config(tiny_hf, chat_file, tmp_path / "dense", steps=3))
    assert not dense.model.model.embed_tokens.sparse
    sparse.train(), dense.train()
    for (name, p), q in zip(sparse.model.named_parameters(), dense.model.parameters()):
        # a token the batch holds twice sums its two rows in another order: the last bits of those rows
        embedding = name == "model.embed_tokens.weight"
        torch.testing.assert_close(p, q, atol=1e-9 if embedding else 0, rtol=1e-6 if embedding else 0, msg=name)


def test_lora_run_writes_adapter_merged_model_metrics_and_curve(tiny_hf, chat_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    last = Trainer(config(tiny_hf, chat_file, tmp_path, lora_rank=4, steps=3)).train()
    assert last["step"] == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "rss_mib"} <= set(lines[0])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "loss.png").exists()
    ours, tokenizer = load_model(tmp_path, quant="none", dtype="float32")
    base, _ = load_model(tiny_hf, quant="none", dtype="float32")
    ids = torch.tensor([tokenizer.encode("Name a colour.")])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ours(ids), base(ids), atol=1e-4)  # training changed the merged model


# the subprocesses run the checkout these tests import, wherever it is and whatever its name
PACKAGE_ROOT = Path(qwen2.__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE_ROOT)}
PROBE = Path(__file__).with_name("pause_probe.py")


def kill_when_paused(where: str, step: int, cli_args: list[str], log: Path) -> None:
    """`qwen2 train ...` run under the probe until it pauses at `where` of `step`, then SIGKILLed."""
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, str(PROBE), where, str(step), "--", *cli_args],
                                env=ENV, cwd=PACKAGE_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    guard = threading.Timer(600, proc.kill)  # only a hung run trips it, and the test then fails below
    guard.start()
    said = proc.stdout.readline()  # the probe says when the trainer is at the chosen point
    guard.cancel()
    assert said == "paused\n", log.read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def train_args(tiny_hf, chat_file, out, *extra):
    return ["train", "sft", "--model", str(tiny_hf), "--data", str(chat_file), "--out", str(out), "--steps", "6",
            "--save-every", "2", "--batch-size", "2", "--max-len", "64", "--lr", "1e-3", "--no-bf16",
            "--lora-dropout", "0.1", "--lora-rank", "4", *extra]


def qwen2_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen2", *args], env=ENV, cwd=PACKAGE_ROOT, capture_output=True,
                          text=True)


def losses(out):
    """Each step's loss (a held-out evaluation before the first step logs none)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def checkpoint_names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tiny_hf, chat_file, tmp_path_factory):
    """The losses of the run the killed ones must reproduce (LoRA dropout: the RNG state matters)."""
    out = tmp_path_factory.mktemp("whole")
    run = qwen2_cli(*train_args(tiny_hf, chat_file, out))
    assert run.returncode == 0, run.stderr[-2000:]
    return losses(out)


@pytest.mark.parametrize("where, step, logged, left, resumed_from", [
    # between steps 5 and 6: loss 5 is logged but step 5 is in no checkpoint, so it is done again
    ("before-step", 5, 5, ["step-2", "step-4"], 4),
    # while checkpoint 4's trainer_state.pt is half written: step-4 must not exist, step-2 is the latest
    ("in-checkpoint", 4, 4, ["step-2"], 2),
])  # fmt: skip
def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(where, step, logged, left, resumed_from, uninterrupted,
                                                               tiny_hf, chat_file, tmp_path):
    killed = tmp_path / "killed"
    kill_when_paused(where, step, train_args(tiny_hf, chat_file, killed), tmp_path / "killed.log")
    assert len(losses(killed)) == logged and [n for n in checkpoint_names(killed) if n.startswith("step-")] == left
    done = qwen2_cli(*train_args(tiny_hf, chat_file, killed, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resume: from {killed / 'checkpoints' / f'step-{resumed_from}'} " in done.stderr
    assert losses(killed) == uninterrupted
    assert checkpoint_names(killed) == ["step-4", "step-6"]  # the half-written one's folder is gone


def test_a_checkpoint_that_would_run_code_is_refused_with_one_line_and_not_run(tiny_hf, chat_file, tmp_path, capsys):
    from qwen2.cli import main

    Trainer(config(tiny_hf, chat_file, tmp_path, lora_rank=4)).train()
    state_file = tmp_path / "checkpoints" / "step-2" / "trainer_state.pt"
    state, marker = torch.load(state_file, weights_only=True), tmp_path / "payload-ran"
    torch.save(state | {"step": PickledPayload(marker)}, state_file)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(train_args(tiny_hf, chat_file, tmp_path, "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1, err
    assert "trainer_state.pt was not loaded" in err[0] and "could run code" in err[0] and "delete" in err[0]
    assert not marker.exists()
    with pytest.raises(WeightsError, match="was not loaded"):  # the same through the Python API
        Trainer(config(tiny_hf, chat_file, tmp_path, lora_rank=4, steps=4, resume=True)).train()
    assert not marker.exists()


def test_each_process_resumes_with_its_own_torch_rng_state(tmp_path):
    # under torchrun each process draws the dropout masks of its own rows: rank 0's state would give
    # the others masks the run never drew
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rngs = [torch.Generator().manual_seed(seed).get_state() for seed in (1, 2)]
    torch.save(checkpoint.training_state(1, {}, optimizer.state_dict(), scheduler, rngs), tmp_path / checkpoint.STATE)
    with torch.random.fork_rng():
        for rank, rng in enumerate(rngs):
            checkpoint.restore(checkpoint.read_state(tmp_path, ()), model, model.state_dict(), tmp_path, optimizer,
                               scheduler, 1, say=False, rank=rank)
            assert torch.equal(torch.get_rng_state(), rng)


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(tiny_hf, chat_file, tmp_path):
    # as HF Trainer's resume_from_checkpoint=True: asked to continue, it never silently starts over
    with pytest.raises(OptionError, match="--resume: no checkpoint in .*checkpoints.*drop --resume"):
        Trainer(config(tiny_hf, chat_file, tmp_path, resume=True))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_finished_run_extended_with_more_steps_follows_the_longer_schedule(tiny_hf, chat_file, tmp_path):
    from qwen2.train.trainer import cosine_schedule

    Trainer(config(tiny_hf, chat_file, tmp_path, steps=2, warmup=0.25)).train()
    Trainer(config(tiny_hf, chat_file, tmp_path, steps=4, warmup=0.25, resume=True)).train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = {m["step"]: m["lr"] for m in lines if "lr" in m}
    # the old schedule ended at 0; step 3 of 4 is at the new schedule's cos(pi/3) point
    assert rates[3] == pytest.approx(1e-3 * cosine_schedule(2, 4, 1), rel=1e-6) and rates[3] > 0, rates
    assert rates[4] == pytest.approx(1e-3 * cosine_schedule(3, 4, 1), rel=1e-6)


def test_keep_1_keeps_only_the_latest_checkpoint_and_keep_0_is_refused(tiny_hf, chat_file, tmp_path):
    with pytest.raises(OptionError, match="--keep must be at least 1"):
        Trainer(config(tiny_hf, chat_file, tmp_path, keep=0))
    Trainer(config(tiny_hf, chat_file, tmp_path, lora_rank=4, steps=3, save_every=1, keep=1)).train()
    assert checkpoint_names(tmp_path) == ["step-3"]


@pytest.mark.slow  # 11 s: a quality check; the loop itself is every other test's here
def test_pretraining_from_scratch_lowers_the_loss_on_real_text(tmp_path):
    from qwen2.eval.data import text_path

    trainer = Trainer(TrainConfig.from_flat(dict(task="pretrain", preset="Qwen2-Tiny", data=str(text_path("tiny")),
                                                 out=str(tmp_path), steps=30, batch_size=4, max_len=32, lr=3e-3,
                                                 bf16=False, progress=False, save_every=0)))
    last = trainer.train()
    curve = losses(tmp_path)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 2.0, curve
    # a tenth of the uniform guess's perplexity (the vocabulary size) on blocks it never trained on,
    # evaluated before the first step (near that guess) and after the last
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["eval_ppl"] > 151936 / 3
    assert last["eval_ppl"] < 151936 / 10 and (tmp_path / "config.json").exists()
    assert last["eval_loss"] == pytest.approx(math.log(last["eval_ppl"]), rel=1e-5)


def test_the_fused_loss_and_gradients_equal_autograd_through_full_logits():
    from qwen2.train.loss import LinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(700, 32, dtype=torch.float64, requires_grad=True)
    head = torch.randn(500, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 500, (700,))
    targets[::3] = -100  # rows that predict nothing
    weights = torch.rand(700, dtype=torch.float64)
    ours = LinearCrossEntropy.apply(hidden, head, targets, weights)
    ours.backward()
    grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    keep = targets != -100
    nll = torch.nn.functional.cross_entropy(hidden @ head.T, targets, ignore_index=-100, reduction="none")
    (nll * weights * keep).sum().backward()
    assert ours.item() == pytest.approx((nll * weights * keep).sum().item(), rel=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], head.grad)
