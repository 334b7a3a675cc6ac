"""Write a model as an HF checkpoint folder that transformers and `load_hf` read:
config.json, model.safetensors (one file, hub naming), tokenizer files, generation_config.json,
each written whole or not at all (qwen2.files): a kill mid-export never leaves a truncated file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from qwen2.config import Qwen2Config
from qwen2.files import write_atomically, write_text_atomically

if TYPE_CHECKING:
    from qwen2.tokenizer import Tokenizer

def generation_defaults(config: Qwen2Config, tokenizer: Tokenizer) -> dict[str, Any]:
    """bos / eos / pad ids; eos lists every end token the config or tokenizer declares
    (Qwen2 instruct models stop on <|im_end|> and on <|endoftext|>)."""
    eos = list(dict.fromkeys([*config.eos_token_ids, *tokenizer.eos_token_ids]))
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def export_hf(config: Qwen2Config, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
              out_dir: str | Path, generation_config: dict | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A tied lm_head is the embedding; transformers re-ties it from tie_word_embeddings.
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    # transformers 5 reads "dtype", 4.x "torch_dtype".
    hf_config = config.to_hf_dict() | {"dtype": dtype, "torch_dtype": dtype}
    write_text_atomically(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    write_atomically(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tokenizer.save(out)
    generation = generation_config if generation_config is not None else generation_defaults(config, tokenizer)
    write_text_atomically(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
