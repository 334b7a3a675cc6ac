"""Tool-call success on real conversations: glaive_toolcall_en_demo (300 conversations with tools,
Apache-2.0, from llamafactory's sdist), each cut at its first assistant turn, which either calls a
function (106) or answers in text (194). The model is asked greedily with the conversation's tools,
and its reply is judged the way the server parses it.

    python bench/tool_calls.py [--model M] [--limit N] [--json out.json]

Settings, one column each (same prompts, same greedy replies where the prompt is the same):
- qwen2.5 template, tags only: calls count only inside <tool_call> tags (the server before bare calls)
- qwen2.5 template, tags or bare: a reply that is only a JSON call to a declared tool counts too (now)
- ChatML, tools dropped: Qwen2-Instruct's template has no tools branch; the server dropped the tools
- ChatML, tools written in: the tools, in Qwen2.5's format, written into the messages (now)
Scores: called (the expected function, when one is expected), exact (its arguments too, as JSON),
false calls (a call where the data answers in text), valid (every call's arguments parse as JSON).
"""

from __future__ import annotations

import argparse
import json
import time

from qwen2.engine.sampling import SamplingParams
from qwen2.loading import load
from qwen2.tokenizer import FALLBACK_CHAT_TEMPLATE
from qwen2.tools import parse_tool_calls
from qwen2.train.datasets import data_path

ROLES = {"human": "user", "gpt": "assistant"}


def cases(limit: int | None) -> list[dict]:
    """Each conversation up to its first assistant turn: messages, tools, and the expected call (or None)."""
    out = []
    for item in json.loads(data_path("glaive_toolcall_en_demo").read_text())[:limit]:
        turns = item["conversations"]
        reply = next(i for i, t in enumerate(turns) if t["from"] in ("gpt", "function_call"))
        expected = json.loads(turns[reply]["value"]) if turns[reply]["from"] == "function_call" else None
        out.append({"messages": [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns[:reply]],
                    "tools": [{"type": "function", "function": f} for f in json.loads(item["tools"] or "[]")],
                    "expected": expected})
    return out


def score(replies: list[str], data: list[dict], bare: bool) -> dict:
    called = exact = false = valid = calls_made = 0
    for text, case in zip(replies, data):
        names = [t["function"]["name"] for t in case["tools"]] if bare else ()
        _, calls = parse_tool_calls(text, names)
        calls_made += bool(calls)
        valid += all(_is_json(c.arguments) for c in calls) if calls else 0
        want = case["expected"]
        if want is None:
            false += bool(calls)
        elif calls and calls[0].name == want["name"]:
            called += 1
            exact += _is_json(calls[0].arguments) and json.loads(calls[0].arguments) == want.get("arguments", {})
    expecting = sum(c["expected"] is not None for c in data)
    return {"called": called / expecting, "exact": exact / expecting,
            "false_calls": false / (len(data) - expecting), "valid": valid / max(calls_made, 1)}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    data = cases(args.limit)
    llm = load(args.model, max_concurrency=16, ctx=8192)
    own_template = llm.tokenizer.chat_template
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    def replies(template: str, with_tools: bool) -> list[str]:
        llm.tokenizer.chat_template = template
        prompts = [llm.tokenizer.apply_chat_template(c["messages"], tools=c["tools"] if with_tools else None)
                   for c in data]
        return [text for _, text in llm.engine.run_all(prompts, [greedy] * len(prompts))]

    start = time.perf_counter()
    own = replies(own_template, True)
    results = {"qwen2.5 template, tags only": score(own, data, bare=False),
               "qwen2.5 template, tags or bare": score(own, data, bare=True),
               "ChatML, tools dropped": score(replies(FALLBACK_CHAT_TEMPLATE, False), data, bare=True),
               "ChatML, tools written in": score(replies(FALLBACK_CHAT_TEMPLATE, True), data, bare=True)}
    expecting = sum(c["expected"] is not None for c in data)
    print(f"{len(data)} conversations ({expecting} expect a call), {args.model or 'the default model'}, greedy, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| setting | called | exact arguments | false calls | valid JSON |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['called']:.1%} | {r['exact']:.1%} | {r['false_calls']:.1%} | {r['valid']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model or "default", "cases": len(data), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
