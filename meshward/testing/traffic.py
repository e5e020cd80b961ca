"""Steady HTTP traffic through sidecars, for fault tests and the soak benchmark.

A :class:`Flow` is one kind of request sent to a local port (usually a sidecar's outbound
listener) together with the status the policy in force gives it. :class:`SteadyTraffic` sends its
flows round-robin at a fixed total rate from a few threads and records every outcome with its
start time, so a fault test can ask "what happened to allowed requests while the control plane
was down" and a benchmark can compute rates and latency percentiles.

Outcomes are classified as the client sees them: ``status`` 0 is a transport failure (refused,
reset, timeout); any HTTP status is recorded with the start of the body, which tells a policy
denial (``RBAC: access denied``, ext_authz's JSON) from a proxy error (``upstream connect
error``, ``no healthy upstream``).
"""

from __future__ import annotations

import http.client
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meshward.lifecycle import StartStop

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Flow:
    name: str
    port: int
    method: str = "GET"
    path: str = "/"
    headers: Mapping[str, str] = field(default_factory=dict)
    expect: int = 200  # what the policy says: 2xx allowed, 401/403 denied

    @property
    def allowed(self) -> bool:
        return 200 <= self.expect < 300


@dataclass(frozen=True)
class Outcome:
    flow: Flow
    started: float  # time.monotonic() when the request was sent
    wall: float  # time.time() at the same instant (to compare with wall-clock instants)
    latency: float  # seconds until the whole response was read (or the failure)
    status: int  # 0: no HTTP response (connection refused/reset, timeout)
    detail: str  # the first bytes of the body, or the exception

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def policy_denial(self) -> bool:
        """A denial Meshward made (Envoy RBAC or ext_authz), not a proxy or transport error."""
        if self.status not in (401, 403):
            return False
        if self.detail.startswith("RBAC: access denied"):  # Envoy's RBAC filter
            return True
        # ext_authz: {"error": "access denied", "policy": ..., "reason": ...}
        return self.detail.startswith("{") and "access denied" in self.detail[:40]

    @property
    def as_expected(self) -> bool:
        return self.status == self.flow.expect


def fetch(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 5.0,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, str]:
    """(status, body start) of one request to 127.0.0.1:port; (0, error) on transport failure.
    With ``connection``, that (keep-alive) connection is used; the caller discards it on 0."""
    own = connection is None
    conn = connection or http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path, headers=dict(headers or {}))
        response = conn.getresponse()
        body = response.read(2048)
        response.read()  # drain whatever is left so the connection can be reused
        return response.status, body.decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        if own:
            conn.close()


class SteadyTraffic(StartStop):
    """Send ``flows`` round-robin at ``rate`` requests/s in total from ``workers`` threads.

    ``keepalive``: each worker keeps one connection per port (the soak); otherwise every request
    opens a fresh connection (fault tests: no stale-connection ambiguity). A kept-alive
    connection that the server closed between requests is retried once on a new connection, as
    every HTTP client does; such requests are counted in :attr:`stale_retries`.
    ``record``: called with every outcome (default: appended to :attr:`outcomes`).
    """

    def __init__(
        self,
        flows: Sequence[Flow],
        *,
        rate: float = 40.0,
        workers: int = 2,
        timeout: float = 5.0,
        keepalive: bool = False,
        record: Callable[[Outcome], None] | None = None,
    ) -> None:
        if not flows:
            raise ValueError("no flows")
        self.flows = list(flows)
        self.rate = rate
        self.workers = workers
        self.timeout = timeout
        self.keepalive = keepalive
        self.outcomes: list[Outcome] = []
        self._record = record or self.outcomes.append
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stale_retries = 0
        self.started_at = 0.0
        self.stopped_at = 0.0

    def start(self) -> SteadyTraffic:
        self.started_at = time.monotonic()
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"traffic-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._threads.clear()
        self.stopped_at = time.monotonic()

    def _run(self, index: int) -> None:
        interval = self.workers / self.rate
        connections: dict[int, http.client.HTTPConnection] = {}
        # Worker i sends every workers-th request of the global round-robin, offset by i.
        next_at = self.started_at + index / self.rate
        sent = 0
        try:
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                flow = self.flows[(index + sent * self.workers) % len(self.flows)]
                sent += 1
                next_at += interval
                self._record(self._send(flow, connections))
        finally:
            for conn in connections.values():
                conn.close()

    def _send(self, flow: Flow, connections: dict[int, http.client.HTTPConnection]) -> Outcome:
        wall, started = time.time(), time.monotonic()
        if not self.keepalive:
            status, detail = fetch(
                flow.port, flow.method, flow.path, flow.headers, timeout=self.timeout
            )
            return Outcome(flow, started, wall, time.monotonic() - started, status, detail)
        conn = connections.get(flow.port)
        reused = conn is not None and conn.sock is not None
        if conn is None:
            conn = connections[flow.port] = http.client.HTTPConnection(
                LOOPBACK, flow.port, timeout=self.timeout
            )
        status, detail = fetch(
            flow.port, flow.method, flow.path, flow.headers, connection=conn, timeout=self.timeout
        )
        if status == 0 and reused and _stale(detail):
            self.stale_retries += 1
            status, detail = fetch(
                flow.port,
                flow.method,
                flow.path,
                flow.headers,
                connection=conn,
                timeout=self.timeout,
            )
        return Outcome(flow, started, wall, time.monotonic() - started, status, detail)

    # -- reading the record --------------------------------------------------------------------
    def between(self, start: float, end: float | None = None) -> list[Outcome]:
        """Outcomes of requests sent in [start, end) (monotonic times)."""
        stop = end if end is not None else float("inf")
        return [o for o in list(self.outcomes) if start <= o.started < stop]

    def wait_for(
        self, predicate: Callable[[Outcome], bool], *, after: float, timeout: float
    ) -> Outcome:
        """The first outcome sent after ``after`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            current = list(self.outcomes)
            for outcome in current[seen:]:
                if outcome.started >= after and predicate(outcome):
                    return outcome
            seen = len(current)
            time.sleep(0.02)
        raise TimeoutError(f"no matching outcome within {timeout}s")


def _stale(detail: str) -> bool:
    return detail.startswith(("RemoteDisconnected", "BrokenPipeError", "ConnectionResetError"))


def wrongly_allowed(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """Requests the policy denies that got through: the failure micro-segmentation exists to
    prevent."""
    return [o for o in outcomes if not o.flow.allowed and o.ok]


def failed_allowed(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """Requests the policy allows that did not get a 2xx."""
    return [o for o in outcomes if o.flow.allowed and not o.ok]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in [0, 1]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def summarize(outcomes: Sequence[Outcome]) -> str:
    """One line per flow: counts by status, for assertion messages."""
    by_flow: dict[str, dict[int, int]] = {}
    for outcome in outcomes:
        counts = by_flow.setdefault(outcome.flow.name, {})
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return "; ".join(
        f"{name}: " + ", ".join(f"{status}x{n}" for status, n in sorted(counts.items()))
        for name, counts in sorted(by_flow.items())
    )
