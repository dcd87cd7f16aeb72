"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ApiMetrics:
    """HTTP request counts and latencies, plus job and registry gauges refreshed on scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adapterforge_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "adapterforge_http_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.jobs = Gauge("adapterforge_jobs", "Jobs by status", ["status"], registry=self.registry)
        self.adapter_versions = Gauge(
            "adapterforge_adapter_versions", "Live adapter versions in the registry", registry=self.registry
        )
        self.jobs_requeued = Counter(
            "adapterforge_jobs_requeued", "Jobs enqueued again by the reconciler", ["reason"], registry=self.registry
        )
