"""`qwen2 train recipe RECIPE.toml`: the Qwen2 report's post-training pipeline as one resumable run.

    qwen2 train recipe RECIPE.toml

Stages, each optional, run in this order, each into its own folder OUT/<nn-stage>/:
- 01-sft: supervised fine-tuning; the table holds the training options' flat keys, as `qwen2 train
  --config` takes them (config.py; `data` required).
- 02-data: one or more of `qwen2 data reject-sample|exec-feedback|instruct-feedback`, a sub-table each
  (`[data.instruct-feedback]`) holding the command's options with underscores (`max_tokens = 64`), run
  into OUT/02-data/<command>/ and sampling from the policy so far. Their pairs are joined into
  pairs.jsonl (for reward and dpo), and their problems into prompts.jsonl for online DPO: a maths
  problem with its `answer`, an instruction task with its `constraints` (what the verifier checks).
- 03-reward: `kind = "rm"` (the default: a reward model, the same keys, trained on the data's
  pairs, starting from the policy so far) or `kind = "verifier"` (online DPO checks the replies itself).
- 04-dpo: offline DPO on the data's pairs (the same keys).
- 05-online_dpo: online DPO (the same keys) on the data's prompts, scored by the reward stage.
- 06-eval: a sub-table per eval (`[eval.ifeval]`, its options: `limit = 100`), each run on the
  recipe's `model` (before/) and on the last policy (after/), then `qwen2 eval compare` of the two
  (compare/): their --json files are kept there.
The top level holds `out` (required) and `model` (default: the embedded model). A stage's `model`
defaults to the policy so far: `model`, then the output of sft, dpo and online_dpo as they run; a
stage's `data` defaults to what the stages before it wrote. Paths are taken as written (relative to
the current folder), as `--config` takes them.

The whole recipe is checked before anything runs: unknown tables or keys, values of the wrong type,
missing keys and the options' own checks are one OptionError naming the key. A stage writes done.json
last (atomically) with its settings and headline metrics; a rerun skips a stage whose done.json holds
the same settings, so a recipe interrupted between stages resumes at the next one, and one extended
by stages runs only the new ones. A stage's settings include those of every stage before it: a
done.json of other settings is refused (delete that folder and the ones after it to redo them),
never silently reused. Within a stage its own resume applies: sft, reward, dpo and online DPO continue
from their last checkpoint, the data commands and the evals from their samples.jsonl and items files.
stdout gets a line per stage (started, skipped as done, finished with seconds) and a final JSON line:
each stage's folder and headline metrics, and the final model.

Not covered: exec-feedback problems as online DPO prompts (their tests are not a verifier online DPO
runs), ASDiv problems as prompts (their golds are read by the eval's own rule), evals without per-item
scores (ppl, niah, multilingual, safety), torchrun, and SFT on the data stage's sft.jsonl (each
command's own sft.jsonl is kept for that, in OUT/02-data/<command>/).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen2.errors import OptionError
from qwen2.files import write_text_atomically

STAGES = ("sft", "data", "reward", "dpo", "online_dpo", "eval")  # running order; folder numbers follow it
DATA_COMMANDS = ("reject-sample", "exec-feedback", "instruct-feedback")
EVALS = ("ifeval", "mgsm", "asdiv", "mmlu", "humaneval")  # those whose items eval compare can pair
MARKER = "done.json"


def add_arguments(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="SFT -> data -> reward -> DPO / online DPO -> evals from one TOML file, "
                       "resumable stage by stage")
    p.add_argument("recipe", type=Path, help="the recipe (see qwen2/train/recipe.py and the README)")
    p.set_defaults(func=run)


@dataclass
class Stage:
    folder: Path  # OUT/01-sft: its name is the stage's
    settings: dict  # what the output depends on, recorded in done.json
    work: Callable[[], dict]  # runs the stage, returns its headline metrics


def run(args: argparse.Namespace) -> None:
    stages, final_model = plan(args.recipe)
    done = [run_stage(stage) for stage in stages]
    print(json.dumps({"recipe": str(args.recipe), "stages": done, "model": final_model}), flush=True)


def run_stage(stage: Stage) -> dict:
    marker = stage.folder / MARKER
    if marker.exists():
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record["settings"] != stage.settings:
            differs = _difference(record["settings"], stage.settings)
            raise OptionError(f"{stage.folder} was made by other settings ({differs}); delete {stage.folder} and the "
                              "stages after it to redo them, or give another out")
        print(f"recipe: {stage.folder.name} skipped (done)", flush=True)
        return {"stage": stage.folder.name, "out": str(stage.folder), "status": "skipped", **record["metrics"]}
    print(f"recipe: {stage.folder.name} started", flush=True)
    start = time.perf_counter()
    stage.folder.mkdir(parents=True, exist_ok=True)
    metrics = stage.work()
    seconds = round(time.perf_counter() - start, 1)
    write_text_atomically(marker, json.dumps({"settings": stage.settings, "seconds": seconds, "metrics": metrics},
                                             indent=1) + "\n")
    print(f"recipe: {stage.folder.name} finished in {seconds}s", flush=True)
    return {"stage": stage.folder.name, "out": str(stage.folder), "status": "finished", "seconds": seconds, **metrics}


def _difference(old: dict, new: dict) -> str:
    if old["before"] != new["before"]:
        return "a stage before it changed"
    if old["model"] != new["model"]:
        return f"model was {old['model']!r}, now {new['model']!r}"
    a, b = old["table"], new["table"]
    key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    return f"{key} was {a.get(key)!r}, now {b.get(key)!r}"


# -- reading and checking the recipe ------------------------------------------------------------

def plan(path: Path) -> tuple[list[Stage], str | None]:
    """Every stage of the recipe, checked and ready to run, and the model the last one leaves."""
    from qwen2.train.cli import read_toml

    recipe = read_toml(path, "the recipe")
    where = str(path)
    if unknown := set(recipe) - {"out", "model", *STAGES}:
        raise OptionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; the recipe holds out, model and "
                          f"the stage tables {', '.join(STAGES)}")
    out = _expect(where, "out", recipe.get("out"), str, required=True)
    policy = _expect(where, "model", recipe.get("model"), str)
    for name in STAGES:
        if name in recipe and not isinstance(recipe[name], dict):
            raise OptionError(f"{where}: {name} must be a table ([{name}]), got {recipe[name]!r}")
    root, stages, before = Path(out), [], ""
    start_model, pairs, prompts, reward = policy, None, None, {}
    parser = _parser()
    for n, name in enumerate(STAGES, 1):
        if name not in recipe:
            continue
        table, folder, at = dict(recipe[name]), root / f"{n:02d}-{name}", f"{where}: [{name}]"
        # what the output depends on: the table as written, the model it starts from, every stage before it
        settings = {"table": recipe[name], "model": policy or "default", "before": before}
        if name == "sft":
            config = _config(at, table, dict(task="sft", model=policy, out=str(folder)))
            work, policy = functools.partial(_train, config), str(folder)
        elif name == "data":
            commands = _data_commands(where, parser, table, folder, policy)
            pairs = str(folder / "pairs.jsonl")
            prompts = str(folder / "prompts.jsonl") if any(_checkable(args) for args in commands) else None
            work = functools.partial(_make_data, commands, folder)
        elif name == "reward":
            kind = _expect(at, "kind", table.pop("kind", "rm"), str)
            if kind == "verifier":
                if table:
                    raise OptionError(f"{at} kind = \"verifier\" trains nothing; drop {', '.join(table)}")
                reward, work = {"reward": "verifier"}, _nothing_to_train
            elif kind == "rm":
                config = _align(at, "rm", table, folder, policy, pairs)
                reward, work = {"reward_model": str(folder)}, functools.partial(_train, config)
            else:
                raise OptionError(f"{at} kind must be \"rm\" or \"verifier\", got {kind!r}")
        elif name == "dpo":
            config = _align(at, "dpo", table, folder, policy, pairs)
            work, policy = functools.partial(_train, config), str(folder)
        elif name == "online_dpo":
            if reward and set(table) & {"reward", "reward_model"}:
                raise OptionError(f"{at} reward and reward_model are set by the [reward] stage; leave them out")
            if "data" not in table and prompts is None:
                raise OptionError(f"{at} needs prompts with an answer or constraints to check: add "
                                  "[data.reject-sample] or [data.instruct-feedback], or give data = PROMPTS.jsonl")
            config = _align(at, "online-dpo", table | reward, folder, policy, prompts)
            work, policy = functools.partial(_train, config), str(folder)
        else:
            work = _evals(where, parser, table, folder, start_model, policy)
        stages.append(Stage(folder, settings, work))
        before = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if not stages:
        raise OptionError(f"{where}: no stage; add at least one of the tables {', '.join(STAGES)}")
    return stages, policy


_KINDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false", list: "a list"}


def _expect(where: str, key: str, value, kind, required: bool = False):
    """`value` if it is of `kind` (a type or a union; an int passes for a float, a bool never for a number)."""
    if value is None:
        if required:
            raise OptionError(f"{where} {key} is required")
        return None
    kinds = [k for k in (typing.get_args(kind) or (kind,)) if k is not type(None)]
    if not any(_is(value, k) for k in kinds):
        wanted = " or ".join(_KINDS.get(k, k.__name__) for k in kinds)
        raise OptionError(f"{where} {key} must be {wanted}, got {json.dumps(value, default=str)}")  # as TOML spells it
    return value


def _is(value, kind) -> bool:
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _config(at: str, table: dict, fixed: dict):
    """The training config of a stage table: its keys named and typed as the options' flat keys
    (config.py), and the config's own checks run now, long before its stage starts."""
    from qwen2.train.config import TrainConfig, flat_types

    reserved, types = ("out", "task", "resume"), flat_types()
    for key in table:
        if key in reserved:
            raise OptionError(f"{at} {key} is set by the recipe; leave it out")
        if key not in types:
            raise OptionError(f"{at} unknown key {key}; the keys are the options' names with underscores: "
                              f"{', '.join(k for k in types if k not in reserved)}")
        _expect(at, key, table[key], types[key])
    _expect(at, "data", table.get("data", fixed.get("data")), str, required=True)
    config = TrainConfig.from_flat(fixed | table, at)
    try:
        config.check()
    except OptionError as e:
        raise OptionError(f"{at} {e}") from None
    return config


def _align(at: str, task: str, table: dict, folder: Path, policy: str | None, data: str | None):
    if data is None and "data" not in table:
        raise OptionError(f"{at} data is required: add a [data] stage, whose output it trains on, or give data = FILE")
    return _config(at, table, dict(task=task, model=policy, out=str(folder), data=data))


# -- the data and eval commands, through their own parsers ----------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; the recipe names the key
        raise OptionError(message)


def _parser() -> _Parser:
    from qwen2.eval import cli as eval_cli
    from qwen2.train import synth_cli

    root = _Parser(prog="qwen2")
    sub = root.add_subparsers(dest="command", required=True, parser_class=_Parser)
    synth_cli.add_arguments(sub)
    eval_cli.add_arguments(sub)
    return root


def _command_parser(root: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    parser = root
    for word in words:  # argparse keeps its subcommands only on the subparsers action
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return parser


def _parse(at: str, root: _Parser, words: list[str], table: dict, reserved: tuple, extra: list[str]):
    """The namespace `qwen2 WORDS` would get from the table's keys as options, and `extra`."""
    command = _command_parser(root, words)
    options = {o[2:].replace("-", "_"): a for a in command._actions for o in a.option_strings
               if o.startswith("--") and a.help != argparse.SUPPRESS and o != "--help"}
    argv = []
    for key, value in table.items():
        if key in reserved:
            raise OptionError(f"{at} {key} is set by the recipe; leave it out")
        action = options.get(key)
        if action is None:
            keys = ", ".join(k for k in options if k not in reserved)
            raise OptionError(f"{at} unknown key {key}; the keys are `qwen2 {' '.join(words)}`'s options: {keys}")
        flag = "--" + key.replace("_", "-")
        if action.nargs == 0:  # a switch
            argv += [flag] if _expect(at, key, value, bool) else []
        elif action.type in (int, float):
            argv += [flag, str(_expect(at, key, value, action.type))]
        else:  # text, or a parser of its own (token counts, sizes, comma lists)
            value = _expect(at, key, value, str | int | float | list)
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    try:
        return root.parse_args([*words, *argv, *extra])
    except OptionError as e:
        raise OptionError(f"{at} {e}") from None


def _model_flag(model: str | None) -> list[str]:
    return ["--model", model] if model else []


def _data_commands(where: str, root: _Parser, table: dict, folder: Path, policy: str | None) -> list:
    from qwen2.train import synth_cli

    if not table:
        raise OptionError(f"{where}: [data] names no command; add a table [data.COMMAND], COMMAND one of "
                          f"{', '.join(DATA_COMMANDS)}")
    commands = []
    for command, options in table.items():
        at = f"{where}: [data.{command}]"
        if command not in DATA_COMMANDS:
            raise OptionError(f"{at} unknown command; choose from {', '.join(DATA_COMMANDS)}")
        if not isinstance(options, dict):
            raise OptionError(f"{at} must be a table of the command's options, got {options!r}")
        model = _model_flag(policy) if "model" not in options else []  # the policy so far, unless the table names one
        args = _parse(at, root, ["data", command], options, ("out",), ["--out", str(folder / command), *model])
        try:
            synth_cli.check_options(args)  # the command's own checks, now rather than when its stage starts
        except OptionError as e:
            raise OptionError(f"{at} {e}") from None
        commands.append(args)
    return commands


def _checkable(args: argparse.Namespace) -> bool:
    """Whether a data command's problems give online DPO prompts its verifier can check."""
    return args.data_command == "instruct-feedback" or (args.data_command == "reject-sample" and args.source != "asdiv")


def _evals(where: str, root: _Parser, table: dict, folder: Path, before: str | None, after: str | None):
    """The evals of each table, on the recipe's model and (where training changed it) the last policy."""
    from qwen2.eval import cli as eval_cli

    if not table:
        raise OptionError(f"{where}: [eval] names no eval; add a table [eval.NAME], NAME one of {', '.join(EVALS)}")
    runs = []
    for name, options in table.items():
        at = f"{where}: [eval.{name}]"
        if name not in EVALS:
            raise OptionError(f"{at} unknown eval; choose from {', '.join(EVALS)}")
        if not isinstance(options, dict):
            raise OptionError(f"{at} must be a table of the eval's options, got {options!r}")
        pair, sides = [], [("before", before)] + ([("after", after)] if after != before else [])
        for side, model in sides:
            args = _parse(at, root, ["eval", name], options, ("json", "model"),
                          ["--json", str(folder / side / f"{name}.json"), *_model_flag(model)])
            try:
                eval_cli.check_common(args)
            except OptionError as e:
                raise OptionError(f"{at} {e}") from None
            pair.append(args)
        runs.append((name, pair))
    return functools.partial(_run_evals, runs, folder)


# -- what each stage does ----------------------------------------------------------------------

def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _headline(folder: Path) -> dict:
    """The last step's loss and held-out metrics, from the trainer's metrics.jsonl."""
    lines = _lines(folder / "metrics.jsonl")
    last = json.loads(lines[-1]) if lines else {}
    return {k: v for k, v in last.items() if k in ("step", "loss") or k.startswith("eval_")}


def _cut_short(out: str) -> bool:
    """A stage cut short left checkpoints: it continues from the last one, as --resume does."""
    from qwen2.train import checkpoint

    return bool(checkpoint.folders(Path(out)))


def _train(config) -> dict:
    from qwen2.train.trainer import Trainer

    config.checkpoint.resume = _cut_short(config.out)
    Trainer(config).train()
    return _headline(Path(config.out))


def _nothing_to_train() -> dict:
    return {"reward": "verifier"}


def _make_data(commands: list, folder: Path) -> dict:
    from qwen2.train import instruct_feedback, synth, synth_cli

    pairs, prompts, metrics = [], [], {}
    for args in commands:
        args.func(args)
        found = _lines(args.out / "pairs.jsonl")
        pairs += found
        metrics[args.data_command] = {"sft": len(_lines(args.out / "sft.jsonl")), "pairs": len(found)}
        if args.data_command == "instruct-feedback":
            items, _ = instruct_feedback.prompts(args.prompts, args.prompt_seed)
            prompts += [{"prompt": item["task"], "constraints": item["constraints"]} for item in items[: args.limit]]
        elif _checkable(args):
            problems, _, _ = synth_cli.chosen_problems(args)
            prompts += [{"prompt": synth.math_prompt(p), "answer": p["answer"]} for p in problems]
    write_text_atomically(folder / "pairs.jsonl", "".join(line + "\n" for line in pairs))
    synth.write_jsonl(folder / "prompts.jsonl", prompts)
    return {"pairs": len(pairs), "prompts": len(prompts), **metrics}


def _run_evals(runs: list, folder: Path) -> dict:
    from qwen2.eval.cli import cmd_compare

    metrics = {}
    for name, pair in runs:
        for args in pair:
            args.func(args)
        if len(pair) == 1:
            metrics[name] = {"json": str(pair[0].json)}
            continue
        compare = folder / "compare" / f"{name}.json"
        compare.parent.mkdir(parents=True, exist_ok=True)
        cmd_compare(argparse.Namespace(a=pair[0].json, b=pair[1].json, json=compare))
        result = json.loads(compare.read_text(encoding="utf-8"))
        metrics[name] = {k: result[k] for k in ("items", "a", "b", "difference", "ci95", "p")}
    return metrics
