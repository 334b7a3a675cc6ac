"""`--ray local:2` on `qwen2 eval ...` and `qwen2 data ...`: two engine actors on a local Ray instance record
what one process does (greedy replies, mmlu's letter log-probabilities, settings), items reach their own keys,
a data run whose driver is killed resumes to the same samples, and faults (a dead actor, a logits processor,
a bad --ray, --ray with --endpoint, no ray installed) are one line each."""

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qwen2.cli import main
from qwen2.distributed.ray_cluster import RaySpec, connect
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import ClusterError, OptionError

EXACT = ["--quant", "none", "--dtype", "float32"]
PROBE = Path(__file__).with_name("records_probe.py")
TWO = RaySpec(None, 2)


@pytest.fixture(scope="module")
def ray():
    ray = connect(TWO, num_cpus=2)
    yield ray
    ray.shutdown()


def run_eval(path, capsys, *args: str) -> dict:
    main(["eval", *args, "--json", str(path)])
    capsys.readouterr()
    return json.loads(path.read_text())


def without_logprobs(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "logprobs"} for r in records]


@pytest.mark.parametrize("eval_args", [["asdiv", "--max-tokens", "4"], ["mmlu"]], ids=["asdiv", "mmlu"])
def test_an_eval_on_two_actors_records_what_one_process_does(ray, tiny_hf, tmp_path, capsys, eval_args):
    common = [*eval_args, "--limit", "3", "--model", str(tiny_hf), *EXACT]
    here = run_eval(tmp_path / "here.json", capsys, *common)
    spread = run_eval(tmp_path / "ray.json", capsys, *common, "--ray", "local:2")
    assert without_logprobs(spread["results"]) == without_logprobs(here["results"]) and len(here["results"]) == 3
    # a batch of other rows (two shares, one thread each) sums in another order: the last digit may differ
    for a, b in zip(spread["results"], here["results"]):
        assert a.get("logprobs") == pytest.approx(b.get("logprobs"), abs=1e-3)
    assert spread["settings"] == here["settings"] and spread["summary"] == here["summary"]
    # so either run's results file resumes the other
    assert (tmp_path / "ray.jsonl").read_text().partition("\n")[0] == (tmp_path / "here.jsonl").read_text().partition(
        "\n")[0]


def test_items_reach_their_own_keys_and_a_dead_actor_ends_the_run_in_one_line(ray, tiny_hf):
    from qwen2.eval.engine_actors import EngineActors
    from qwen2.eval.harness import generate_all, next_token_logprobs
    from qwen2.loading import load

    options = dict(model=str(tiny_hf), quant="none", dtype="float32", max_concurrency=4)
    # the tiny model repeats a prompt's last token, so each key's reply shows which prompt it answered
    prompts = {f"k{i}": word for i, word in enumerate(["apple", "river", "cloud", "stone", "tiger"])}
    prompts["chat"] = [{"role": "user", "content": "hi"}]

    def params(key: str) -> SamplingParams:
        return SamplingParams(max_tokens=3, temperature=0.8, seed=len(key))

    llm = load(**options)
    here, spread = {}, {}
    generate_all(llm, prompts, params, here.__setitem__, "here")
    with EngineActors(TWO, options) as actors:
        generate_all(actors, prompts, params, spread.__setitem__, "ray")
        assert spread == here and len(set(here.values())) == len(prompts)
        ids = [llm.tokenizer.encode(t)[0] for t in (" A", " B")]
        scored, reference = next_token_logprobs(actors, prompts, ids, "ray"), next_token_logprobs(llm, prompts, ids, "")
        assert scored.keys() == reference.keys()
        assert all(scored[key] == pytest.approx(reference[key], abs=1e-3) for key in prompts)
        with pytest.raises(OptionError, match="logits processor"):
            actors.generate_all(prompts, lambda _: SamplingParams(logits_processors=[lambda _o, x: x]),
                                spread.__setitem__, "ray")
        ray.kill(actors.actors[1])
        with pytest.raises(ClusterError) as failed:
            generate_all(actors, prompts, params, spread.__setitem__, "ray")
    assert "\n" not in str(failed.value) and "engine actor 2 of 2 failed" in str(failed.value)
    assert "rerun" in str(failed.value)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_data_run_whose_driver_is_killed_resumes_to_the_same_samples(ray, tiny_hf, tmp_path, capsys):
    common = ["reject-sample", "--model", str(tiny_hf), *EXACT, "--source", "asdiv", "--limit", "3", "--k", "2",
              "--max-tokens", "8"]
    killed, whole, log = tmp_path / "killed", tmp_path / "whole", tmp_path / "driver.log"
    # the driver joins this module's cluster by its address, as it would a real one's
    address = ray.get_runtime_context().gcs_address
    with log.open("w") as stderr:
        driver = subprocess.Popen([sys.executable, str(PROBE), "2", "--", "data", *common, "--out", str(killed),
                                   "--ray", address], stdout=subprocess.PIPE, stderr=stderr, text=True)
    guard = threading.Timer(120, driver.kill)  # only a hung run trips it, and the test then fails below
    guard.start()
    said = driver.stdout.readline()  # the probe says when two samples are recorded
    guard.cancel()
    assert said == "paused\n", log.read_text()[-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver.stdout.close()
    before = read_jsonl(killed / "samples.jsonl")[1:]
    assert len(before) == 2
    # Ray ends a dead driver's actors, so this run's get the cluster's CPUs
    main(["data", *common, "--out", str(killed), "--ray", "local:2"])
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    main(["data", *common, "--out", str(whole)])
    capsys.readouterr()
    assert resumed["samples"] == 6 and resumed["sampled_now"] == 4
    after, reference = read_jsonl(killed / "samples.jsonl"), read_jsonl(whole / "samples.jsonl")
    assert after[0] == reference[0] and after[1:3] == before  # recorded lines kept as written
    assert sorted(json.dumps(r, sort_keys=True) for r in after[1:]) == sorted(
        json.dumps(r, sort_keys=True) for r in reference[1:])


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    return error[0]


@pytest.mark.parametrize("argv, phrase", [
    (["eval", "asdiv", "--ray", "local:2", "--endpoint", "http://127.0.0.1:9/v1"], "give one of them"),
    (["eval", "mgsm", "--ray", "local:0"], "a whole number of at least 1"),
    (["eval", "mmlu", "--ray", "local:two"], "a whole number of at least 1"),
    (["eval", "ifeval", "--ray", "head node:6379"], "neither local[:N] nor a cluster address"),
    (["data", "instruct-feedback", "--out", "x", "--ray", ""], "neither local[:N] nor a cluster address"),
    (["eval", "multilingual", "--ray", "local:2"], "add --no-ppl"),
], ids=["endpoint", "zero", "word", "space", "empty", "multilingual-ppl"])
def test_bad_ray_options_are_one_line_errors(capsys, argv, phrase):
    assert phrase in one_line_error(capsys, argv)


@pytest.mark.parametrize("argv", [["eval", "asdiv", "--ray", "local"],
                                  ["data", "reject-sample", "--out", "x", "--ray", "local:2"]], ids=["eval", "data"])
def test_without_ray_the_flag_says_how_to_install_it(capsys, monkeypatch, argv):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert 'pip install "qwen2[ray]"' in one_line_error(capsys, argv)
