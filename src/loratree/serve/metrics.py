"""The server's Prometheus metrics, in a registry of their own (one per app).

Requests are counted once each, when they end, by route and HTTP status, so the counters
sum to the requests received. Cache and engine figures are read when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from loratree.serve.engine import Engine
from loratree.tree.cache import AdapterCache

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, engine: Engine, cache: AdapterCache) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loratree_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.adapter_requests = Counter("loratree_adapter_requests",
                                        "generation requests by adapter", ["adapter"],
                                        registry=r)
        self.ttft = Histogram("loratree_time_to_first_token_seconds",
                              "submit to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("loratree_request_latency_seconds",
                                 "submit to last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("loratree_tokens", "tokens by kind (prompt, completion)",
                              ["kind"], registry=r)
        self.in_flight = Gauge("loratree_requests_in_flight",
                               "generation requests admitted and not finished", registry=r)
        r.register(_EngineCollector(engine, cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Queue depth, engine failures and the adapter cache's counters, read at scrape."""

    def __init__(self, engine: Engine, cache: AdapterCache) -> None:
        self.engine, self.cache = engine, cache

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        waiting, running = self.engine.load()
        yield GaugeMetricFamily("loratree_queue_depth", "requests waiting for a batch row",
                                value=waiting)
        yield GaugeMetricFamily("loratree_batch_rows", "requests running in the batch",
                                value=running)
        steps = CounterMetricFamily("loratree_decode_steps",
                                    "decode steps by the number of rows (requests) in them",
                                    labels=["rows"])
        for rows, n in sorted(self.engine.step_rows.items()):
            steps.add_metric([str(rows)], n)
        yield steps
        yield CounterMetricFamily("loratree_engine_faults",
                                  "engine steps or admissions that failed",
                                  value=self.engine.faults)
        stats = self.cache.stats
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"loratree_adapter_cache_{name}",
                                      f"adapter cache {name}", value=getattr(stats, name))
        yield GaugeMetricFamily("loratree_adapter_cache_bytes", "bytes of adapters in RAM",
                                value=stats.bytes)
        yield GaugeMetricFamily("loratree_adapter_cache_budget_bytes",
                                "the adapter cache's byte budget", value=self.cache.budget)
