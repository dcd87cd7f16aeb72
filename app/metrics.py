"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.serving.bank import BankEvents
from app.serving.engine import EngineMetrics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    """HTTP request counts and latencies, plus job and registry gauges refreshed on scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adapterforge_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "adapterforge_http_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.jobs = Gauge("adapterforge_jobs", "Jobs by status", ["status"], registry=self.registry)
        self.adapter_versions = Gauge(
            "adapterforge_adapter_versions", "Live adapter versions in the registry", registry=self.registry
        )
        self.jobs_requeued = Counter(
            "adapterforge_jobs_requeued", "Jobs enqueued again by the reconciler", ["reason"], registry=self.registry
        )
        self.serving = ServingMetrics(self.registry)


class ServingMetrics(EngineMetrics, BankEvents):
    """Generation and adapter-cache metrics, on the app's registry (the engine and bank report here)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "adapterforge_generate_requests",
            "Generations ended, by adapter (name; `base` for none) and reason (stop, length, cancelled, error)",
            ["adapter", "finish_reason"], registry=registry,
        )
        self.prompt_tokens = Counter("adapterforge_prompt_tokens", "Prompt tokens read by a prefill", registry=registry)
        self.generated_tokens = Counter("adapterforge_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("adapterforge_time_to_first_token_seconds", "From request queued to its first token",
                              registry=registry, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("adapterforge_inter_token_latency_seconds", "Between two tokens of one request",
                             registry=registry, buckets=_LATENCY_BUCKETS)
        self.queue_depth = Gauge("adapterforge_generate_queue_depth", "Generation requests waiting", registry=registry)
        self.running_rows = Gauge("adapterforge_generate_running", "Requests in the running batch", registry=registry)
        self.cache = Counter("adapterforge_adapter_cache", "Adapter lookups (one per request per tier) and evictions, by tier (device, host)",
                             ["tier", "event"], registry=registry)
        self.slots = Gauge("adapterforge_adapter_slots_used", "Device adapter slots holding an adapter",
                           registry=registry)

    def queued(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def running(self, rows: int) -> None:
        self.running_rows.set(rows)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, adapter: str | None, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(adapter.partition("@")[0] if adapter else "base", reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)

    def hit(self, tier: str) -> None:
        self.cache.labels(tier, "hit").inc()

    def miss(self, tier: str) -> None:
        self.cache.labels(tier, "miss").inc()

    def evicted(self, tier: str) -> None:
        self.cache.labels(tier, "eviction").inc()

    def slots_used(self, n: int) -> None:
        self.slots.set(n)
