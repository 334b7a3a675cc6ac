"""The training loop: packing and gradient accumulation leave the loss unchanged, a run writes a
checkpoint that we and transformers load with equal logits, a run killed with SIGKILL resumes to
the same losses step for step, and pretraining from scratch lowers the loss on real text."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qwen2.loading import load_model
from qwen2.train.data import Row, collate
from qwen2.train.loss import loss_sum
from qwen2.train.trainer import TrainConfig, Trainer

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
    return TrainConfig(**(settings | overrides))


def test_packed_loss_equals_unpacked_loss(tiny_hf, chat_file, tmp_path):
    trainer = Trainer(config(tiny_hf, chat_file, tmp_path))
    model, samples = trainer.model.eval(), trainer.samples
    with torch.no_grad():
        alone = sum(loss_sum(model, collate([Row([s])], 0)).item() for s in samples)
        packed = loss_sum(model, collate([Row(samples[:4]), Row(samples[4:])], 0)).item()
    assert packed == pytest.approx(alone, rel=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch(tiny_hf, chat_file, tmp_path):
    big = Trainer(config(tiny_hf, chat_file, tmp_path / "big", batch_size=4, grad_accum=1))
    small = Trainer(config(tiny_hf, chat_file, tmp_path / "small", batch_size=1, grad_accum=4))
    rows = big._next_rows()
    (a, count_a), (b, count_b) = big.backward(rows), small.backward(rows)
    # normalised by the target tokens of the whole step, not per micro-batch
    assert count_a == count_b and a == pytest.approx(b, rel=1e-5)
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-4, msg=name)


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


def train_cli(tiny_hf, chat_file, out, *extra):
    return [sys.executable, "-m", "qwen2", "train", "sft", "--model", str(tiny_hf), "--data", str(chat_file),
            "--out", str(out), "--steps", "6", "--save-every", "2", "--batch-size", "2", "--max-len", "64",
            "--lr", "1e-3", "--no-bf16", "--lora-dropout", "0.1", "--lora-rank", "4", *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(tiny_hf, chat_file, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(train_cli(tiny_hf, chat_file, tmp_path / "whole"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cli(tiny_hf, chat_file, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-4").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(losses(killed)) < 6
    done = subprocess.run(train_cli(tiny_hf, chat_file, killed, "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resume: from" in done.stderr
    assert losses(killed) == losses(tmp_path / "whole")


def test_pretraining_from_scratch_lowers_the_loss_on_real_text(tmp_path):
    from qwen2.eval.data import text_path

    trainer = Trainer(TrainConfig(task="pretrain", preset="Qwen2-Tiny", data=str(text_path("tiny")),
                                  out=str(tmp_path), steps=30, batch_size=4, max_len=32, lr=3e-3, bf16=False,
                                  progress=False, save_every=0))
    last = trainer.train()
    curve = losses(tmp_path)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 2.0, curve
    # a tenth of the uniform guess's perplexity (the vocabulary size) on blocks it never trained on
    assert last["heldout_ppl"] < 151936 / 10 and (tmp_path / "config.json").exists()


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
