"""Run under torchrun or alone: load a model as `qwen2` does and write (rank 0) its logits for a
prompt, the greedy text the engine generates, and the bytes of its weights and KV cache per
token on this rank, for the tensor-parallel tests to compare."""

import sys

import torch

from qwen2.loading import load

PROMPT = "def quicksort(arr):"


def shard_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor of the model (a tied head counted once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict(keep_vars=True).values() if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main(model: str, out: str, tokens: int) -> None:
    llm = load(model, quant="none", dtype="float32", ctx=256, max_concurrency=2)
    ids = torch.tensor([llm.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        logits = llm.model(ids)
    done = llm.generate(PROMPT, max_tokens=tokens, temperature=0)
    # a second prompt sharing a prefix: the prefix cache reuses the first request's blocks
    again = llm.generate(PROMPT + "\n    if", max_tokens=tokens, temperature=0)
    torch.save({"logits": logits, "text": done.text, "again": again.text,
                "kv_per_token": llm.engine.cache.bytes_per_token(),
                "weight_bytes": shard_bytes(getattr(llm.model, "net", llm.model))}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
