"""The options of every command that runs a model, defined once.

`qwen2.loading.load()` takes them as keyword arguments with the defaults below, and every
command (generate, chat, serve, eval, bench, and those added later) adds them to its parser
with `add_model_options` and hands them over with `model_options(args)`. Kept free of torch
so that `qwen2 --help` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from qwen2 import quant

DTYPES = ("auto", "float32", "bfloat16", "float16")
# which kernels run beside torch's: "auto" (ours where torch has none), or "triton" (on CUDA, our
# Triton kernels for int4 layers and for the decode step around the matrix products too)
KERNELS = ("auto", "triton")
# A limit, not a reservation: the paged KV cache takes blocks as a sequence grows, so the default
# is Qwen2's native 32K window (or the model's limit if smaller) and costs nothing until used.
DEFAULT_CTX = 32768


@dataclass(frozen=True)
class ModelOptions:
    model: str | None = None  # None: the embedded default
    dtype: str = "auto"
    device: str | None = None  # None: cuda if present, else cpu
    quant: str = "auto"
    ctx: int | None = None  # KV cache tokens per sequence; None: DEFAULT_CTX, or the model's limit if smaller
    rope_scaling: str | None = None
    dca: str | None = None
    speculative: str | None = None
    chat_template: str | None = None  # a jinja file replacing the model's chat template
    kernels: str = "auto"  # one of KERNELS


DEFAULTS = ModelOptions()


def parse_tokens(text: str) -> int:
    """A positive token count: "2k" is 2048, "32K" 32768, "1m" 1048576, "1500" 1500."""
    text = text.strip().lower()
    scale = {"k": 2**10, "m": 2**20}.get(text[-1:], 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 4k or 1m)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return value


def parse_bytes(text: str) -> int:
    """A positive memory size: "4G" or "4GiB" is 4 * 2**30 bytes, "512M" 512 * 2**20, "1.5g" allowed."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = raw[-1:] if raw[-1:] in units else ""
    try:
        value = float(raw[: len(raw) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 4G or 512M)") from None
    if not 1 <= value < 2**60:
        raise argparse.ArgumentTypeError(f"memory sizes must be positive and finite, got {text!r}")
    return int(value)


def add_model_options(p: argparse.ArgumentParser, ctx: bool = True, speculative: bool = True) -> None:
    """--model, --dtype, --device, --quant, --rope-scaling, --dca, --kernels, --chat-template and, where
    the command takes them, --ctx and --speculative. Defaults are load()'s: an option left out is None here and
    is not passed on."""
    keep = dict(default=None)
    p.add_argument("--model", "-m", **keep, help="a .gguf file, an HF checkpoint folder, a packaged model "
                   "(qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct) or a hub id such as "
                   "Qwen/Qwen2-0.5B-Instruct (default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--dtype", choices=DTYPES, **keep, help=f"compute dtype (default {DEFAULTS.dtype}: float32 "
                   "on our GGUF block kernels; otherwise bf16 where the CPU multiplies bf16 natively and on "
                   "CUDA, else float32)")
    p.add_argument("--device", **keep, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--quant", choices=quant.CHOICES, **keep, help=f"how weights are held (default "
                   f"{DEFAULTS.quant}: a GPTQ/AWQ folder its own int4; on CPU a GGUF's own blocks (gguf) and "
                   f"Q8_0 blocks for an HF checkpoint, through our kernels; on CUDA a GGUF's own blocks through "
                   f"our Triton kernels, none (float) for an HF checkpoint). "
                   f"{quant.describe()}")
    if ctx:
        p.add_argument("--ctx", type=parse_tokens, **keep, help=f"KV cache tokens per sequence, prompt and "
                       f"reply together, e.g. 4096 or 32k (default {DEFAULT_CTX}, or the model's context limit "
                       "if smaller)")
    p.add_argument("--rope-scaling", **keep, help="e.g. yarn:4 (static YaRN: extends the context but changes "
                   "outputs on short prompts too, so it is off unless asked for)")
    p.add_argument("--dca", **keep, help="dual chunk attention CHUNK[:LOCAL], e.g. 32768:4096")
    p.add_argument("--kernels", choices=KERNELS, **keep, help=f"on CUDA, 'triton' runs int4 layers (--quant int4, "
                   "GPTQ/AWQ folders) and the decode step's attention, norms and SiLU on our Triton kernels instead "
                   f"of torch's (default {DEFAULTS.kernels}: torch's; not yet measured against them on a GPU)")
    p.add_argument("--chat-template", **keep, metavar="FILE", help="a jinja chat template to use instead of the "
                   "model's (HF's variables: messages, tools, add_generation_prompt; a template without a tools "
                   "branch still serves tools, written in Qwen2.5's format)")
    if speculative:
        p.add_argument("--speculative", **keep, help="'ngram' (prompt lookup) or a draft model (same "
                       "tokenizer), for greedy decoding")


def add_engine_options(p: argparse.ArgumentParser, max_concurrency: int, kv_memory_default: str,
                       old_flag: str | None = None) -> None:
    """--max-concurrency and --kv-memory, for every command that runs the engine (load()'s
    max_concurrency and kv_memory). `old_flag`: this command's former name for --max-concurrency,
    still accepted (hidden) for a release."""
    p.add_argument("--max-concurrency", type=int, default=max_concurrency, help="sequences decoded together at "
                   "most; they share the KV cache, so this caps the batch, not the memory (default %(default)s)")
    p.add_argument("--kv-memory", type=parse_bytes, default=None, help="memory for the KV cache all sequences "
                   f"share, e.g. 4G (default: {kv_memory_default})")
    if old_flag:  # the old name still works, unlisted
        p.add_argument(old_flag, dest="max_concurrency", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine options given on the command line, as load() keyword arguments."""
    if args.max_concurrency < 1:
        from qwen2.errors import OptionError

        raise OptionError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    return dict(max_concurrency=args.max_concurrency, kv_memory=args.kv_memory)


def model_options(args: argparse.Namespace) -> dict:
    """The model options given on the command line, as load() keyword arguments."""
    return {k: getattr(args, k) for k in asdict(DEFAULTS) if getattr(args, k, None) is not None}
