"""Does the model under evaluation say it was trained on data built from this eval's items?

`qwen2 data reject-sample|exec-feedback --source asdiv|humaneval|gsm-symbolic` record
`contaminates: <eval>` in the settings on samples.jsonl's first line, and `qwen2 train ...`
writes train_config.json with its `data` path beside the model it saves. `sources` follows
those records back from a model folder: the run's train_config.json (in the folder, or up to
two folders above it, where checkpoints/step-N sits), the samples.jsonl beside the file or in
the folder its `data` names, and, the same way, every run whose output it started from or
learnt against (`model`, `ref`, `base`, `reward_model`).

What it cannot see: a model trained elsewhere, copied without its train_config.json, or given
as a file (a GGUF) rather than a run's folder; a `data` path that was relative to another
working directory or has since moved; data made by other tools, or edited after the data
command wrote it; a problems file (--problems) that holds this eval's items under another name.
So a silent check is no proof of a clean score. It warns; it never stops an eval.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ANCESTORS = ("model", "ref", "base", "reward_model")  # train_config.json fields naming another model


def _train_config(model: Path) -> Path | None:
    for folder in (model, model.parent, model.parent.parent):
        if (folder / "train_config.json").is_file():
            return folder / "train_config.json"
    return None


def _contaminates(data: Path) -> tuple[str, Path] | None:
    """The eval a data command's settings name, and its samples.jsonl, for a data file or folder."""
    samples = (data if data.is_dir() else data.parent) / "samples.jsonl"
    try:
        with samples.open(encoding="utf-8") as f:
            settings = json.loads(f.readline()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return None
    found = settings.get("contaminates") if isinstance(settings, dict) else None
    return (found, samples) if isinstance(found, str) else None


def sources(model: str | Path | None, eval_name: str) -> list[Path]:
    """The samples.jsonl files, built from `eval_name`'s items, that `model` was trained on
    (directly or through the runs it started from); empty when none can be seen."""
    found, todo, seen = [], [model], set()
    while todo:
        path = todo.pop()
        config_path = _train_config(Path(path)) if path and Path(path).is_dir() else None
        if config_path is None or config_path.resolve() in seen:
            continue
        seen.add(config_path.resolve())
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        hit = _contaminates(Path(config["data"])) if isinstance(config.get("data"), str) else None
        if hit is not None and hit[0] == eval_name:
            found.append(hit[1])
        todo += [config[k] for k in ANCESTORS if isinstance(config.get(k), str)]
    return found


def warn(model: str | Path | None, eval_name: str) -> None:
    """One stderr line when `sources` finds any: the score is then not a held-out one."""
    found = sources(model, eval_name)
    if found:
        print(f"# warning: {model} was trained on data built from the {eval_name} eval's own items "
              f"({', '.join(map(str, found))}); its {eval_name} score is not a held-out one", file=sys.stderr)
