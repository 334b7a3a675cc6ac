"""Preference pairs: a prompt and a chosen and a rejected reply, tokenized exactly as at inference.

Records come as JSONL (one per line) or a JSON array, the prompt given one of three ways:
`{"prompt": "text", "chosen": ..., "rejected": ...}`, `{"messages": [...], ...}` (the
conversation before the reply) or llamafactory's sharegpt shape `{"conversations": [...],
"chosen": {"from": "gpt", "value": ...}, ...}` (its dpo_en_demo / dpo_zh_demo sets, by name).
A reply is a string or a message (`content` or `value`). An optional numeric `margin` feeds the
reward model's margin loss; an optional string `group` names pairs that a held-out split keeps on
one side (by default, pairs of one prompt): `qwen2 data instruct-feedback` gives its task, so one
task asked under other constraints is never both trained on and held out.

The prompt is the chat template with the generation prompt, tokenized alone, exactly what the
engine feeds the model; a reply is the template's assistant turn after that prompt, up to and
including its `<|im_end|>`, tokenized alone, exactly the tokens generation produces. So the
prompt's tokens are a prefix of prompt + reply, and a reply that already ends in `<|im_end|>`
does not get a second one. A reply too long for --max-len is cut (the prompt never is).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2.errors import DataError, OptionError, TokenizerError
from qwen2.eval.instructions import prompt_text, validate
from qwen2.tokenizer import Tokenizer
from qwen2.train.data import DataReport, Row, Sample, collate, read_records, to_messages

VERIFIABLE = ("answer", "constraints")


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    where: str  # "file:line", for reports
    margin: float = 0.0
    index: int = 0  # position in its file's pairs (keys the cached reference log-probs)
    check: dict | None = None  # a prompt's verifiable fields ("answer", "constraints"): online DPO's verifier reward
    group: str | None = None  # the record's own held-out group


def heldout_group(pair: Pair) -> str | tuple[int, ...]:
    """A held-out split's group for pairs: the record's `group`, else its prompt, so a held-out
    prompt (or task) is one training never saw."""
    return pair.group if pair.group is not None else tuple(pair.prompt)


def _reply(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content", value.get("value")), str):
        return value.get("content", value.get("value"))
    raise ValueError(f"a reply must be a string or a message with 'content', not {type(value).__name__}")


def prompt_messages(record: dict) -> list[dict]:
    """The conversation before the reply, from any of the three record shapes."""
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError("'prompt' must be a string (or give 'messages')")
        return [{"role": "user", "content": record["prompt"]}]
    if "messages" in record or "conversations" in record:
        messages, _ = to_messages(record)
        if not messages or messages[-1]["role"] == "assistant":
            raise ValueError("the conversation must end with the turn the replies answer, not an assistant turn")
        return messages
    raise ValueError("no prompt: give 'prompt', 'messages' or 'conversations'")


def render_prompt(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return text, tokenizer.encode(text)


def render_reply(tokenizer: Tokenizer, messages: list[dict], prompt_text: str, reply: str) -> list[int]:
    """The tokens of `reply` as the assistant turn after `prompt_text`, its end token included."""
    end = tokenizer.eos_token or "<|im_end|>"
    reply = reply.removesuffix(end)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                         add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently once a reply follows")
    turn = full[len(prompt_text):]
    stop = turn.rfind(end)
    return tokenizer.encode(turn[: stop + len(end)] if stop >= 0 else turn)


def check_prompt(prompt: list[int], max_len: int, max_prompt_len: int | None) -> None:
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, not shorter than --max-len {max_len}")
    if max_prompt_len is not None and len(prompt) > max_prompt_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than --max-prompt-len {max_prompt_len}")


def load_pairs(path: str | Path, tokenizer: Tokenizer, max_len: int, on_bad: str = "error",
               max_prompt_len: int | None = None) -> tuple[list[Pair], DataReport]:
    """The usable pairs of a preference file and a report of the rest; on_bad as for SFT data
    ("error" stops at the first bad record, naming its line; "skip" counts it and goes on).
    A prompt must be shorter than max_len and at most max_prompt_len tokens (a pair whose
    prompt leaves its replies a few tokens teaches little); replies are cut to fit max_len."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such preference data file: {path}")
    pairs, report = [], DataReport()
    for where, record in read_records(path):
        try:
            if isinstance(record, str):
                raise ValueError(record)
            missing = [k for k in ("chosen", "rejected") if k not in record]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            chosen, rejected = _reply(record["chosen"]), _reply(record["rejected"])
            if chosen.strip() == rejected.strip():
                raise ValueError("chosen and rejected are identical")
            messages = prompt_messages(record)
            text, prompt = render_prompt(tokenizer, messages)
            check_prompt(prompt, max_len, max_prompt_len)
            group = record.get("group")
            if group is not None and not isinstance(group, str):
                raise ValueError("'group' must be a string")
            room = max_len - len(prompt)
            pair = Pair(prompt, render_reply(tokenizer, messages, text, chosen)[:room],
                        render_reply(tokenizer, messages, text, rejected)[:room], where,
                        float(record.get("margin", 0.0)), len(pairs), group=group)
        except (ValueError, KeyError, TypeError, TokenizerError) as e:
            reason = f"{where}: {e}"
            if on_bad == "error":
                raise DataError(f"bad preference pair at {reason}; fix it or pass --on-bad-sample skip") from None
            report.bad.append(reason)
            continue
        pairs.append(pair)
    report.kept = len(pairs)
    if not pairs:
        raise DataError(f"{path} holds no usable preference pair ({report.summary()})")
    return pairs, report


def load_prompts(path: str | Path, tokenizer: Tokenizer, max_len: int, on_bad: str = "error",
                 max_prompt_len: int | None = None) -> tuple[list[Pair], DataReport]:
    """The prompts of a file in any of the shapes above (chosen and rejected not needed), as
    pairs whose replies are still to be sampled (online DPO), with what a verifier can check of
    their replies: a gold `answer` (a number or a string) or instruction `constraints`
    (qwen2.eval.instructions), whose sentences are appended to the last turn."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such prompt file: {path}")
    prompts, report = [], DataReport()
    for where, record in read_records(path):
        try:
            if isinstance(record, str):
                raise ValueError(record)
            messages = prompt_messages(record)
            if "constraints" in record:  # asked for in words, as `qwen2 data instruct-feedback` asks
                last = messages[-1]
                messages[-1] = {**last, "content": prompt_text(last["content"], validate(record["constraints"]))}
            _, ids = render_prompt(tokenizer, messages)
            check_prompt(ids, max_len, max_prompt_len)
        except (ValueError, KeyError, TypeError, TokenizerError) as e:
            if on_bad == "error":
                raise DataError(f"bad prompt at {where}: {e}; fix it or pass --on-bad-sample skip") from None
            report.bad.append(f"{where}: {e}")
            continue
        check = {k: record[k] for k in VERIFIABLE if k in record} or None
        prompts.append(Pair(ids, [], [], where, index=len(prompts), check=check))
    report.kept = len(prompts)
    if not prompts:
        raise DataError(f"{path} holds no usable prompt ({report.summary()})")
    return prompts, report


def sequences(pairs: list[Pair]) -> list[Sample]:
    """prompt + chosen for every pair, then prompt + rejected; the reply tokens are the targets."""
    out = []
    for side in ("chosen", "rejected"):
        for p in pairs:
            reply = getattr(p, side)
            out.append(Sample(p.prompt + reply, [0.0] * len(p.prompt) + [1.0] * len(reply), p.where))
    return out


def pair_batch(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (tokens, positions, segments, targets, weights) of `sequences(pairs)`:
    rows 0..n-1 chosen, n..2n-1 rejected."""
    batch = collate([Row([s]) for s in sequences(pairs)], pad_id)
    return batch.tokens, batch.positions, batch.segments, batch.targets, batch.weights


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """True when both map every id to the same token and end on the same ids."""
    if a.vocab_size != b.vocab_size or a.eos_token_ids != b.eos_token_ids:
        return False
    return all(a.id_to_token(i) == b.id_to_token(i) for i in range(a.vocab_size))


def check_tokenizer(policy: Tokenizer, other: Tokenizer, what: str, spec: str | None) -> None:
    """An OptionError unless `other` (the model `what` names) tokenizes as the policy does."""
    if not same_tokenizer(policy, other):
        raise OptionError(f"{what} {spec or 'the default model'} has a different tokenizer than the policy; its "
                          "scores or log-probabilities would be of other tokens: use one of the same model family")
