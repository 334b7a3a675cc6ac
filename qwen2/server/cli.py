"""`qwen2 serve` (also `python -m qwen2.server`): load a model and serve the OpenAI API.

Binds 127.0.0.1 unless --host says otherwise; with --api-key (or QWEN2_API_KEY) every /v1 route
wants `Authorization: Bearer KEY`; CORS stays off unless --cors-origin names an origin. Bound to
loopback, it answers only to loopback Host names (127.0.0.1, localhost, [::1], any port) plus
those --allowed-hosts lists; bound to another address, to any Host unless --allowed-hosts is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwen2.options import add_engine_options, add_model_options, engine_options, model_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QWEN2_API_KEY"),
                   help="require this Bearer key on /v1 routes (default: $QWEN2_API_KEY)")
    add_engine_options(p, max_concurrency=64, kv_memory_default="a quarter of the available RAM on CPU, half the "
                       "free GPU memory on CUDA; at least one --ctx sequence, at most --max-concurrency of them")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="serve a LoRA adapter (a PEFT "
                   "folder, as `qwen2 train` or peft save it) as the model NAME, beside the base model; repeatable")
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences before new requests get 429")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin "
                   "(repeatable; '*' for any)")
    p.add_argument("--max-body", type=int, default=8 * 2**20, help="largest request body in bytes")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="HOST[:PORT],...", help="Host header "
                   "names to answer to besides the loopback ones, comma-separated or repeated; '*' for any (default: "
                   "loopback names only when bound to loopback, any name otherwise)")
    p.add_argument("--docqa-concurrency", type=int, default=2, help="/v1/docqa requests answered at once; more get "
                   "429 (default %(default)s)")
    p.add_argument("--docqa-timeout", type=float, default=900.0, help="seconds a /v1/docqa request may take, "
                   "parsing included, before it is cancelled (default %(default)g; level 2 reads roughly 350 "
                   "document tokens a second with the default model on two CPU cores)")
    p.add_argument("--replicas", type=int, metavar="N", help="serve N copies of the model behind this one endpoint "
                   "on Ray Serve, each its own engine with an equal share of the CPUs (or one GPU each); requests go "
                   "to the copy whose prefix cache holds their prompt's start, else to the least loaded")
    p.add_argument("--min-replicas", type=int, metavar="N", help="with --replicas: let Ray Serve's autoscaler "
                   "go down to N copies when idle")
    p.add_argument("--max-replicas", type=int, metavar="N", help="with --replicas: and up to N under load")
    p.add_argument("--ray", metavar="ADDRESS|local", help="with --replicas: the Ray cluster to run on (HOST:PORT "
                   "or auto, as `ray start --head` printed; default: a local instance on this machine's CPUs)")
    p.add_argument("--pooling", choices=("last", "mean"), help="/v1/embeddings: pool the last token (with "
                   "<|endoftext|> appended) or the mean of the tokens (default: what the checkpoint's "
                   "1_Pooling/config.json says, else last)")


def model_name(spec: str | None) -> str:
    """The name /v1/models reports: a packaged model's or hub id as given, a local file's stem."""
    from qwen2.weights import locate

    ref = locate(spec)
    return ref.name if ref.kind in ("packed", "hub") else Path(ref.name).stem


def allowed_hosts(bind: str, listed: list[str], loopback: tuple[str, ...]) -> tuple[str, ...] | None:
    """The Host names the server answers to (None: any), from --host and --allowed-hosts."""
    names = tuple(name.strip() for item in listed for name in item.split(",") if name.strip())
    if is_loopback(bind):  # the bound address itself too (127.0.0.2 is loopback but not a default name)
        loopback += () if bind in loopback or f"[{bind}]" in loopback else (bind,)
    elif not names:
        return None
    return loopback + names


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name other than localhost: it may resolve anywhere
        return False


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from qwen2.engine.lora import parse_lora
    from qwen2.errors import OptionError
    from qwen2.loading import load
    from qwen2.server.app import create_app

    engine = engine_options(args)
    if args.max_queue < 0 or args.timeout <= 0 or args.max_body < 1:
        raise OptionError("--max-body must be at least 1, --max-queue at least 0, --timeout positive")
    if args.docqa_concurrency < 1 or args.docqa_timeout <= 0:
        raise OptionError("--docqa-concurrency must be at least 1 and --docqa-timeout positive")
    if not 0 <= args.port <= 65535:
        raise OptionError(f"--port {args.port} is not a TCP port (0..65535)")
    # the server's own log (errors with their tracebacks, which responses never carry)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = model_options(args)
    name = model_name(options.get("model"))
    lora = parse_lora(args.lora, base=name)
    replicated = replica_plan(args, engine)
    if replicated is not None:
        return serve_replicas(args, dict(**options, **engine, lora=lora), settings_for(args, name, options),
                              replicated)
    # Loaded on a thread that then ends: libgomp keeps its idle workers spinning between parallel
    # regions only while it manages no more threads than there are cores, and a team started on
    # the main thread would outlive the load. The engine's own thread would then wake its workers
    # from sleep at every one of a forward's ~600 regions: 48 instead of 33 ms a token on the
    # default model on 2 cores.
    with ThreadPoolExecutor(1, thread_name_prefix="qwen2-load") as pool:
        llm = pool.submit(load, **options, **engine, lora=lora).result()
    settings = settings_for(args, name, options)
    app = create_app(llm, settings)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qwen2 serve: {settings.model_name} at http://{shown}:{args.port}/ (web chat) and "
          f"http://{shown}:{args.port}/v1 (OpenAI API)", flush=True)
    print(llm.engine.kv_budget(), flush=True)
    if lora:
        print(f"LoRA adapters, each a model of its own name: {', '.join(lora)}", flush=True)
    if args.host not in ("127.0.0.1", "::1", "localhost") and not settings.api_key:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


def settings_for(args: argparse.Namespace, name: str, options: dict):
    from qwen2.embeddings import checkpoint_pooling
    from qwen2.server.app import LOOPBACK_HOSTS, Settings
    from qwen2.weights import resolve_model

    return Settings(model_name=name, api_key=args.api_key or None, cors_origins=args.cors_origin,
                    max_queue=args.max_queue, timeout=args.timeout, max_body=args.max_body,
                    allowed_hosts=allowed_hosts(args.host, args.allowed_hosts, LOOPBACK_HOSTS),
                    docqa_concurrency=args.docqa_concurrency, docqa_timeout=args.docqa_timeout,
                    pooling=args.pooling or checkpoint_pooling(resolve_model(options.get("model"))) or "last")


def replica_plan(args: argparse.Namespace, engine: dict):
    """What --replicas and its companions ask for (None: one plain server, no Ray)."""
    from qwen2.distributed.ray_cluster import parse_ray, require_ray
    from qwen2.errors import OptionError

    bounds = (args.min_replicas, args.max_replicas)
    if args.replicas is None and bounds == (None, None):
        if args.ray:
            raise OptionError("--ray says where --replicas run: give --replicas N too")
        return None
    if args.ray and parse_ray(args.ray).workers:
        raise OptionError(f"--ray {args.ray}: --replicas says how many copies run; give --ray local or an address")
    require_ray()
    from qwen2.server.replicas import ReplicaPlan

    counts = [n for n in (args.replicas, *bounds) if n is not None]
    if min(counts) < 1 or (None not in bounds and bounds[0] > bounds[1]):
        raise OptionError("--replicas, --min-replicas and --max-replicas must be at least 1, and "
                          "--min-replicas at most --max-replicas")
    gpus = 1.0 if str(engine.get("device", "")).startswith("cuda") else 0.0
    waiting = engine.get("max_concurrency") or 64
    return ReplicaPlan(replicas=args.replicas or bounds[0] or 1, min_replicas=bounds[0], max_replicas=bounds[1],
                       cpus=0.0, gpus=gpus, max_ongoing=waiting + args.max_queue)


def serve_replicas(args: argparse.Namespace, options: dict, settings, plan) -> None:
    """Start (or join) Ray, deploy the replicas behind one endpoint, serve until interrupted."""
    import dataclasses
    import signal
    import time

    from qwen2.distributed.ray_cluster import cluster_cpus, connect, parse_ray
    from qwen2.server.replicas import deploy

    spec = parse_ray(args.ray or "local")
    ray = connect(spec)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the replicas are taken down below
    largest = max(plan.replicas, plan.max_replicas or 0)
    plan = dataclasses.replace(plan, cpus=cluster_cpus(ray) / largest if not plan.gpus else 1.0)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qwen2 serve: starting {plan.replicas} replicas of {settings.model_name} on Ray "
          f"({plan.cpus:g} CPUs{f', {plan.gpus:g} GPU' if plan.gpus else ''} each)", flush=True)
    from ray import serve

    try:
        deploy(options, settings, plan, args.host, args.port)
        print(f"qwen2 serve: {settings.model_name} at http://{shown}:{args.port}/ (web chat) and "
              f"http://{shown}:{args.port}/v1 (OpenAI API), {plan.replicas} replicas", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # on a shared cluster, take this application down; a local instance goes whole with ray.shutdown
        if not spec.local:
            serve.delete("qwen2")
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    from qwen2.cli import main as qwen2_main

    qwen2_main(["serve", *(sys.argv[1:] if argv is None else argv)])
