"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

A registry per app, not the process-wide default: tests start several apps in one process,
and the default registry refuses a second metric of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmforge.inference.engine import Engine

# Seconds; a CPU model spends 10 ms - 1 s per token and up to minutes per request.
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    prompt_tokens: Counter
    generation_tokens: Counter
    latency: Histogram
    time_to_first_token: Histogram
    inter_token_latency: Histogram


def new_metrics(engine: Engine | None) -> Metrics:
    """Counters and histograms the routes update; queue depth and running requests are read
    from ``engine`` whenever /metrics is scraped."""
    reg = CollectorRegistry()
    if engine is not None:
        queue = Gauge("lmforge_queue_depth", "requests waiting for a batch slot", registry=reg)
        queue.set_function(lambda: engine.waiting)
        running = Gauge("lmforge_running_requests", "requests decoding now", registry=reg)
        running.set_function(lambda: engine.active)
    return Metrics(
        reg,
        Counter(
            "lmforge_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=reg,
        ),  # fmt: skip
        Counter("lmforge_prompt_tokens", "prompt tokens processed", registry=reg),
        Counter("lmforge_generation_tokens", "tokens generated", registry=reg),
        Histogram(
            "lmforge_request_latency_seconds",
            "request start to last byte",
            ["endpoint"],
            buckets=_REQUEST_BUCKETS,
            registry=reg,
        ),  # fmt: skip
        Histogram(
            "lmforge_time_to_first_token_seconds",
            "request start to the first token",
            buckets=_TOKEN_BUCKETS,
            registry=reg,
        ),  # fmt: skip
        Histogram(
            "lmforge_inter_token_latency_seconds",
            "time between a request's tokens",
            buckets=_TOKEN_BUCKETS,
            registry=reg,
        ),  # fmt: skip
    )
