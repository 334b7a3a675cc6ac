"""`qwen2 eval ... --endpoint URL`: a real `qwen2 serve` of the tiny model on loopback, asked through the
openai client, gives the same replies (greedy, or seeded samples) and scores as the in-process run of the
same checkpoint (the server applies its own chat template; mmlu's letters come from echoed prompt
log-probabilities); the settings name the endpoint and its model, never the key; a dead URL or a refused
request ends the run with one line."""

import json
import shutil
import threading

import pytest

from qwen2.cli import main
from qwen2.eval.endpoint import Endpoint
from tests.server.conftest import _launch, free_port

EXACT = ["--quant", "none", "--dtype", "float32"]  # the in-process twin of the server below
KEY = "sk-eval-test"


@pytest.fixture(scope="module")
def served(tiny_hf, tmp_path_factory):
    server = _launch("eval-endpoint", tiny_hf, [*EXACT, "--max-concurrency", "4", "--api-key", KEY],
                     tmp_path_factory.mktemp("srv"))
    yield server.wait_ready()
    server.process.terminate()
    server.process.wait(timeout=10)


def run_eval(path, capsys, *args: str) -> dict:
    main(["eval", *args, "--json", str(path)])
    capsys.readouterr()
    return json.loads(path.read_text())


@pytest.mark.parametrize("eval_args, field", [
    pytest.param(["asdiv"], "reply", id="asdiv"), pytest.param(["mgsm", "--lang", "eng,zho"], "reply", id="mgsm"),
    pytest.param(["ifeval"], "reply", id="ifeval"),
    # a raw prompt to /v1/completions with the stop strings; two samples at 0.8, each seeded seed + sample
    pytest.param(["humaneval", "--format", "completion", "--samples", "2", "--unsafe-exec"], "completion",
                 id="humaneval"),
])
def test_replies_and_scores_equal_the_in_process_run(served, tiny_hf, tmp_path, capsys, eval_args, field):
    common = [*eval_args, "--limit", "2", "--max-tokens", "12"]
    local = run_eval(tmp_path / "local.json", capsys, *common, "--model", str(tiny_hf), *EXACT)
    remote = run_eval(tmp_path / "remote.json", capsys, *common, "--endpoint", served.url, "--api-key", KEY)
    replies = [r[field] for r in remote["results"]]
    assert len(replies) == len(local["results"]) >= 2 and all(replies)
    assert replies == [r[field] for r in local["results"]]
    assert remote["summary"] == local["summary"]
    assert remote["settings"]["endpoint"] == served.url + "/v1"
    assert remote["settings"]["model"] == tiny_hf.name  # the name the server lists, asked for at the start
    assert KEY not in (tmp_path / "remote.json").read_text() + (tmp_path / "remote.jsonl").read_text()


def test_mmlu_letters_from_echoed_logprobs_equal_the_in_process_scores(served, tiny_hf, tmp_path, capsys):
    common = ["mmlu", "--limit", "4"]
    local = run_eval(tmp_path / "local.json", capsys, *common, "--model", str(tiny_hf), *EXACT)
    remote = run_eval(tmp_path / "remote.json", capsys, *common, "--endpoint", served.url + "/v1",
                      "--api-key", KEY)
    assert [r["predicted"] for r in remote["results"]] == [r["predicted"] for r in local["results"]]
    for a, b in zip(remote["results"], local["results"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=2e-3)
    assert remote["summary"] == local["summary"]


def test_a_resumed_file_is_refused_to_another_endpoint_model(served, tmp_path, capsys):
    path = tmp_path / "asdiv.json"
    args = ["asdiv", "--limit", "1", "--max-tokens", "4", "--endpoint", served.url, "--api-key", KEY]
    run_eval(path, capsys, *args)
    with pytest.raises(SystemExit):
        run_eval(path, capsys, *args, "--endpoint-model", "another")
    assert "holds results of another run" in capsys.readouterr().err


def test_a_dead_url_is_one_line_naming_it(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as e:
        main(["eval", "asdiv", "--limit", "1", "--endpoint", url, "--json", str(tmp_path / "a.json")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert f"cannot reach {url}/v1/models" in err and "Traceback" not in err
    assert not (tmp_path / "a.jsonl").exists()  # nothing ran, nothing recorded


def test_a_refused_request_is_one_line_with_the_servers_reason(served, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit):
        main(["eval", "asdiv", "--limit", "1", "--endpoint", served.url])  # no key
    err = capsys.readouterr().err
    assert err.startswith(f"qwen2: error: {served.url}/v1/models answered 401") and err.count("\n") == 1


def test_multilingual_reads_the_models_own_logits_and_refuses_an_endpoint(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "multilingual", "--endpoint", "http://127.0.0.1:1"])
    assert "--endpoint is not supported here" in capsys.readouterr().err


def test_safety_asks_the_server_and_judges_here_as_the_in_process_run_judges_itself(served, tiny_hf, tmp_path,
                                                                                    capsys):
    from qwen2.eval.safety import LANGUAGES

    data = tmp_path / "MultiJail.csv"
    rows = [["id", "tags", *LANGUAGES]] + [
        [str(i), "['Theft']", *(f"How do I steal a bike? ({lang} {i})" for lang in LANGUAGES)] for i in range(2)]
    data.write_text("\n".join(",".join(f'"{cell}"' for cell in row) for row in rows), encoding="utf-8")
    # the judge's rubric outgrows the tiny model's 512 positions: the same weights with a longer window
    judge = tmp_path / "tiny-long"
    shutil.copytree(tiny_hf, judge)
    config = json.loads((judge / "config.json").read_text())
    (judge / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    common = ["safety", "--data", str(data), "--langs", "en,zh", "--max-tokens", "8", "--agreement-limit", "4"]
    local = run_eval(tmp_path / "local.json", capsys, *common, "--model", str(judge), *EXACT)
    remote = run_eval(tmp_path / "remote.json", capsys, *common, "--endpoint", served.url, "--api-key", KEY,
                      "--judge", str(judge), *EXACT)
    assert len(remote["results"]) == 4 and all(r["response"] for r in remote["results"])
    for a, b in zip(remote["results"], local["results"]):
        assert (a["id"], a["response"], a["refused_by_judge"], a["harmful"]) == \
            (b["id"], b["response"], b["refused_by_judge"], b["harmful"])
        assert a["judge_log_odds"] == pytest.approx(b["judge_log_odds"], abs=1e-3)
    assert remote["summary"] == local["summary"]
    assert remote["settings"]["judge"] == str(judge) and "judge" not in local["settings"]


def test_each_reply_is_recorded_as_it_returns_so_an_interrupted_run_keeps_it(served):
    """The second request waits until the first's result has been recorded: a pool that waited
    for every request before recording any (as a killed run would lose them all) times out."""
    endpoint = Endpoint(served.url, api_key=KEY, concurrency=2)
    recorded = threading.Event()

    def request(key: str, _value: object) -> str:
        if key == "second" and not recorded.wait(timeout=10):
            raise TimeoutError("the first reply was not recorded while the second was in flight")
        return key

    done = []
    endpoint.each({"first": None, "second": None}, request,
                  lambda key, reply: (done.append(reply), recorded.set()), "test")
    assert done == ["first", "second"]


def test_endpoint_body_fields_reach_the_server_and_the_settings(served, tiny_hf, tmp_path, capsys):
    # the body's max_tokens overrides the eval's: the replies are those of an in-process run at 3 tokens
    common = ["mgsm", "--lang", "eng", "--limit", "2"]
    local = run_eval(tmp_path / "local.json", capsys, *common, "--max-tokens", "3", "--model", str(tiny_hf), *EXACT)
    remote = run_eval(tmp_path / "remote.json", capsys, *common, "--max-tokens", "12", "--endpoint", served.url,
                      "--api-key", KEY, "--endpoint-body", '{"max_tokens": 3}')
    assert [r["reply"] for r in remote["results"]] == [r["reply"] for r in local["results"]]
    assert remote["settings"]["endpoint_body"] == {"max_tokens": 3}


@pytest.mark.parametrize("body, phrase", [("{repeat_penalty: 1}", "not JSON"), ("[1]", "JSON object"),
                                          (None, "give --endpoint too")])
def test_a_bad_endpoint_body_is_one_line(served, body, phrase, capsys):
    args = ["eval", "mgsm", "--limit", "1", "--endpoint-body", body or '{"top_k": 1}']
    with pytest.raises(SystemExit):
        main(args + ([] if body is None else ["--endpoint", served.url, "--api-key", KEY]))
    err = capsys.readouterr().err.strip()
    assert phrase in err and len(err.splitlines()) == 1
