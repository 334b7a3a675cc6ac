"""`qwen2 train recipe`: SFT -> data -> reward -> online DPO -> evals as one run on the tiny model,
each stage into its own folder and skipped on a rerun once done; a stage cut short reruns alone;
a recipe extended by stages runs only the new ones; an edited stage is refused, not reused; a bad
recipe is one line naming the key, before anything runs."""

import contextlib
import io
import json

import pytest

from qwen2.cli import main
from qwen2.train import instruct_feedback
from qwen2.train.recipe import plan

NEVER_MET = [{"kind": "keywords:include", "words": ["zzqxv"]}]  # no reply of the tiny model's holds the word
ALWAYS_MET = [{"kind": "keywords:exclude", "words": ["zzqxv"]}]
NAMES = ["01-sft", "02-data", "03-reward", "05-online_dpo", "06-eval"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe-data")
    chat = folder / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}]}) + "\n"
                            for q, a in [("What is 2 + 2?", "4."), ("Name a colour.", "Blue.")] * 2))
    prompts = folder / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a fruit.", "constraints": ALWAYS_MET}) + "\n" +
                       json.dumps({"prompt": "Name a colour.", "constraints": NEVER_MET}) + "\n")
    return chat, prompts


def stages(chat, prompts) -> dict[str, str]:
    fast = 'device = "cpu"\nbf16 = false\nprogress = false\n'
    return {
        "sft": f'[sft]\ndata = "{chat}"\nsteps = 2\nbatch_size = 2\nmax_len = 64\nlr = 1e-3\nsave_every = 0\n{fast}',
        "data": f'[data.instruct-feedback]\nprompts = "{prompts}"\nk = 2\nmax_tokens = 4\nquant = "none"\n',
        "reward": '[reward]\nkind = "verifier"\n',
        "online_dpo": f'[online_dpo]\nsamples = 2\nmax_new_tokens = 4\nlora_rank = 4\nsteps = 1\nlr = 1e-2\n'
                      f'heldout = 0.5\nmax_len = 64\n{fast}',
        "eval": '[eval.ifeval]\nlimit = 2\nmax_tokens = 4\nquant = "none"\n',
    }


def write_recipe(path, out, model, tables) -> None:
    path.write_text(f'out = "{out}"\nmodel = "{model}"\n' + "".join(tables))


def run_recipe(path) -> tuple[list[str], dict]:
    """The recipe's own lines ("recipe: ...") and its final JSON summary."""
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        main(["train", "recipe", str(path)])
    lines = stdout.getvalue().splitlines()
    return [line for line in lines if line.startswith("recipe: ")], json.loads(lines[-1])


def statuses(summary) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in summary["stages"]}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full(tiny_hf, files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    out, path = folder / "out", folder / "recipe.toml"
    write_recipe(path, out, tiny_hf, stages(*files).values())
    lines, summary = run_recipe(path)
    return path, out, lines, summary


def test_a_recipe_runs_every_stage_into_its_folder_each_from_the_one_before(full, tiny_hf, files):
    path, out, lines, summary = full
    assert [line.split()[1:3] for line in lines] == [[name, word] for name in NAMES for word in ("started",
                                                                                                  "finished")]
    assert statuses(summary) == dict.fromkeys(NAMES, "finished")
    assert summary["model"] == str(out / "05-online_dpo")
    for name in NAMES:
        assert (out / name / "done.json").is_file()
    by_name = {s["stage"]: s for s in summary["stages"]}
    assert by_name["01-sft"]["step"] == 2 and by_name["01-sft"]["loss"] > 0
    assert (out / "01-sft" / "config.json").is_file() and (out / "01-sft" / "model.safetensors").is_file()
    # the data commands sample from the SFT model; their problems become online DPO's checkable prompts
    header = read_jsonl(out / "02-data" / "instruct-feedback" / "samples.jsonl")[0]
    assert header["settings"]["model"] == str(out / "01-sft")
    assert read_jsonl(out / "02-data" / "prompts.jsonl") == [{"prompt": "Name a fruit.", "constraints": ALWAYS_MET},
                                                             {"prompt": "Name a colour.", "constraints": NEVER_MET}]
    assert by_name["02-data"]["prompts"] == 2 and by_name["02-data"]["instruct-feedback"]["sft"] >= 1
    online = json.loads((out / "05-online_dpo" / "train_config.json").read_text())
    assert (online["task"], online["model"], online["reward"]) == ("online-dpo", str(out / "01-sft"), "verifier")
    assert online["data"] == str(out / "02-data" / "prompts.jsonl")
    assert (out / "05-online_dpo" / "model.safetensors").is_file() and "eval_verified" in by_name["05-online_dpo"]
    # the eval ran on the recipe's model and on the last policy, and compared the two
    before, after = (json.loads((out / "06-eval" / side / "ifeval.json").read_text()) for side in ("before", "after"))
    assert (before["settings"]["model"], after["settings"]["model"]) == (str(tiny_hf), str(out / "05-online_dpo"))
    compare = json.loads((out / "06-eval" / "compare" / "ifeval.json").read_text())
    assert compare["items"] == 2 and by_name["06-eval"]["ifeval"]["difference"] == compare["difference"]


def test_a_rerun_skips_every_stage_and_reports_what_they_made(full):
    path, out, _, first = full
    markers = {name: (out / name / "done.json").read_text() for name in NAMES}
    lines, again = run_recipe(path)
    assert lines == [f"recipe: {name} skipped (done)" for name in NAMES]
    assert statuses(again) == dict.fromkeys(NAMES, "skipped")
    assert {name: (out / name / "done.json").read_text() for name in NAMES} == markers
    drop = ("status", "seconds")
    assert [{k: v for k, v in s.items() if k not in drop} for s in again["stages"]] == \
        [{k: v for k, v in s.items() if k not in drop} for s in first["stages"]]


def test_a_stage_without_its_marker_reruns_alone(full):
    path, out, _, first = full
    (out / "06-eval" / "done.json").unlink()
    lines, again = run_recipe(path)
    assert statuses(again) == dict.fromkeys(NAMES[:-1], "skipped") | {"06-eval": "finished"}
    assert (out / "06-eval" / "done.json").is_file()
    assert again["stages"][-1]["ifeval"] == first["stages"][-1]["ifeval"]  # its items resumed, not resampled


def test_an_interrupted_recipe_resumes_at_the_next_stage_and_an_extended_one_runs_only_the_new(
        tiny_hf, files, tmp_path, monkeypatch, capsys):
    out, path = tmp_path / "out", tmp_path / "recipe.toml"
    tables = stages(*files)
    write_recipe(path, out, tiny_hf, [tables["sft"], tables["data"]])

    def killed(*args, **kwargs):
        raise RuntimeError("killed while sampling")

    monkeypatch.setattr(instruct_feedback, "sample", killed)
    with pytest.raises(SystemExit):
        main(["train", "recipe", str(path)])
    assert "killed while sampling" in capsys.readouterr().err
    assert (out / "01-sft" / "done.json").is_file() and not (out / "02-data" / "done.json").exists()
    monkeypatch.undo()
    lines, summary = run_recipe(path)
    assert lines[0] == "recipe: 01-sft skipped (done)" and statuses(summary) == {"01-sft": "skipped",
                                                                                  "02-data": "finished"}
    write_recipe(path, out, tiny_hf, [tables["sft"], tables["data"], tables["reward"]])
    _, summary = run_recipe(path)
    assert statuses(summary) == {"01-sft": "skipped", "02-data": "skipped", "03-reward": "finished"}
    # an edited stage is never reused as if it were the one recorded
    write_recipe(path, out, tiny_hf, [tables["sft"].replace("steps = 2", "steps = 3"), tables["data"]])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "recipe", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "01-sft was made by other settings (steps was 2, now 3)" in err[0], err


def test_the_data_commands_problems_become_checkable_prompts_and_their_pairs_one_file(tiny_hf, files, tmp_path):
    problems = tmp_path / "maths.jsonl"
    problems.write_text(json.dumps({"question": "What is 2 + 3?", "answer": 5}) + "\n")
    out, path = tmp_path / "out", tmp_path / "recipe.toml"
    maths = f'[data.reject-sample]\nproblems = "{problems}"\nk = 2\nmax_tokens = 4\nquant = "none"\n'
    write_recipe(path, out, tiny_hf, [stages(*files)["data"], maths])
    _, summary = run_recipe(path)
    (data,) = summary["stages"]
    assert (data["stage"], data["prompts"]) == ("02-data", 3)
    asked = read_jsonl(out / "02-data" / "prompts.jsonl")[-1]
    assert asked["answer"] == 5 and "What is 2 + 3?" in asked["prompt"] and "The answer is" in asked["prompt"]
    for command in ("instruct-feedback", "reject-sample"):  # sampled from the recipe's model: no sft stage
        assert read_jsonl(out / "02-data" / command / "samples.jsonl")[0]["settings"]["model"] == str(tiny_hf)
    pairs = sum((read_jsonl(out / "02-data" / c / "pairs.jsonl") for c in ("instruct-feedback", "reject-sample")), [])
    assert read_jsonl(out / "02-data" / "pairs.jsonl") == pairs


def test_each_stage_starts_from_the_policy_so_far_and_reads_what_the_stages_before_wrote(files, tmp_path):
    out, path = tmp_path / "out", tmp_path / "recipe.toml"
    tables = stages(*files)
    write_recipe(path, out, "base-model", [tables["sft"], tables["data"], '[reward]\nlora_rank = 4\n',
                                           '[dpo]\nsteps = 1\n', tables["online_dpo"], tables["eval"]])
    planned, final = plan(path)
    sft, data, rm, dpo, online, evals = planned
    configs = {stage.folder.name: stage.work.args[0] for stage in (sft, rm, dpo, online)}  # not run: only planned
    assert configs["01-sft"].model.name == "base-model"
    assert (configs["03-reward"].task, configs["03-reward"].model.name) == ("rm", str(out / "01-sft"))
    assert configs["03-reward"].data.path == configs["04-dpo"].data.path == str(out / "02-data" / "pairs.jsonl")
    assert (configs["04-dpo"].task, configs["04-dpo"].model.name) == ("dpo", str(out / "01-sft"))
    assert (configs["05-online_dpo"].model.name, configs["05-online_dpo"].online.reward_model) == (
        str(out / "04-dpo"), str(out / "03-reward"))
    assert configs["05-online_dpo"].data.path == str(out / "02-data" / "prompts.jsonl")
    assert final == str(out / "05-online_dpo") and not out.exists()


@pytest.mark.parametrize("text, words", [
    ('out = "o"\nwarmup = 0.1\n', "unknown key(s) warmup"),
    ('model = "m"\n[eval.ifeval]\n', "out is required"),
    ('out = "o"\n', "no stage"),
    ('out = "o"\nsft = 3\n', "sft must be a table"),
    ('out = "o\n', "is not valid TOML"),
    ('out = "o"\n[sft]\ndata = "d"\nlearning_rate = 1e-4\n', "[sft] unknown key learning_rate; the keys are"),
    ('out = "o"\n[sft]\ndata = "d"\nsteps = "2"\n', "[sft] steps must be a whole number, got \"2\""),
    ('out = "o"\n[sft]\ndata = "d"\npack = 1\n', "[sft] pack must be true or false, got 1"),
    ('out = "o"\n[sft]\nsteps = 2\n', "[sft] data is required"),
    ('out = "o"\n[sft]\ndata = "d"\nresume = true\n', "[sft] resume is set by the recipe"),
    ('out = "o"\n[sft]\ndata = "d"\nbatch_size = 0\n', "[sft] --batch-size must be at least 1"),
    ('out = "o"\n[data.reject]\n', "[data.reject] unknown command; choose from reject-sample"),
    ('out = "o"\n[data.instruct-feedback]\nk = "2"\n', "[data.instruct-feedback] k must be a whole number"),
    ('out = "o"\n[data.instruct-feedback]\nk = 0\n', "[data.instruct-feedback] --k must be at least 1"),
    ('out = "o"\n[data.reject-sample]\nsource = "gsm8k"\n', "[data.reject-sample] argument --source: invalid choice"),
    ('out = "o"\n[data.reject-sample]\nout = "x"\n', "[data.reject-sample] out is set by the recipe"),
    ('out = "o"\n[reward]\nkind = "judge"\n', "[reward] kind must be \"rm\" or \"verifier\""),
    ('out = "o"\n[reward]\nkind = "rm"\n', "[reward] data is required: add a [data] stage"),
    ('out = "o"\n[data.exec-feedback]\nsource = "humaneval"\n[reward]\nkind = "verifier"\n[online_dpo]\n',
     "[online_dpo] needs prompts with an answer or constraints"),
    ('out = "o"\n[eval.ppl]\n', "[eval.ppl] unknown eval; choose from ifeval"),
    ('out = "o"\n[eval.ifeval]\nlimt = 2\n', "[eval.ifeval] unknown key limt; the keys are"),
    ('out = "o"\n[eval.ifeval]\njson = "x.json"\n', "[eval.ifeval] json is set by the recipe"),
])  # fmt: skip
def test_a_bad_recipe_is_one_line_naming_the_key_before_anything_runs(text, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "recipe", "recipe.toml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_preference_stage_cut_short_continues_from_its_last_checkpoint(tiny_hf, files, tmp_path, monkeypatch,
                                                                         capsys):
    from qwen2.train.trainer import Trainer

    out, path = tmp_path / "out", tmp_path / "recipe.toml"
    online = stages(*files)["online_dpo"].replace("steps = 1", f'steps = 2\nsave_every = 1\ndata = "{files[1]}"')
    write_recipe(path, out, tiny_hf, ['[reward]\nkind = "verifier"\n', online])
    original = Trainer.train_step

    def killed_in_step_2(self):
        if self.step == 1:
            raise RuntimeError("killed in step 2")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", killed_in_step_2)
    with pytest.raises(SystemExit):
        main(["train", "recipe", str(path)])
    assert "killed in step 2" in capsys.readouterr().err
    monkeypatch.undo()
    _, summary = run_recipe(path)
    stage = out / "05-online_dpo"
    assert f"resume: from {stage / 'checkpoints' / 'step-1'} (step 1 of 2)" in capsys.readouterr().err
    assert statuses(summary)["05-online_dpo"] == "finished"
    assert [row["step"] for row in read_jsonl(stage / "metrics.jsonl")] == [0, 1, 2]
