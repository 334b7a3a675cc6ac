"""Prometheus text for GET /metrics: HTTP requests, engine counters, queue and slot gauges, and
time to first token (from the hand-over to the engine, so time waiting for a slot counts)."""

from __future__ import annotations

import bisect
from collections import Counter

from qwen2.engine.async_engine import AsyncEngine

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.http: Counter[tuple[str, int]] = Counter()
        self.rejected: Counter[str] = Counter()  # 4xx answers, by error code
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # the last one is +Inf
        self.ttft_sum = 0.0

    def observe_http(self, route: str, status: int) -> None:
        self.http[route, status] += 1

    def observe_rejected(self, code: str) -> None:
        self.rejected[code] += 1

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds

    def render(self, engine: AsyncEngine) -> str:
        stats, slots = engine.stats, engine.engine.cache.slots
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP qwen2_{name} {help}", f"# TYPE qwen2_{name} {kind}"])
            lines.extend(f"qwen2_{name}{labels} {value}" for labels, value in samples)

        metric("http_requests_total", "counter", "HTTP requests by route and status.",
               [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(self.http.items())])
        for name, counts, help in [
            ("requests_rejected_total", self.rejected, "HTTP requests refused with a 4xx, by error code."),
            ("requests_failed_total", stats.failed, "Sequences ended by a server-side failure, by failed stage."),
            ("requests_cancelled_total", stats.cancelled, "Sequences cancelled, by reason (client_gone, timeout)."),
        ]:
            metric(name, "counter", help, [(f'{{reason="{r}"}}', n) for r, n in sorted(counts.items())])
        metric("engine_up", "gauge", "1 while the engine thread serves requests.", [("", int(engine.alive))])
        for name, value, help in [
            ("requests_total", stats.requests, "Sequences submitted to the engine (n choices count n)."),
            ("requests_finished_total", stats.finished, "Sequences that ended (stop or length)."),
            ("prompt_tokens_total", stats.prompt_tokens, "Prompt tokens submitted."),
            ("prompt_tokens_cached_total", stats.cached_tokens, "Prompt tokens reused from the prefix cache."),
            ("generation_tokens_total", stats.generated_tokens, "Tokens generated."),
        ]:
            metric(name, "counter", help, [("", value)])
        running = engine.running
        for name, value, help in [
            ("queue_depth", engine.waiting, "Sequences waiting for a slot."),
            ("requests_running", running, "Sequences holding a KV slot."),
            ("kv_slots_used", running, "KV cache slots in use."),
            ("kv_slots_total", slots, "KV cache slots (--max-concurrency)."),
            ("kv_usage_ratio", running / slots, "Fraction of KV cache slots in use."),
            ("kv_blocks_used", engine.engine.blocks.usable - engine.engine.blocks.free,
             "KV cache blocks held by running sequences (idle cached prefixes count as free)."),
            ("kv_blocks_total", engine.engine.blocks.usable, "KV cache blocks (--kv-memory)."),
        ]:
            metric(name, "gauge", help, [("", value)])
        cumulative, samples = 0, []
        for bound, count in zip([*map(str, TTFT_BUCKETS), "+Inf"], self.ttft_counts):
            cumulative += count
            samples.append((f'_bucket{{le="{bound}"}}', cumulative))
        samples += [("_sum", round(self.ttft_sum, 6)), ("_count", cumulative)]
        metric("time_to_first_token_seconds", "histogram", "From submission to the engine to the first token.", samples)
        return "\n".join(lines) + "\n"
