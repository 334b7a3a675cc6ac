"""Training data: chat records rendered by the model's own template, raw text for pretraining,
packing, and the batches the trainer consumes.

Chat records come as JSONL (one per line) or a JSON array, in three shapes converted on read:
`{"messages": [...], "tools": [...]}`, alpaca (`instruction`, `input`, `output`, `system`,
`history`) and sharegpt (`conversations` of `{from, value}`; `function_call` turns become
assistant tool calls, `observation` turns tool results). Loss falls on the assistant turns
only, each one's `<|im_end|>` included, scaled by a turn's `loss_weight` where the data has one.
A conversation is tokenized piece by piece at the turn boundaries, so an assistant turn starts
exactly where inference's generation prompt ends.

Every row the trainer sees carries targets already shifted (the token each position predicts,
or IGNORE) and a segment id per token: samples packed into one row, and documents in a
pretraining block, never attend to each other nor predict across their boundary.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen2.errors import DataError, TokenizerError
from qwen2.tokenizer import Tokenizer

IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    ids: list[int]
    weights: list[float]  # per token: the loss weight of predicting it (0: not a target)
    where: str  # "file:line", for reports


@dataclass
class DataReport:
    """What reading a data file kept and what it could not use, with where."""
    kept: int = 0
    bad: list[str] = field(default_factory=list)  # "file:line: reason"

    def summary(self) -> str:
        shown = "; ".join(self.bad[:5]) + (f"; and {len(self.bad) - 5} more" if len(self.bad) > 5 else "")
        return f"{self.kept} samples kept, {len(self.bad)} bad" + (f" ({shown})" if self.bad else "")


# -- reading records -----------------------------------------------------------------------
def read_records(path: Path) -> Iterator[tuple[str, dict | str]]:
    """(where, record) for each record of a .jsonl or .json file; a record that is not a JSON
    object comes as (where, reason)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); a .json data file holds one array of records") from None
        if not isinstance(records, list):
            raise DataError(f"{path} holds a JSON {type(records).__name__}; a .json data file holds an array "
                            "of records")
        for i, record in enumerate(records, 1):
            yield f"{path.name}:record {i}", record if isinstance(record, dict) else "not a JSON object"
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path.name}:{i}", f"not JSON ({e.msg})"
            continue
        yield f"{path.name}:{i}", record if isinstance(record, dict) else "not a JSON object"


def _text(content) -> str:
    """A message's content: a string, or a list of parts ({"type": "text", "text"/"value": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(str(p.get("text", p.get("value", ""))) for p in content if p.get("type", "text") == "text")
    raise ValueError(f"content of type {type(content).__name__}")


def _tools(tools) -> list[dict] | None:
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        tools = json.loads(tools)
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    return [t if "type" in t else {"type": "function", "function": t} for t in tools]


def to_messages(record: dict) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) from any of the three record shapes; ValueError says what is wrong."""
    if "messages" in record:
        messages = []
        for m in record["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ValueError(f"a message without a known role ({', '.join(ROLES)})")
            message = {"role": m["role"], "content": _text(m.get("content"))}
            for key in ("tool_calls", "loss_weight", "name"):
                if key in m:
                    message[key] = m[key]
            messages.append(message)
        return messages, _tools(record.get("tools"))
    if "conversations" in record:
        messages = []
        for turn in record["conversations"]:
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise ValueError(f"a turn without a known 'from' ({', '.join(SHAREGPT_ROLES)})")
            role, value = SHAREGPT_ROLES[turn["from"]], _text(turn.get("value"))
            if turn["from"] == "function_call":
                call = json.loads(value)
                messages.append({"role": "assistant", "content": "",
                                 "tool_calls": [{"type": "function", "function": call}]})
            else:
                messages.append({"role": role, "content": value})
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages, _tools(record.get("tools"))
    if "instruction" in record and "output" in record:
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        for question, answer in record.get("history") or []:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        return messages, None
    raise ValueError("neither 'messages', 'conversations' nor 'instruction'/'output'")


# -- rendering -----------------------------------------------------------------------------
def render(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None
           ) -> tuple[list[int], list[float]]:
    """Token ids of a conversation and each token's loss weight: the assistant turns' text and
    their end token weigh their `loss_weight` (default 1), everything else 0."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn to learn from")
    full = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
    end = tokenizer.eos_token or "<|im_end|>"
    pieces: list[tuple[str, float]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, add_generation_prompt=False)
        if not (full.startswith(turn) and turn.startswith(prompt) and len(prompt) >= done):
            raise ValueError("the chat template does not render this conversation turn by turn")
        reply = turn[len(prompt):]
        stop = reply.rfind(end)
        target = reply[: stop + len(end)] if stop >= 0 else reply
        pieces += [(full[done:len(prompt)], 0.0), (target, float(message.get("loss_weight", 1.0)))]
        done = len(prompt) + len(target)
    pieces.append((full[done:], 0.0))
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in pieces:
        if text:
            piece = tokenizer.encode(text)
            ids += piece
            weights += [weight] * len(piece)
    return ids, weights


def load_chat(path: str | Path, tokenizer: Tokenizer, max_len: int, on_bad: str = "error"
              ) -> tuple[list[Sample], DataReport]:
    """The usable samples of a chat data file and a report of the rest. on_bad "error" raises a
    DataError at the first bad record (naming its line); "skip" counts it and goes on."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    samples, report = [], DataReport()
    for where, record in read_records(path):
        try:
            if isinstance(record, str):
                raise ValueError(record)
            ids, weights = render(tokenizer, *to_messages(record))
            if len(ids) > max_len:
                raise ValueError(f"{len(ids)} tokens, longer than --max-len {max_len}")
            if not any(weights):
                raise ValueError("no token carries a loss (every assistant turn has loss_weight 0)")
        except (ValueError, KeyError, TypeError, TokenizerError) as e:
            reason = f"{where}: {e}"
            if on_bad == "error":
                raise DataError(f"bad sample at {reason}; fix it or pass --on-bad-sample skip") from None
            report.bad.append(reason)
            continue
        samples.append(Sample(ids, weights, where))
    report.kept = len(samples)
    if not samples:
        raise DataError(f"{path} holds no usable sample ({report.summary()})")
    return samples, report


def load_corpus(path: str | Path, tokenizer: Tokenizer, block: int) -> list[Sample]:
    """Pretraining blocks of `block` tokens from a text file or a folder of .txt/.jsonl files.
    Documents (a .txt file's parts between end-of-text markers, or a JSONL record's "text")
    are joined with the end-of-text token; a block may hold several, kept apart by segments."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"no text to pretrain on at {path}: give a .txt or .jsonl file or a folder of them")
    eot = tokenizer.bos_token or "<|endoftext|>"
    eot_id = tokenizer.encode(eot)
    ids: list[int] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        docs = [json.loads(line).get("text", "") for line in text.splitlines() if line.strip()] \
            if f.suffix == ".jsonl" else text.split(eot)
        for doc in docs:
            if doc.strip():
                ids += tokenizer.encode(doc.strip()) + eot_id
    blocks = [ids[i: i + block] for i in range(0, len(ids) - 1, block)]
    return [Sample(b, [1.0] * len(b), f"{path.name}:block {i}") for i, b in enumerate(blocks) if len(b) > 1]


# -- rows and batches ------------------------------------------------------------------------
@dataclass
class Row:
    samples: list[Sample]

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self.samples)


def make_rows(samples: list[Sample], max_len: int, pack: bool, seed: int, epoch: int) -> list[Row]:
    """This epoch's rows: the samples in a seeded order, packed greedily up to max_len tokens each."""
    order = list(range(len(samples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rows: list[Row] = []
    for i in order:
        if pack and rows and len(rows[-1]) + len(samples[i].ids) <= max_len:
            rows[-1].samples.append(samples[i])
        else:
            rows.append(Row([samples[i]]))
    return rows


def split(items: list, heldout: float, seed: int, group: Callable[[object], Hashable] = id) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle of the groups (items of one `group` key stay on one side),
    groups from its end held out until they hold the `heldout` fraction of the items (at least one)."""
    groups: dict[Hashable, list] = {}
    for item in items:
        groups.setdefault(group(item), []).append(item)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n = max(1, round(len(items) * heldout)) if heldout > 0 and len(items) > 1 else 0
    held: list = []
    while order and len(held) < n:
        held = order.pop() + held
    return [item for g in order for item in g], held


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T), restarting at each sample
    segments: torch.Tensor  # (B, T), one id per sample in a row
    targets: torch.Tensor  # (B, T): the token each position predicts, or IGNORE
    weights: torch.Tensor  # (B, T) float: the loss weight of each target

    @property
    def target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def collate(rows: list[Row], pad_id: int) -> Batch:
    """Right-padded tensors; a position predicts the next token of its own sample only."""
    width = max(len(r) for r in rows)
    shape = (len(rows), width)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    segments = torch.full(shape, -1, dtype=torch.long)  # padding is a segment of its own
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    weights = torch.zeros(shape)
    for b, row in enumerate(rows):
        at = 0
        for seg, s in enumerate(row.samples):
            n = len(s.ids)
            tokens[b, at: at + n] = torch.tensor(s.ids)
            positions[b, at: at + n] = torch.arange(n)
            segments[b, at: at + n] = seg
            w = torch.tensor(s.weights[1:])
            targets[b, at: at + n - 1] = torch.where(w > 0, torch.tensor(s.ids[1:]), IGNORE)
            weights[b, at: at + n - 1] = w
            at += n
    return Batch(tokens, positions, segments, targets, weights)
