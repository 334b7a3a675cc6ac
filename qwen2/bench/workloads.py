"""The workload: token ids every engine gets, tokenised once by our tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Used only when the cached Wikipedia text (qwen2.eval.data) can't be had.
FALLBACK_SENTENCES = (
    "The river rose slowly through the spring, and the farmers moved their animals to higher ground.",
    "In the city, engineers argued about whether the old stone bridge would hold another flood.",
    "A historian pointed out that it had survived three centuries of storms, wars and neglect.",
    "Meanwhile the market kept its usual hours, selling bread, cheese and the first green vegetables.",
    "Children walked along the embankment after school to watch the brown water carry branches past.",
    "At the observatory on the hill, two astronomers waited for the clouds to clear before midnight.",
    "The library extended its opening hours so that students could prepare for the winter examinations.",
    "Far to the north, a fishing fleet returned early because the forecast promised a violent storm.",
)


def build_workload(model: Path, prompt_tokens: int, concurrency: list[int]) -> dict[str, Any]:
    """The token ids every engine gets: one long prose prompt and distinct short prompts."""
    from qwen2.tokenizer import Tokenizer
    from qwen2.weights.gguf import read_metadata

    tokenizer = Tokenizer.from_gguf_metadata(read_metadata(model))
    try:
        from qwen2.eval.data import wiki_documents

        docs, source = wiki_documents(), "Wikipedia articles (qwen2.eval.data)"
    except Exception as e:  # no network and nothing cached: still English prose, though repetitive
        n = len(FALLBACK_SENTENCES)  # each "document" starts at a different sentence
        docs = [" ".join((FALLBACK_SENTENCES[i:] + FALLBACK_SENTENCES[:i]) * 20) for i in range(n)] * 4
        source = f"built-in prose ({type(e).__name__}: Wikipedia text unavailable)"
    prompt: list[int] = []
    for doc in docs:
        prompt += tokenizer.encode(doc + "\n\n")
        if len(prompt) >= prompt_tokens:
            break
    # short prompts of 16..31 tokens, each the start of a different article (left padding varies)
    starts = [ids for ids in (tokenizer.encode(doc[:400]) for doc in docs[1:64]) if len(ids) >= 32]
    short = [starts[i % len(starts)][:16 + i % 16] for i in range(max(concurrency, default=0))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_ids[0]
    return {"prompt": prompt[:prompt_tokens], "short_prompts": short, "prompt_source": source, "pad_token_id": pad}
