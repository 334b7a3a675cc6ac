"""`qwen2 <command>`: a thin dispatcher. Each command parses its options, calls the library,
prints. Every error prints one line and exits non-zero; `--debug` (or QWEN2_DEBUG=1) shows the
traceback of an unexpected one."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qwen2.errors import OptionError, Qwen2Error
from qwen2.options import add_model_options, model_options, parse_bytes, parse_tokens
from qwen2.quant import CHOICES as QUANT_CHOICES
from qwen2.quant import FILE_BLOCK_TYPES

# raw completion takes no repetition penalty, so `--temperature 0` is plain greedy decoding
GENERATE_SAMPLING = dict(max_tokens=256, repetition_penalty=1.0)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_sampling_options(p: argparse.ArgumentParser, **defaults) -> None:
    """Sampling options; those left out take the model's own defaults (Tokenizer.sampling_defaults)."""
    from qwen2.tokenizer import QWEN_SAMPLING

    p.add_argument("--max-tokens", "-n", type=int, default=defaults.get("max_tokens", 512))
    for flags, kind, note in ((("--temperature", "-t"), float, "0 is greedy; "), (("--top-p",), float, ""),
                              (("--top-k",), int, "0 disables; "), (("--repetition-penalty",), float, "")):
        name = flags[0][2:].replace("-", "_")
        given = defaults.get(name)
        shown = given if given is not None else f"the model's generation_config, else Qwen2.5's {QWEN_SAMPLING[name]}"
        p.add_argument(*flags, type=kind, default=given, help=f"{note}default: {shown}")
    p.add_argument("--min-p", type=float, default=defaults.get("min_p"))
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from(args: argparse.Namespace) -> dict:
    """The sampling options given, checked before a model is loaded (a bad value fails at once);
    those not given are left out, for the model's defaults to fill in."""
    from qwen2.engine.sampling import SamplingParams
    from qwen2.tokenizer import QWEN_SAMPLING

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    seed=args.seed, stop=args.stop)
    sampling = {k: v for k, v in sampling.items() if v is not None or k == "seed"}
    SamplingParams(**QWEN_SAMPLING | sampling).validate(vocab_size=0)
    return sampling


def load_llm(args: argparse.Namespace, max_concurrency: int = 1):
    from qwen2.loading import load

    return load(**model_options(args), max_concurrency=max_concurrency)


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = sampling_from(args)
    llm = load_llm(args)
    for piece in llm.generate(prompt, stream=True, **llm.tokenizer.sampling_defaults | sampling):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    sampling = sampling_from(args)
    llm = load_llm(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        pieces = []
        for piece in llm.chat(system + history, stream=True, **sampling):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})

    if not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        if not text:
            raise OptionError("nothing to answer: stdin was empty")
        answer(text)
        return
    print("qwen2 chat: type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            text = input(">>> ").strip()
        except EOFError:
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
        elif text:
            answer(text)


def cmd_info(args: argparse.Namespace) -> None:
    from qwen2.config import Qwen2Config

    if args.plan:
        cmd_plan(args)
        return
    if args.preset == "all":
        raise OptionError("--preset all goes with --plan; name one preset to see its config")
    if args.preset:
        config, weight_bytes, source = Qwen2Config.from_preset(args.preset), None, f"preset {args.preset}"
    else:
        from qwen2.weights import describe

        config, weight_bytes, source = describe(args.model)
    counts = config.num_params()
    print(f"# {source}")
    print(json.dumps(config.to_hf_dict(), indent=2))
    print(f"parameters: total {counts['total']:,}, non-embedding {counts['non_embedding']:,}, "
          f"active per token {counts['active']:,}")
    if not config.tie_word_embeddings:
        output = config.vocab_size * config.hidden_size
        print(f"the output matrix is stored apart from the embedding (untied): {output:,} of those parameters; "
              f"with them shared, as the model was trained, it has {counts['total'] - output:,}")
    if weight_bytes is not None:
        print(f"weights as stored: {weight_bytes:,} bytes ({weight_bytes / 2**20:.1f} MiB)")
    for name, bits in (("bf16", 16), ("float32", 32), ("int8", 8), ("int4", 4)):
        print(f"weights in {name}: {counts['total'] * bits / 8 / 2**30:.2f} GiB")


def cmd_plan(args: argparse.Namespace) -> None:
    from qwen2.config import PRESETS, Qwen2Config
    from qwen2.planner import table

    if args.preset == "all":
        models = [(name, Qwen2Config.from_preset(name)) for name in PRESETS]
    elif args.preset:
        models = [(args.preset, Qwen2Config.from_preset(args.preset))]
    else:
        from qwen2.weights import describe

        config, _, source = describe(args.model)
        models = [(str(source), config)]
    try:
        devices = [int(n) for n in args.devices.split(",")]
    except ValueError:
        raise OptionError(f"--devices takes a count or a list such as 1,2,4,8, got {args.devices!r}") from None
    for i, (name, config) in enumerate(models):
        print(("\n" if i else "") + table(config, name, devices, args.device_memory, args.quant, args.dtype,
                                          args.ctx, args.batch))


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from qwen2.weights import load_checkpoint
    from qwen2.weights.export import export_hf

    if args.output.lower().endswith(".gguf"):
        cmd_convert_gguf(args)
        return
    if args.type is not None:
        raise OptionError("--type is the tensor type of a GGUF file: name the output NAME.gguf, or use --dtype "
                          "for an HF folder")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype or "bfloat16"]
    config, state_dict, tokenizer = load_checkpoint(args.input, dtype=dtype)
    export_hf(config, state_dict, tokenizer, Path(args.output))
    print(f"wrote an HF checkpoint to {args.output}")


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from qwen2.weights import load_checkpoint
    from qwen2.weights.gguf_export import check_target, export_gguf

    if args.dtype is not None:
        raise OptionError("--dtype is for an HF folder; a .gguf output takes --type (f32, f16, bf16, q8_0, q4_k)")
    kind = args.type or "f16"
    path = check_target(args.output, kind)  # before the minutes a large model takes to load
    config, state_dict, tokenizer = load_checkpoint(args.input)
    name = Path(args.input).expanduser().resolve().name.removesuffix(".gguf")
    counts = export_gguf(config, state_dict, tokenizer, path, kind, name=name)
    stored = ", ".join(f"{n} {t}" for t, n in counts.most_common())
    print(f"wrote {path} ({kind}: {stored} tensors; {path.stat().st_size / 2**20:.1f} MiB)")


def build_parser() -> Parser:
    parser = Parser(prog="qwen2", description="Run the Qwen2 model family.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error "
                        "(also QWEN2_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("generate", help="raw text completion (no chat template), streamed to stdout")
    p.add_argument("--prompt", "-p", required=True, help="the text to continue ('-' reads stdin)")
    add_model_options(p)
    add_sampling_options(p, **GENERATE_SAMPLING)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (answers once when stdin is piped)")
    p.add_argument("--system", "-s", help="system prompt (default: the model template's own)")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config, parameter counts and weight sizes")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", "-m", help="as for every command: a .gguf file, an HF "
                   "folder, a packaged model or a hub id (default: the embedded model)")
    g.add_argument("--preset", help="a named preset, e.g. Qwen2-7B ('all' with --plan: every preset)")
    p.add_argument("--plan", action="store_true", help="bytes of weights, KV cache and activations per device, "
                   "whether they fit, and the largest context and batch that do (tensor parallel over --devices)")
    p.add_argument("--devices", default="1", help="--plan: devices sharing the model, or a list: 1,2,4,8")
    p.add_argument("--device-memory", type=parse_bytes, default="80GB", help="--plan: memory of one device "
                   "(default 80GB: binary units, as GPU memory is quoted)")
    p.add_argument("--quant", default="auto", help=f"--plan: a mode of every command's --quant "
                   f"({', '.join(QUANT_CHOICES)}; auto plans float: devices of --device-memory run float) or a "
                   f"GGUF file's block type ({', '.join(FILE_BLOCK_TYPES)}) (default auto)")
    p.add_argument("--dtype", default="bfloat16", help="--plan: float dtype of weights and KV cache (default "
                   "bfloat16)")
    p.add_argument("--ctx", type=parse_tokens, default=8192, help="--plan: tokens per sequence (default 8192)")
    p.add_argument("--batch", type=int, default=1, help="--plan: sequences at once (default 1)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write a model as an HF checkpoint folder (safetensors) or, for an output "
                       "ending in .gguf, as a GGUF file for llama.cpp, Ollama and LM Studio")
    p.add_argument("input", help="a .gguf file, an HF folder, a packaged model or a hub id")
    p.add_argument("output", help="folder to write, or a file NAME.gguf")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="an HF folder's tensors "
                   "(default bfloat16)")
    p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_k"], help="a GGUF's weight matrices "
                   "(default f16); norms, biases and MoE routers stay f32")
    p.set_defaults(func=cmd_convert)

    from qwen2 import bench
    from qwen2.agent import cli as agent_cli
    from qwen2.eval import cli as eval_cli
    from qwen2.server import cli as server_cli
    from qwen2.train import cli as train_cli
    from qwen2.train import merge_cli, synth_cli

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page")
    server_cli.add_arguments(p)
    p.set_defaults(func=server_cli.run)

    p = sub.add_parser("bench", help="our speed beside llama.cpp and transformers, in one run")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)

    eval_cli.add_arguments(sub)
    agent_cli.add_arguments(sub)
    train_cli.add_arguments(sub)
    merge_cli.add_arguments(sub)
    synth_cli.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("QWEN2_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except Qwen2Error as e:
        if debug:
            raise
        print(f"qwen2: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:
        if debug:
            raise
        said = " ".join(str(e).split())[:300]
        print(f"qwen2: internal error: {type(e).__name__}: {said} (this is a bug; rerun with --debug for the "
              "traceback and report it)", file=sys.stderr)
        sys.exit(1)
