"""Tensor-parallel inference in real processes (gloo on the CPU): two ranks give the logits and
the greedy tokens of one, serve the OpenAI API, refuse a KV-head count they cannot split, and
exit with an error, not a hang, when the other rank dies or stops answering.

Tolerance: float32 logits within 1e-4 absolute of one process (the row-parallel layers sum two
partial products, so only the order of additions differs; measured ~2e-5 on logits up to ~22)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qwen2
from qwen2.weights.export import export_hf
from tests.conftest import tiny_config
from tests.distributed import tp_probe

TORCHRUN = Path(sys.executable).with_name("torchrun")
# the ranks run the checkout these tests import, wherever it is and whatever its folder's name
PACKAGE = Path(qwen2.__file__).resolve().parent
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE.parent)}
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()), *args],
                          capture_output=True, text=True, env=ENV, cwd=PACKAGE.parent, timeout=timeout)


def hf_folder(tmp_path_factory, default_tokenizer, name: str, seed: int, **overrides) -> Path:
    from qwen2.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)  # sharp logits: greedy ties are unlikely
    folder = tmp_path_factory.mktemp(name)
    export_hf(model.config, model.state_dict(), default_tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, default_tokenizer) -> Path:
    """Four experts (two per rank), a shared expert, an untied head."""
    return hf_folder(tmp_path_factory, default_tokenizer, "tiny-moe", 1, model_type="qwen2_moe", num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                     tie_word_embeddings=False)


def compare(model: Path, tmp_path: Path, tokens: int) -> tuple[dict, dict]:
    tp_probe.main(str(model), str(tmp_path / "one.pt"), tokens)
    run = torchrun("-m", "tests.distributed.tp_probe", str(model), str(tmp_path / "two.pt"), str(tokens))
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(two["logits"], one["logits"], atol=1e-4, rtol=0)
    assert two["text"] == one["text"] and two["again"] == one["again"]
    return one, two


@pytest.mark.parametrize("kind", ["dense, tied head", "moe, untied head"])
def test_two_ranks_give_the_logits_and_greedy_tokens_of_one(kind, tiny_hf, tiny_moe, tmp_path):
    # 16 tokens fill the first request's first block, so the second request copies part of it
    # (the engine's copy_prefix, replayed on rank 1)
    one, two = compare(tiny_hf if kind.startswith("dense") else tiny_moe, tmp_path, 16)
    assert len(one["text"]) > 0
    assert two["kv_per_token"] * 2 == one["kv_per_token"]  # each rank holds one of the two KV heads


@pytest.mark.slow  # three processes each read the 0.5B GGUF in float32: ~1 min of the two cores
def test_the_default_model_on_two_ranks_matches_one_and_the_planner(default_gguf, tmp_path):
    from qwen2.planner import kv_bytes_per_token, weight_bytes
    from qwen2.weights import describe

    one, two = compare(default_gguf, tmp_path, 4)
    assert one["text"].strip()
    config = describe(default_gguf)[0]
    for n, measured in ((1, one), (2, two)):
        assert measured["kv_per_token"] == kv_bytes_per_token(config, n, "float32")
        assert measured["weight_bytes"] == weight_bytes(config, n, "none", "float32")


def test_serve_under_torchrun_answers_the_openai_client(tiny_hf, tmp_path):
    import openai

    from qwen2.loading import load

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                               "qwen2", "serve", "--model", str(tiny_hf), "--quant", "none", "--dtype", "float32",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not start in 120 s"
                time.sleep(0.5)
        answer = client.completions.create(model="tiny", prompt="def quicksort(arr):", max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="def quicksort(arr):", max_tokens=8, temperature=0, stream=True))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    alone = load(tiny_hf, quant="none", dtype="float32").generate("def quicksort(arr):", max_tokens=8, temperature=0)
    assert answer.choices[0].text == streamed == alone.text


def test_a_kv_head_count_the_ranks_do_not_divide_is_one_clear_error(tmp_path_factory, default_tokenizer):
    one_kv_head = hf_folder(tmp_path_factory, default_tokenizer, "one-kv-head", 2, num_key_value_heads=1)
    run = torchrun("-m", "qwen2", "generate", "-p", "hi", "-n", "1", "--model", str(one_kv_head), timeout=120)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("qwen2: error:")]
    assert errors == ["qwen2: error: tensor parallelism over 2 processes needs whole KV heads per process, but the "
                      "model has 1 KV heads (num_key_value_heads); run torchrun with --nproc-per-node (times "
                      "--nnodes) one of 1"], run.stderr[-2000:]
    assert not our_frames(run.stderr), run.stderr[-2000:]  # torchrun prints its own traceback; ours must not


def our_frames(stderr: str, package: Path = PACKAGE) -> list[str]:
    """The traceback frames in `stderr` whose file is in our package. Told apart by the package's
    own folder, not by a "/qwen2/" in the path: a clone named qwen2 has that in torch's paths too."""
    files = re.findall(r'^\s*File "([^"]+)", line \d+', stderr, re.MULTILINE)
    return [f for f in files if Path(f).resolve().is_relative_to(package.resolve())]


def test_our_frames_are_those_in_the_package_folder_whatever_the_checkout_is_called():
    clone = Path("/home/user/qwen2")  # `git clone` into its default folder, `make setup` makes .venv there
    torchrun_frame = f'  File "{clone}/.venv/lib/python3.11/site-packages/torch/distributed/run.py", line 9, in main'
    our_frame = f'  File "{clone}/qwen2/cli.py", line 12, in main'
    stderr = f"Traceback (most recent call last):\n{torchrun_frame}\n{our_frame}\nValueError: x\n"
    assert our_frames(stderr, clone / "qwen2") == [f"{clone}/qwen2/cli.py"]


def start_pair(model: Path, logs: Path) -> tuple[list[subprocess.Popen], int]:
    """Two ranks serving, started by hand as torchrun would, but with no agent to end the survivor for us."""
    master, port = str(free_port()), free_port()
    procs = []
    for rank in (0, 1):
        env = ENV | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master, "QWEN2_TP_TIMEOUT": "5"}
        log = (logs / f"rank{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "qwen2", "serve", "--model", str(model), "--quant", "none",
                                       "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs, port


def wait_serving(port: int, procs: list[subprocess.Popen]) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail("the server did not start in 120 s")


def test_a_rank_that_hangs_or_dies_ends_the_other_with_an_error(tiny_hf, tmp_path):
    import urllib.request

    (tmp_path / "hang").mkdir(), (tmp_path / "die").mkdir()
    (leader, follower), port = start_pair(tiny_hf, tmp_path / "hang")
    (leader2, follower2), port2 = start_pair(tiny_hf, tmp_path / "die")  # both pairs start together
    try:
        # rank 1 stops answering mid-service: rank 0's next collective times out (QWEN2_TP_TIMEOUT=5)
        wait_serving(port, [leader, follower])
        follower.send_signal(signal.SIGSTOP)
        body = b'{"model": "m", "prompt": "hello", "max_tokens": 4}'
        with pytest.raises(OSError):  # the server process ends under the request
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                                          headers={"Content-Type": "application/json"}), timeout=60)
        assert leader.wait(30) == 1
        assert "lost contact with the other ranks" in (tmp_path / "hang" / "rank0.log").read_text()
        # rank 0 is killed while rank 1 waits for its next call: rank 1 sees the closed socket at once
        wait_serving(port2, [leader2, follower2])
        leader2.kill()
        assert follower2.wait(30) == 1
        assert "lost contact with the other ranks" in (tmp_path / "die" / "rank1.log").read_text()
    finally:
        for p in (leader, follower, leader2, follower2):
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_torchrun_generate_prints_what_one_process_prints(quant):
    command = ["-m", "qwen2", "generate", "-p", "def quicksort(arr):", "-n", "48", "--temperature", "0",
               "--quant", quant]
    alone = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=ENV, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    sharded = torchrun(*command, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert sharded.stdout == alone.stdout and len(alone.stdout) > 100
