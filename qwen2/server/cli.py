"""`qwen2 serve` (also `python -m qwen2.server`): load a model and serve the OpenAI API.

Binds 127.0.0.1 unless --host says otherwise; with --api-key (or QWEN2_API_KEY) every /v1 route
wants `Authorization: Bearer KEY`; CORS stays off unless --cors-origin names an origin.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qwen2.errors import Qwen2Error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="a .gguf file, an HF checkpoint folder, or a hub id "
                   "(default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QWEN2_API_KEY"),
                   help="require this Bearer key on /v1 routes (default: $QWEN2_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=4, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences before new requests get 429")
    p.add_argument("--ctx", type=int, default=8192, help="context length per slot (prompt + reply)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin "
                   "(repeatable; '*' for any)")
    p.add_argument("--max-body", type=int, default=8 * 2**20, help="largest request body in bytes")
    p.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantization (auto: int8 on CPU, none on CUDA)")


def model_name(spec: str | None) -> str:
    if spec is None:
        return "qwen2.5-coder-0.5b-instruct"
    return spec if "/" in spec and not Path(spec).exists() else Path(spec).stem


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from qwen2.engine.llm import load
    from qwen2.server.app import Settings, create_app

    # the server's own log (errors with their tracebacks, which responses never carry)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = load(args.model, dtype=args.dtype, device=args.device, max_slots=args.max_concurrency,
               max_seq_len=args.ctx, quant=args.quant)
    settings = Settings(model_name=model_name(args.model), api_key=args.api_key or None,
                        cors_origins=args.cors_origin, max_queue=args.max_queue, timeout=args.timeout,
                        max_body=args.max_body)
    app = create_app(llm, settings)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qwen2 serve: {settings.model_name} at http://{shown}:{args.port}/ (web chat) and "
          f"http://{shown}:{args.port}/v1 (OpenAI API)", flush=True)
    print(llm.engine.kv_budget(), flush=True)
    if args.host not in ("127.0.0.1", "::1", "localhost") and not settings.api_key:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwen2 serve", description="Serve the OpenAI API and a web chat page.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except Qwen2Error as e:
        print(f"qwen2 serve: error: {e}", file=sys.stderr)
        sys.exit(1)
