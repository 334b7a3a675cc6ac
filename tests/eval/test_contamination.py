"""The contamination guard on hand-made run and data folders: what it follows, and where it stops."""

import json
import shutil

from qwen2.cli import main
from qwen2.eval.contamination import sources, warn


def data_folder(path, contaminates=None):
    """A data command's --out: samples.jsonl's settings line, and the sft.jsonl a run trains on."""
    path.mkdir()
    settings = {"source": contaminates or "problems.jsonl"} | ({"contaminates": contaminates} if contaminates else {})
    (path / "samples.jsonl").write_text(json.dumps({"eval": "data reject-sample", "settings": settings}) + "\n")
    (path / "sft.jsonl").write_text("")
    return path


def run_folder(path, data, **fields):
    """A training run's --out with the train_config.json `qwen2 train` writes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "train_config.json").write_text(json.dumps({"data": str(data), "out": str(path), "model": None} | fields))
    return path


def test_a_run_trained_on_an_evals_items_is_found_for_that_eval_only(tmp_path):
    data = data_folder(tmp_path / "asdiv-data", contaminates="asdiv")
    run = run_folder(tmp_path / "sft", data / "sft.jsonl")
    assert sources(run, "asdiv") == [data / "samples.jsonl"]
    assert sources(run, "mgsm") == [] and sources(run, "humaneval") == []
    assert sources(run_folder(tmp_path / "by-folder", data), "asdiv") == [data / "samples.jsonl"]  # data: the folder
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    assert sources(run / "checkpoints" / "step-5", "asdiv") == [data / "samples.jsonl"]


def test_runs_started_from_a_contaminated_run_are_followed_back(tmp_path):
    dirty = data_folder(tmp_path / "gsm", contaminates="mgsm")
    clean = data_folder(tmp_path / "mine")
    sft = run_folder(tmp_path / "sft", dirty / "sft.jsonl")
    dpo = run_folder(tmp_path / "dpo", clean / "pairs.jsonl", model=str(sft))
    online = run_folder(tmp_path / "online", clean / "sft.jsonl", model="default", reward_model=str(dpo))
    assert sources(dpo, "mgsm") == sources(online, "mgsm") == [dirty / "samples.jsonl"]
    assert sources(run_folder(tmp_path / "clean", clean / "sft.jsonl"), "mgsm") == []


def test_what_it_cannot_see_is_silence_not_an_error(tmp_path):
    assert sources(None, "asdiv") == [] and sources("Qwen/Qwen2-0.5B-Instruct", "asdiv") == []
    assert sources(tmp_path, "asdiv") == []  # no train_config.json
    assert sources(run_folder(tmp_path / "moved", tmp_path / "gone" / "sft.jsonl"), "asdiv") == []
    loop = run_folder(tmp_path / "loop", tmp_path / "gone" / "sft.jsonl")
    run_folder(loop, tmp_path / "gone" / "sft.jsonl", model=str(loop))  # a run naming itself ends
    assert sources(loop, "asdiv") == []
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train_config.json").write_text("{not json")
    assert sources(tmp_path / "broken", "asdiv") == []


def test_the_warning_is_one_stderr_line(tmp_path, capsys):
    run = run_folder(tmp_path / "sft", data_folder(tmp_path / "d", contaminates="humaneval") / "sft.jsonl")
    warn(run, "humaneval")
    warn(run, "asdiv")
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"# warning: {run} was trained on data built from the humaneval eval's own items")


def test_the_eval_command_warns_beside_its_score(tiny_hf, tmp_path, capsys):
    model = shutil.copytree(tiny_hf, tmp_path / "run")
    run_folder(model, data_folder(tmp_path / "d", contaminates="asdiv") / "sft.jsonl")
    main(["eval", "asdiv", "--model", str(model), "--limit", "1", "--max-tokens", "2", "--ctx", "512"])
    err = capsys.readouterr().err
    assert "asdiv score is not a held-out one" in err
