"""Prometheus metrics of one server, in a registry of its own (``GET /metrics``).

Counted as they happen: requests by API, endpoint, model and status; prompt and generated tokens,
time to first token and request latency, per model (a job's name, or ``base``). Read from the
scheduler at each scrape: running and waiting requests per model, rows per decode step (the batch
size, shared by every job in the batch), finished, cancelled and failed rows, KV-cache bytes,
registered jobs, open HTTP connections. Model labels come only from registered jobs (a request
for an unknown model counts under ``model=""``), so clients cannot grow the label set.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .engine import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """The server's metrics: counters and histograms updated by the APIs and the generations,
    gauges read from the scheduler when scraped."""

    def __init__(self, scheduler: Scheduler, jobs: Callable[[], int], kv_cache_bytes: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "offsite_serving_requests",
            "Requests answered, by API, endpoint, model and status",
            ["api", "endpoint", "model", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "offsite_serving_prompt_tokens", "Prompt tokens of finished generations", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "offsite_serving_generation_tokens", "Tokens generated (handed out)", ["model"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "offsite_serving_time_to_first_token_seconds",
            "From queueing to the first sampled token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "offsite_serving_request_latency_seconds",
            "From queueing to the end of a generation that finished",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.connections: Callable[[], int] | None = None  # set by the HTTP server
        self.registry.register(_SchedulerCollector(self, scheduler, jobs, kv_cache_bytes))

    def count_request(self, api: str, endpoint: str, model: str | None, status: str) -> None:
        self.requests.labels(api, endpoint, model or "", status).inc()

    def observe_generation(self, model: str, generation) -> None:
        """A generation has ended (``generation``: :class:`.generation.Generation`)."""
        request = generation.request
        self.prompt_tokens.labels(model).inc(generation.prompt_tokens)
        self.generation_tokens.labels(model).inc(generation.completion_tokens)
        if request.first_token_at is not None:
            self.time_to_first_token.labels(model).observe(request.first_token_at - request.submitted)
        if not generation.failed:
            self.latency.labels(model).observe(time.perf_counter() - request.submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector:
    """Gauges and counters read from the scheduler at each scrape."""

    def __init__(
        self, metrics: ServingMetrics, scheduler: Scheduler, jobs: Callable[[], int], kv_cache_bytes: Callable[[], int]
    ) -> None:
        self.metrics, self.scheduler, self.jobs, self.kv_cache_bytes = metrics, scheduler, jobs, kv_cache_bytes

    def describe(self):
        return []

    def collect(self):
        by_model = self.scheduler.load_by_model()
        running = GaugeMetricFamily("offsite_serving_running_requests", "Requests decoding now", labels=["model"])
        waiting = GaugeMetricFamily(
            "offsite_serving_queue_depth", "Requests waiting for a batch slot", labels=["model"]
        )
        for model, (active, queued) in sorted(by_model.items()):
            running.add_metric([model], active)
            waiting.add_metric([model], queued)
        yield running
        yield waiting
        stats = self.scheduler.snapshot()
        yield _histogram(
            "offsite_serving_batch_size",
            "Rows per decode step (all jobs of the step together)",
            stats.histogram,
            BATCH_BUCKETS,
        )
        for name, value, text in (
            ("finished", stats.finished, "Rows that ended (cancelled ones included)"),
            ("cancelled", stats.cancelled, "Rows cancelled (client gone, stop sequence)"),
            ("failed", stats.errors, "Rows that failed (alone)"),
            ("decode_steps", stats.steps, "Decode steps"),
        ):
            yield CounterMetricFamily(f"offsite_serving_{name}", text, value=value)
        yield GaugeMetricFamily(
            "offsite_serving_kv_cache_bytes", "Bytes held by the KV cache", value=self.kv_cache_bytes()
        )
        yield GaugeMetricFamily("offsite_serving_jobs", "Registered jobs", value=self.jobs())
        if self.metrics.connections is not None:
            yield GaugeMetricFamily(
                "offsite_serving_http_connections", "Open HTTP connections", value=self.metrics.connections()
            )


def _histogram(
    name: str, documentation: str, counts: dict[int, int], buckets: tuple[int, ...]
) -> HistogramMetricFamily:
    """A Prometheus histogram of exact observations ``value -> count``."""
    cumulative = [(str(bound), sum(c for v, c in counts.items() if v <= bound)) for bound in buckets]
    cumulative.append(("+Inf", sum(counts.values())))
    return HistogramMetricFamily(
        name, documentation, buckets=cumulative, sum_value=sum(v * c for v, c in counts.items())
    )
