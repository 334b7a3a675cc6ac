"""Text embeddings: the model's final hidden state (after the final norm), pooled, L2-normalised.

Pooling follows the checkpoint where it says: sentence-transformers writes 1_Pooling/config.json
beside the weights. Qwen2-architecture embedding models (gte-Qwen2, Qwen3-Embedding) pool the
last token, an <|endoftext|> their tokenizer appends; that is the default. "mean" averages the
input's own tokens (nothing appended).

Inputs of one call share a forward, right-padded: under the causal mask no token attends to a pad
after it, so padding changes nothing but the float noise of the shapes. No KV cache is involved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer

POOLINGS = ("last", "mean")
END_TOKEN = "<|endoftext|>"


def checkpoint_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers folder declares (1_Pooling/config.json), else None."""
    try:
        config = json.loads((path / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("pooling_mode_lasttoken"):
        return "last"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    return None


def input_ids(tokenizer: Tokenizer, ids: list[int], pooling: str) -> list[int]:
    """The tokens the model reads for one input: with last-token pooling, ending in <|endoftext|>."""
    if pooling != "last":
        return ids
    end = tokenizer.token_to_id(END_TOKEN)
    end = tokenizer.eos_token_ids[0] if end is None else end
    return ids if ids and ids[-1] == end else [*ids, end]


def batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Input indices grouped into forwards of at most `budget` padded tokens (a longer input goes
    alone), inputs of similar length together so that little is padding."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def embed(model: Transformer, inputs: list[list[int]], pooling: str = "last") -> torch.Tensor:
    """(N, hidden) float32 unit vectors for N inputs of token ids, in one forward."""
    device = model.model.norm.weight.device
    lengths = torch.tensor([len(x) for x in inputs], device=device)
    width = int(lengths.max())
    tokens = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=device)
    hidden = model.model.norm(model.body(tokens)).float()
    if pooling == "last":
        pooled = hidden[torch.arange(len(inputs), device=device), lengths - 1]
    else:
        real = torch.arange(width, device=device)[None] < lengths[:, None]
        pooled = (hidden * real[..., None]).sum(1) / lengths[:, None]
    return F.normalize(pooled, dim=-1).cpu()


def shorten(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """Matryoshka: the first `dimensions` components, unit length again."""
    return vectors if dimensions is None else F.normalize(vectors[:, :dimensions], dim=-1)
