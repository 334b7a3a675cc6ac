"""Preference pairs graded by the verifier, from a `qwen2 data instruct-feedback` run's samples.

    python bench/graded_pairs.py SAMPLES_DIR OUT.jsonl

instruct-feedback's own pairs.jsonl pairs a reply meeting every constraint with one that does not,
which the default model's replies rarely allow (18% met every constraint). Here every prompt's
replies are ranked by the share of their constraints met (strict verdicts, as recorded), and the
best is paired with the worst, the second best with the second worst, while the shares differ: the
chosen reply is verifiably better, by at least one constraint. No reply is used twice. The reward
model bench (`bench/align.py rm --data OUT.jsonl`) trains and holds out on these.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def graded_pairs(prompts: dict[str, str], records: list[dict]) -> list[dict]:
    by_item: dict[str, list[tuple[float, str]]] = {}
    for r in records:
        by_item.setdefault(r["item"], []).append((sum(r["strict"]) / len(r["strict"]), r["reply"]))
    pairs = []
    for item, scored in by_item.items():
        ranked = sorted(dict((reply, share) for share, reply in scored).items(), key=lambda x: -x[1])
        for (good, high), (bad, low) in zip(ranked[: len(ranked) // 2], reversed(ranked[len(ranked) // 2:])):
            if high > low:
                pairs.append({"messages": [{"role": "user", "content": prompts[item]}], "chosen": good,
                              "rejected": bad, "shares": [high, low]})
    return pairs


def main() -> None:
    from qwen2.train.instruct_feedback import prompts

    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    lines = (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    settings = json.loads(lines[0])["settings"]
    items, _ = prompts(None, settings["prompt_seed"])
    pairs = graded_pairs({item["id"]: item["prompt"] for item in items}, [json.loads(line) for line in lines[1:]])
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    asked = {p["messages"][0]["content"] for p in pairs}
    print(json.dumps({"out": str(out), "pairs": len(pairs), "prompts": len(asked)}))


if __name__ == "__main__":
    main()
