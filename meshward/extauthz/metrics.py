"""Prometheus metrics for the Check service, served as text on an HTTP ``/metrics`` port.

The per-Check cost is two pre-bound metric updates (a counter and a latency histogram). Cache
statistics live as plain integers in the cache and are copied into metrics by ``sync()`` (at
scrape time in a single process, every half second per worker with ``--workers``), so a cache hit
touches no metric lock. With several worker processes prometheus_client's multiprocess mode
aggregates them (``PROMETHEUS_MULTIPROC_DIR``); the parent process serves the sum.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from meshward.extauthz.authorizer import Authorizer, CheckResult

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
PREFIX = "meshward_extauthz_"
POLICY_ID = PREFIX + "policy_id"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._authorizer: Authorizer | None = None
        self._last: dict[str, int] = {}
        self._sync_lock = threading.Lock()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = None if multiprocess_enabled() else self.registry
        if reg is not None:  # first: a scrape brings the cache counters up to date, then reads
            reg.register(_SyncOnCollect(self))
        self.checks = Counter(
            PREFIX + "checks",
            "Check calls answered, by decision, HTTP status and cache outcome",
            ["decision", "status", "cache"],
            registry=reg,
        )
        self.latency = Histogram(
            PREFIX + "check_duration_seconds",
            "Time to decide one Check inside the service (excluding gRPC transport)",
            ["cache"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.errors = Counter(
            PREFIX + "internal_errors", "Checks denied because the handler raised", registry=reg
        )
        self.cache_hits = Counter(PREFIX + "cache_hits", "Decision cache hits", registry=reg)
        self.cache_misses = Counter(PREFIX + "cache_misses", "Decision cache misses", registry=reg)
        self.cache_evictions = Counter(
            PREFIX + "cache_evictions", "Entries evicted to make room (LRU)", registry=reg
        )
        self.cache_expirations = Counter(
            PREFIX + "cache_expirations", "Entries dropped at their expiry", registry=reg
        )
        self.refused = Counter(
            PREFIX + "refused_checks",
            "Checks refused before any decision (caller not a mesh sidecar, or asking about "
            "another workload); label: reason",
            ["reason"],
            registry=reg,
        )
        self.cache_bytes = Gauge(
            PREFIX + "cache_bytes",
            "Accounted bytes held by the decision cache (bounded by --cache-bytes)",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.cache_size = Gauge(
            PREFIX + "cache_entries",
            "Entries in the decision cache",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.evaluations = Counter(
            PREFIX + "policy_evaluations",
            "Policy evaluations (cache misses and uncacheable checks)",
            registry=reg,
        )
        self.token_verifications = Counter(
            PREFIX + "token_verifications",
            "JWT signature verifications (token cache misses)",
            registry=reg,
        )
        # The version served, as a number (its first 12 hex digits: 48 bits, exact in a float)
        # and not as a label: a multiprocess file keeps every label value it ever held, so a
        # label per version would grow with every policy change. policy_info{version} is
        # derived from it at scrape time (PolicyInfoCollector) with only the versions served.
        self.policy_id = Gauge(
            POLICY_ID,
            "The policy version served, as the integer value of its first 12 hex digits",
            registry=None,  # written to the multiprocess files; policy_info reads it
            multiprocess_mode="liveall",
        )
        self._version = ""
        if reg is not None:
            reg.register(PolicyInfoCollector(self.served_versions))
        self._children: dict[tuple[str, int, str], Any] = {}
        self._latency_children = {c: self.latency.labels(c) for c in ("hit", "miss", "none")}

    def record(self, result: CheckResult, seconds: float) -> None:
        cache = "none" if result.cache_hit is None else ("hit" if result.cache_hit else "miss")
        key = (result.decision, result.http_status, cache)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.checks.labels(*map(str, key))
        child.inc()
        self._latency_children[cache].observe(seconds)

    def attach(self, authorizer: Authorizer) -> None:
        """Report this authorizer's cache and counters at each ``sync()``."""
        self._authorizer = authorizer

    def sync(self) -> None:
        authorizer = self._authorizer
        if authorizer is None:
            return
        stats = authorizer.cache.stats
        current = {
            "hits": stats.hits,
            "misses": stats.misses,
            "evictions": stats.evictions,
            "expirations": stats.expirations,
            "evaluations": authorizer.evaluations,
            "verifications": authorizer.verifier.verifications,
        }
        targets = {
            "hits": self.cache_hits,
            "misses": self.cache_misses,
            "evictions": self.cache_evictions,
            "expirations": self.cache_expirations,
            "evaluations": self.evaluations,
            "verifications": self.token_verifications,
        }
        with self._sync_lock:
            for name, value in current.items():
                delta = value - self._last.get(name, 0)
                if delta > 0:
                    targets[name].inc(delta)
                self._last[name] = value
            self.cache_size.set(len(authorizer.cache))
            self.cache_bytes.set(authorizer.cache.size_bytes)
            version = authorizer.version[:12]
            if version != self._version:
                self.policy_id.set(version_number(version))
                self._version = version

    def served_versions(self) -> dict[str, int]:
        """{version: 1} for the version this process serves (empty before the first sync)."""
        return {self._version: 1} if self._version else {}

    def start_sync_thread(self, interval: float = 0.5) -> threading.Event:
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                self.sync()

        threading.Thread(target=run, name="metrics-sync", daemon=True).start()
        return stop


class _SyncOnCollect(Collector):
    """Brings cache counters up to date just before a scrape reads them (single process)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        self._metrics.sync()
        return []

    def describe(self) -> Iterable[Any]:
        return []


def version_number(version: str) -> int:
    """A policy version's first 12 hex digits as an integer (0 if it is not hex)."""
    try:
        return int(version[:12], 16)
    except ValueError:
        return 0


class PolicyInfoCollector(Collector):
    """``meshward_extauthz_policy_info{version}``: the number of processes serving each policy
    version; only versions served now, so at most one series per worker process."""

    def __init__(self, served: Callable[[], dict[str, int]]) -> None:
        self._served = served

    def collect(self) -> Iterator[Any]:
        info = GaugeMetricFamily(
            PREFIX + "policy_info",
            "Processes serving each policy version (label: its first 12 hex digits)",
            labels=["version"],
        )
        for version, count in sorted(self._served().items()):
            info.add_metric([version], count)
        yield info

    def describe(self) -> Iterable[Any]:
        return []


class _WorkersCollector(Collector):
    """The multiprocess sum, with the workers' numeric policy ids turned into policy_info."""

    def __init__(self, inner: Collector) -> None:
        self._inner = inner

    def served(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for family in self._inner.collect():
            for sample in family.samples:
                if sample.name == POLICY_ID and sample.value > 0:
                    version = f"{int(sample.value):012x}"
                    counts[version] = counts.get(version, 0) + 1
        return counts

    def collect(self) -> Iterator[Any]:
        for family in self._inner.collect():
            if family.name != POLICY_ID:
                yield family

    def describe(self) -> Iterable[Any]:
        return []


def serve_metrics(
    port: int, host: str = "127.0.0.1", *, metrics: Metrics | None = None
) -> tuple[Any, int]:
    """Start the ``/metrics`` HTTP server on a thread: (server, bound port). With multiprocess
    mode on (``--workers``), it serves the sum over every worker process; else ``metrics``."""
    from prometheus_client import start_http_server

    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        inner = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
        workers = _WorkersCollector(inner)
        registry.register(workers)
        registry.register(PolicyInfoCollector(workers.served))
    else:
        assert metrics is not None
        registry = metrics.registry
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_address[1])
