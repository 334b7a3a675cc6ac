"""Eval and data items spread over N engine actors on Ray (`--ray ADDRESS|local[:N]` on `qwen2 eval ...` and
`qwen2 data ...`): the harness drives EngineActors in place of an in-process LLM, as it drives an Endpoint.

Each actor is a process that loads the model once with the run's own load options (qwen2.loading.load),
reserves the cluster's CPUs / N and sets its torch threads to match. A run's items are dealt to the
actors interleaved (item i to actor i mod N, so every actor gets a like mix of long and short ones),
each actor renders chat messages with the model's template and runs its share through its engine's
continuous batching, and streams each reply back as it finishes (a Ray streaming generator; a message
carries every reply finished since the last, so a step that ends several costs one). The driver hands
them to `on_done` on its own thread, so a resumable Results file records items as they finish, as
in-process; which process ran an item changes nothing in its record, so the results file of a --ray run
and of an in-process one resume each other.

`next_token_logprobs` (mmlu's letters, safety's judge) runs the harness's own on the actors. Sampling
parameters with logits processors (functions of this process, e.g. teacher forcing) are refused in one
line rather than run on a copy. An actor that dies (killed, out of memory, its node lost) ends the run
with one line, and the items already recorded stay for the rerun; a fault an option causes on an actor
(a --ctx beyond the model's limit, a prompt too long) is the same one line as in-process.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from qwen2.distributed.ray_cluster import RaySpec, cluster_cpus, cluster_gpus, connect
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import ClusterError, OptionError, Qwen2Error
from qwen2.tokenizer import Tokenizer

PATH_OPTIONS = ("model", "chat_template", "speculative")  # read on the actors: made absolute here


class EngineActors:
    """N engine actors on a Ray cluster; the harness drives them in place of an in-process LLM."""

    def __init__(self, spec: RaySpec, options: dict):
        """options: qwen2.loading.load's keyword arguments, as an in-process run passes them."""
        self.ray = ray = connect(spec)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        use_gpus = cluster_gpus(ray) > 0 and not str(options.get("device") or "").startswith("cpu")
        # by default a model per GPU, else per node: a copy per CPU would hold many models that each
        # decode no faster, their matmuls being memory-bound
        count = spec.workers or (cluster_gpus(ray) if use_gpus else len(nodes))
        # an actor is one process, so it reserves no more than the largest node has
        cpus = min(cluster_cpus(ray) / count, max(node.get("CPU", 0) for node in nodes))
        gpus = min(1.0, cluster_gpus(ray) / count) if use_gpus else 0.0
        self.threads = max(1, int(cpus))
        actor = ray.remote(_Engine).options(num_cpus=cpus, num_gpus=gpus)
        self.actors = [actor.remote(_absolute(options), self.threads) for _ in range(count)]
        try:
            facts = [self._get(a.ready.remote(), i) for i, a in enumerate(self.actors)]  # they load side by side
        except BaseException:
            self.close()
            raise
        first, total = facts[0], cluster_cpus(ray)
        gpu = f" and {gpus:g} GPU" if gpus else ""
        self.nodes = {f["node"] for f in facts}
        self.description = (f"{count} engine actor{'s' if count > 1 else ''} on {len(self.nodes)} Ray node"
                            f"{'s' if len(self.nodes) > 1 else ''} "
                            f"({'local' if spec.local else spec.address}), each with {cpus:g} of its {total} CPUs{gpu} "
                            f"and {self.threads} torch thread{'s' if self.threads > 1 else ''}: model "
                            f"{options.get('model') or 'default'} ({first['dtype']}, {first['device']}, "
                            f"{first['quant']}), at most {options.get('max_concurrency', 64)} sequences at once each, "
                            f"loaded in {max(f['seconds'] for f in facts):.1f}s")

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, an actor's copy: for evals that build token prompts here (mmlu, safety)."""
        return self._get(self.actors[0].tokenizer.remote(), 0)

    def __enter__(self) -> EngineActors:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        """End every actor (their engines and memory with them)."""
        for actor in self.actors:
            self.ray.kill(actor)

    def generate_all(self, prompts: dict, params: Callable[[str], SamplingParams],
                     on_done: Callable[[str, str], None], desc: str) -> None:
        """Every prompt on the actors; `on_done(key, text)` on this thread as each finishes."""
        work = [(key, prompt, params(key)) for key, prompt in prompts.items()]
        if any(sp.logits_processors for _, _, sp in work):
            raise OptionError("--ray runs the model in other processes, which a logits processor (a function of "
                              "this one) cannot reach; this eval runs in-process only (drop --ray)")
        self._stream("generate", work, (), on_done, desc)

    def next_token_logprobs(self, prompts: dict[str, str | list[int]], token_ids: list[int], desc: str,
                            each: Callable[[str, list[float]], None] | None = None) -> dict[str, list[float]]:
        """qwen2.eval.harness.next_token_logprobs, run on the actors."""
        scores: dict[str, list[float]] = {}

        def done(key: str, logprobs: list[float]) -> None:
            scores[key] = logprobs
            if each is not None:
                each(key, logprobs)

        self._stream("next_token_logprobs", list(prompts.items()), (token_ids,), done, desc)
        return scores

    def _stream(self, method: str, work: list, args: tuple, on_done: Callable, desc: str) -> None:
        count = len(self.actors)
        streams = {getattr(actor, method).options(num_returns="streaming").remote(work[i::count], *args): i
                   for i, actor in enumerate(self.actors) if work[i::count]}
        with tqdm(total=len(work), desc=desc, unit="req", dynamic_ncols=True) as bar:
            while streams:
                ready, _ = self.ray.wait(list(streams), num_returns=1)
                for stream in ready:
                    try:
                        chunk = self._get(stream, streams[stream])
                    except StopIteration:
                        del streams[stream]
                        continue
                    for key, value in chunk:
                        on_done(key, value)
                        bar.update()

    def _get(self, ref, i: int):
        """ray.get of an actor's result (or of a stream's next), its faults as one line."""
        ray = self.ray
        try:
            return ray.get(next(ref) if isinstance(ref, ray.ObjectRefGenerator) else ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, Qwen2Error):
                raise e.cause from None  # what went wrong is the user's to fix, as in-process
            raise
        except ray.exceptions.RayError as e:
            said = _reason(e)
            raise ClusterError(f"engine actor {i + 1} of {len(self.actors)} failed ({said}); the items recorded so "
                               "far are kept: rerun to go on from them") from None


class _Engine:
    """One engine actor: the model loaded once, its engine fed the shares the driver deals it."""

    def __init__(self, options: dict, threads: int):
        import torch

        from qwen2.loading import load

        torch.set_num_threads(threads)
        self.fault: Qwen2Error | None = None
        try:
            # on a thread that then ends, as `qwen2 serve` loads: else libgomp's team of this thread outlives
            # the load and the engine's thread wakes its workers from sleep at every parallel region
            with ThreadPoolExecutor(1) as pool:
                self.llm = pool.submit(load, **options).result()
        except Qwen2Error as e:
            self.fault = e  # raised here it would reach the driver as text only; ready() raises it whole

    def ready(self) -> dict:
        if self.fault is not None:
            raise self.fault
        weight = self.llm.model.model.embed_tokens.weight
        import ray

        return dict(dtype=str(weight.dtype).removeprefix("torch."), device=str(weight.device), quant=self.llm.quant,
                    seconds=self.llm.load_seconds, node=ray.get_runtime_context().get_node_id())

    def tokenizer(self):
        return self.llm.tokenizer

    def generate(self, work: list[tuple[str, object, SamplingParams]]) -> Iterator[list[tuple[str, str]]]:
        from qwen2.eval.harness import rendered

        def run(emit: Callable) -> None:
            self.llm.engine.run_all([rendered(self.llm, prompt) for _, prompt, _ in work], [sp for *_, sp in work],
                                    on_finish=lambda i, text: emit((work[i][0], text)))

        yield from _streamed(run)

    def next_token_logprobs(self, work: list[tuple[str, str | list[int]]],
                            token_ids: list[int]) -> Iterator[list[tuple[str, list[float]]]]:
        from qwen2.eval.harness import next_token_logprobs

        yield from _streamed(lambda emit: next_token_logprobs(self.llm, dict(work), token_ids, "next token",
                                                              each=lambda key, lp: emit((key, lp))))


def _streamed(run: Callable[[Callable], None]) -> Iterator[list]:
    """What `run(emit)` emits on its own thread, in chunks of all emitted since the last chunk."""
    emitted: queue.Queue = queue.Queue()
    end, fault = object(), []

    def work() -> None:
        try:
            run(emitted.put)
        except BaseException as e:  # raised on the actor's thread below, where Ray sends it to the driver
            fault.append(e)
        finally:
            emitted.put(end)

    threading.Thread(target=work, daemon=True).start()
    while True:
        chunk = [emitted.get()]
        while not emitted.empty():
            chunk.append(emitted.get())
        if chunk[-1] is not end:
            yield chunk
            continue
        if chunk[:-1]:
            yield chunk[:-1]
        if fault:
            raise fault[0]
        return


def _absolute(options: dict) -> dict:
    """The options with the files they name made absolute: an actor's working folder need not be ours (a
    cluster's nodes must hold them at the same paths)."""
    return {k: str(Path(v).resolve()) if k in PATH_OPTIONS and v and Path(v).exists() else v
            for k, v in options.items()}


def _reason(error: Exception) -> str:
    """The line of a Ray error that says why (its messages run to many lines of ids and tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if getattr(error, "actor_init_failed", False):
        return lines[-1][:300]  # the exception its load raised, at the end of the traceback
    return next((line for line in lines if line.startswith(("The actor is dead because", "Task was killed"))),
                lines[0])[:300]
