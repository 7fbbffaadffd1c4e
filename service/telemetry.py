"""Prometheus metrics of one app, in the app's own collector registry (two apps in one process never share counters).

Every label has a fixed, small set of values: the number of tasks can grow at run time (adaptation), so no
metric is labelled by task name; per-task traffic belongs in logs, not in time series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

# Latency buckets from 1 ms (an L1 hit) to 30 s (a large batch on a slow CPU).
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SCORES = (-0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)

PHASES = ("queue", "encode_route", "adapter", "generate")
CACHE_TIERS = ("l1", "redis", "regenerated")
REJECT_REASONS = (
    "body_size",
    "invalid",
    "texts",
    "tokens",
    "max_new_tokens",
    "task",
    "low_score",
    "no_task_fits",
    "overload",
    "auth",
    "conflict",
    "unavailable",
)


class Metrics:
    """All metrics of the service; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # Prometheus calls this a registry; in this package "registry" is the task registry (service/registry/).
        self.collectors = CollectorRegistry(auto_describe=True)
        r = self.collectors
        self.request_seconds = Histogram(
            "pha_request_duration_seconds", "HTTP request latency", ["route", "status"], buckets=_SECONDS, registry=r
        )
        self.phase_seconds = Histogram(
            "pha_phase_duration_seconds",
            "time per /predict phase: queue (waiting for a batch), encode_route (encoder + retrieval), "
            "adapter (cache fetch or generation), generate (decoder)",
            ["phase"],
            buckets=_SECONDS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "pha_adapter_cache_lookups", "adapter-set lookups by the tier that answered", ["tier"], registry=r
        )
        self.redis_errors = Counter("pha_redis_errors", "Redis calls that failed (the cache regenerated)", registry=r)
        self.redis_up = Gauge("pha_redis_up", "1 when the last Redis call succeeded, 0 when degraded", registry=r)
        self.route_score = Histogram(
            "pha_route_score", "cosine of the chosen prototype for routed inputs", buckets=_SCORES, registry=r
        )
        self.low_confidence = Counter("pha_low_confidence_routes", "routed inputs below min_route_score", registry=r)
        self.no_fit = Counter(
            "pha_no_task_fits", "routed inputs that fit no task, by why (template, typicality)", ["why"], registry=r
        )
        self.batch_size = Histogram("pha_batch_size", "texts per model call", buckets=_BATCH, registry=r)
        self.in_flight = Gauge("pha_requests_in_flight", "/predict requests being served", registry=r)
        self.rejected = Counter("pha_requests_rejected", "requests refused, by reason", ["reason"], registry=r)
        self.tasks = Gauge("pha_catalog_tasks", "tasks the router knows", registry=r)
        self.catalog_version = Gauge("pha_catalog_version", "version of the task catalogue", registry=r)
        self.registry_version = Gauge("pha_registry_version", "registry version this replica serves", registry=r)
        self.registry_errors = Counter("pha_registry_errors", "registry reads that failed (last good kept)", registry=r)
        self._init_labels()

    def _init_labels(self) -> None:
        """Create every labelled child at 0, so dashboards and rate() see the series before the first event."""
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        for tier in CACHE_TIERS:
            self.cache_lookups.labels(tier)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for why in ("template", "typicality"):
            self.no_fit.labels(why)

    def watch_model_thread(self, busy_seconds: Callable[[], float]) -> None:
        """Export the model thread's busy time, read when scraped (the thread keeps the sum, not a metric)."""
        self.collectors.register(_ReadCounter("pha_model_busy_seconds", _BUSY_HELP, busy_seconds))

    def render(self) -> bytes:
        return generate_latest(self.collectors)


_BUSY_HELP = (
    "seconds the one model thread spent in model calls; rate() is its utilisation: 1 when saturated, and below "
    "that under load the time a batch waits for the event loop between its model calls"
)


class _ReadCounter:
    """A counter whose value another part keeps (a collector, registered once)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())
