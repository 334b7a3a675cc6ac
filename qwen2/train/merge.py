"""Offline model merging with mergekit's semantics: linear, task arithmetic, TIES, DARE (+TIES).

For each tensor, with the base's value b, the MODELs' values x_i and weights w_i:
- linear: sum_i w_i x_i, divided by sum_i w_i when normalizing (the default). No base (a
  --base given serves only as the base of LoRA adapters).
- task arithmetic: b + sum_i w_i (x_i - b); normalizing divides by sum_i w_i (off by default).
- ties: each task vector d_i = x_i - b is trimmed to its int(density * n) largest magnitudes
  (entries tied with the smallest kept magnitude are kept too), weighted; the sign of
  sum_i w_i d_i is elected per entry (>= 0 counts as +); only the weighted entries whose sign
  agrees are summed, divided (normalize, on by default) by the sum of the agreeing weights.
- dare_linear: each d_i keeps an entry with probability `density` and is rescaled by
  1/density (the DARE paper's rescale, mergekit's `rescale: true`; its newer releases can match
  a norm instead), then task arithmetic; dare_ties: the same drop, then the TIES sign election
  (normalize off by default for both). The drop mask of MODEL i for a tensor is
  `torch.rand(shape, generator=Generator().manual_seed(tensor_seed(seed, i, name))) < density`,
  so a merge is reproducible whatever the order tensors are visited in.
A division by a zero sum of weights leaves the sum as it is (as mergekit does). Computation is
in float32 (float64 for float64 tensors); each tensor is stored in the base's dtype for it
(linear: the first MODEL's) or --dtype.

Inputs are HF checkpoint folders and LoRA adapters (merge_io.py). Tensors are read one at a
time from memory-mapped safetensors and written as they are computed; a large tensor (an
embedding) is merged in blocks of rows, so memory holds a few float32 copies of one block
(the running sum and one task vector; for the sign election, one task vector per MODEL) plus
the output tensor, and for TIES the magnitudes of one whole tensor while its threshold is
found. Not covered: SLERP and the other mergekit methods, per-layer weights, tokenizer
merging (the output takes the first MODEL's config and tokenizer).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qwen2.errors import OptionError, WeightsError
from qwen2.files import write_folder_atomically
from qwen2.train.merge_io import Source, copy_side_files, open_source, plan_shards, write_shard

BLOCK_ELEMENTS = 2**24  # a large tensor (an embedding) is merged in blocks of rows of about this many entries


@dataclass(frozen=True)
class Method:
    task_vectors: bool  # False: linear, a mean of the models themselves
    sparsify: str | None  # "magnitude" (TIES trim) or "random" (DARE drop and rescale)
    elect_sign: bool  # TIES: sum only the entries whose sign agrees with the weighted sum's
    normalize: bool  # mergekit's default


METHODS = {
    "linear": Method(False, None, False, True),
    "task_arithmetic": Method(True, None, False, False),
    "ties": Method(True, "magnitude", True, True),
    "dare_linear": Method(True, "random", False, False),
    "dare_ties": Method(True, "random", True, False),
}


def tensor_seed(seed: int, index: int, name: str) -> int:
    """The seed of MODEL `index`'s DARE drop mask for tensor `name`."""
    return (seed * 1_000_003 + zlib.crc32(f"{index}:{name}".encode())) % 2**63


def magnitude_threshold(magnitude: torch.Tensor, density: float) -> float:
    """TIES: the smallest magnitude of the int(density * n) largest (inf: keep none, 0: keep all)."""
    k = int(density * magnitude.numel())
    if k == 0:
        return float("inf")
    return 0.0 if density >= 1 else magnitude.flatten().kthvalue(magnitude.numel() - k + 1).values.item()


def trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the entries whose magnitude reaches `threshold` (those tied with it included)."""
    return torch.where(delta.abs() >= threshold, delta, 0.0)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1 / density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, 0.0)


def merge_tensor(method: Method, tensors: Iterable[torch.Tensor], weights: list[float], base: torch.Tensor | None,
                 density: float = 1.0, normalize: bool | None = None,
                 generators: list[torch.Generator] | None = None,
                 thresholds: list[float] | None = None) -> torch.Tensor:
    """One tensor merged from the MODELs' values (taken one at a time from `tensors`). A block of
    rows of a tensor merges the same way given the whole tensor's TIES `thresholds` and the
    generators left where the previous block's drop masks took them."""
    normalize = method.normalize if normalize is None else normalize
    if not method.task_vectors:
        total = sum(w * x for w, x in zip(weights, tensors))
        return total / sum(weights) if normalize else total
    mixed, deltas = torch.zeros_like(base), []
    for i, (w, x) in enumerate(zip(weights, tensors)):
        delta = x - base
        if method.sparsify == "magnitude":
            delta = trim(delta, magnitude_threshold(delta.abs(), density) if thresholds is None else thresholds[i])
        elif method.sparsify == "random":
            delta = drop(delta, density, generators[i])
        delta *= w
        if method.elect_sign:
            deltas.append(delta)
        else:  # summed as it comes, so only the running sum stays in memory
            mixed += delta
    if method.elect_sign:
        sign = torch.where(sum(deltas) >= 0, 1.0, -1.0).to(base.dtype)
        divisor = torch.zeros_like(base)
        for w, delta in zip(weights, deltas):
            agrees = delta.sign() == sign
            mixed += torch.where(agrees, delta, 0.0)
            divisor += w * agrees.to(base.dtype)
        divisor[divisor == 0] = 1
    else:
        divisor = sum(weights)
        divisor = 1 if abs(divisor) < 1e-8 else divisor
    return base + (mixed / divisor if normalize else mixed)


def ties_threshold(source: Source, base: Source, name: str, work: torch.dtype, step: int, density: float) -> float:
    """The TIES threshold of a whole tensor's task vector, its magnitudes gathered block by block."""
    magnitude = torch.empty(source.shapes[name], dtype=work)
    for start in range(0, magnitude.shape[0], step):
        stop = start + step
        magnitude[start:stop] = (source.rows(name, start, stop).to(work) - base.rows(name, start, stop).to(work)).abs()
    return magnitude_threshold(magnitude, density)


def check_compatible(sources: list[Source]) -> None:
    """One architecture and the same tensor names and shapes everywhere; else name the first difference."""
    ref = sources[0]
    for other in sources[1:]:
        for key in ("architectures", "model_type"):
            if ref.config.get(key) != other.config.get(key):
                raise WeightsError(f"{other.label} is {key} {other.config.get(key)} but {ref.label} is "
                                   f"{ref.config.get(key)}: merging needs checkpoints of one architecture")
        for name in ref.names:
            if name not in other.shapes:
                raise WeightsError(f"tensor {name} of {ref.label} is missing from {other.label}: the checkpoints "
                                   "differ in structure; merge only fine-tunes of one base model")
            if other.shapes[name] != ref.shapes[name]:
                raise WeightsError(f"tensor {name} has shape {list(other.shapes[name])} in {other.label} but "
                                   f"{list(ref.shapes[name])} in {ref.label}: merge only fine-tunes of one base model")
        if extra := [n for n in other.names if n not in ref.shapes]:
            raise WeightsError(f"tensor {extra[0]} of {other.label} is missing from {ref.label}: the checkpoints "
                               "differ in structure; merge only fine-tunes of one base model")


def check_options(method: Method, name: str, n_models: int, weights: list[float], density: float | None,
                  normalize: bool | None, base: str | None) -> None:
    if n_models < 1:
        raise OptionError("give at least one MODEL to merge")
    if method.task_vectors and not base:
        raise OptionError(f"--method {name} merges differences from a base model: give --base")
    if len(weights) != n_models:
        raise OptionError(f"--weights has {len(weights)} value(s) for {n_models} MODEL(s); give one per MODEL")
    if density is not None:
        if method.sparsify is None:
            raise OptionError(f"--density applies to ties, dare_linear and dare_ties, not {name}")
        if not 0 < density <= 1:
            raise OptionError(f"--density must be in (0, 1], got {density}")
    if not method.task_vectors and (method.normalize if normalize is None else normalize) and sum(weights) == 0:
        raise OptionError("the weights sum to 0, so a normalized linear merge is undefined; change --weights or "
                          "pass --no-normalize")


def merge(method_name: str, models: list[str], out: str | Path, base: str | None = None,
          weights: list[float] | None = None, density: float | None = None, normalize: bool | None = None,
          seed: int = 0, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9,
          progress: bool = True) -> dict:
    """Merge `models` (HF folders or LoRA adapters) into an HF folder at `out`; returns a summary."""
    if method_name not in METHODS:
        raise OptionError(f"unknown merge method {method_name!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[method_name]
    weights = [1.0] * len(models) if weights is None else list(weights)
    check_options(method, method_name, len(models), weights, density, normalize, base)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError(f"--out {out} exists and is not an empty folder; choose a new folder")
    start = time.perf_counter()
    with ExitStack() as stack:
        base_source = open_source(base, None, stack, "--base") if base else None
        sources = [open_source(spec, base_source, stack, f"MODEL {spec}") for spec in models]
        check_compatible(([base_source] if method.task_vectors else []) + sources)
        ref = base_source if method.task_vectors else sources[0]
        out_dtype = {name: dtype if dtype is not None and ref.dtypes[name].is_floating_point else ref.dtypes[name]
                     for name in ref.names}

        def merged(name: str) -> torch.Tensor:
            if not ref.dtypes[name].is_floating_point:  # an integer buffer is copied, never averaged
                return ref.tensor(name)
            work = torch.float64 if ref.dtypes[name] == torch.float64 else torch.float32
            generators = [torch.Generator().manual_seed(tensor_seed(seed, i, name)) for i in range(len(sources))]
            d = 1.0 if density is None else density
            shape = ref.shapes[name]
            rows = shape[0] if shape else 1
            step = max(1, BLOCK_ELEMENTS * rows // max(1, math.prod(shape)))
            thresholds = None
            if method.sparsify == "magnitude" and rows > step:
                thresholds = [ties_threshold(s, base_source, name, work, step, d) for s in sources]
            result = torch.empty(shape, dtype=out_dtype[name])
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                values = (s.rows(name, start, stop).to(work) for s in sources)
                b = base_source.rows(name, start, stop).to(work) if method.task_vectors else None
                block = merge_tensor(method, values, weights, b, d, normalize, generators, thresholds)
                if shape:
                    result[start:stop] = block
                else:
                    result = block.to(out_dtype[name])
            return result

        shards = plan_shards([(n, out_dtype[n], ref.shapes[n]) for n in ref.names], max_shard_bytes)

        def write(partial: Path) -> None:
            with tqdm(total=len(ref.names), desc="merge", unit="tensor", disable=not progress) as bar:
                for filename, entries in shards.items():
                    write_shard(partial / filename, entries, merged, bar.update)
            if len(shards) > 1:
                weight_map = {name: f for f, entries in shards.items() for name, _, _ in entries}
                total = sum(e[1].itemsize * math.prod(e[2]) for entries in shards.values() for e in entries)
                (partial / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            config = dict(sources[0].config)
            if dtype is not None:
                name = str(dtype).removeprefix("torch.")
                config |= {"dtype": name, "torch_dtype": name}
            (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_side_files(sources[0].files_folder, partial)
            record = dict(method=method_name, base=base, models=models, weights=weights, density=density,
                          normalize=method.normalize if normalize is None else normalize, seed=seed)
            (partial / "merge.json").write_text(json.dumps(record, indent=2) + "\n")

        # out is absent or empty (checked above): it appears whole, flushed to the disk, or not at all
        write_folder_atomically(out, write)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return dict(out=str(out), method=method_name, tensors=len(ref.names), shards=len(shards), bytes=size,
                seconds=round(time.perf_counter() - start, 2))

