"""The flow collector, store and admin routes wired to one control plane: the collector shares
the ADS server's mTLS port, the store is flushed off the event loop every ``flush_interval``
seconds, and the admin address serves ``/flows``, ``/denials`` and ``/report``.

:class:`FlowService` is a :class:`meshward.xds.attached.AttachedService`: the control plane runs
it without importing this package; ``XdsService(..., flows=flows_for(url))`` hands it in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from meshward.flows import query
from meshward.flows.collector import CollectorLimits, FlowCollector
from meshward.flows.store import FlowStore, StoreLimits
from meshward.xds.admin import Route
from meshward.xds.limits import RefusalLog

if TYPE_CHECKING:
    import grpc

    from meshward.xds.controlplane import ControlPlane

log = logging.getLogger("meshward.flows")


def flows_for(url: str, **options: Any) -> Callable[[ControlPlane, Any], FlowService]:
    """What ``XdsService(flows=...)`` takes: a :class:`FlowService` on the store at ``url`` (a
    SQLite file or ``postgresql://...``), built once the control plane exists (the collector
    authorizes callers against it and names them from its policy), its metrics in the control
    plane's registry. ``options``: FlowService's keyword arguments (limits, flush interval)."""

    def build(control: ControlPlane, registry: Any) -> FlowService:
        return FlowService(url, control, registry=registry, **options)

    return build


class FlowService:
    def __init__(
        self,
        url: str,
        control: Any,  # meshward.xds.controlplane.ControlPlane
        *,
        store_limits: StoreLimits | None = None,
        collector_limits: CollectorLimits | None = None,
        flush_interval: float = 1.0,
        registry: Any = None,  # a prometheus_client CollectorRegistry for the flow metrics
    ) -> None:
        self.control = control
        self.store = FlowStore.open(url, store_limits)
        self.collector = FlowCollector(
            self.store,
            authorize=control.authorize,
            resolve=self.resolve,
            limits=collector_limits,
        )
        self.flush_interval = flush_interval
        if registry is not None:
            from meshward.flows.metrics import FlowMetrics

            self.metrics = FlowMetrics(registry)
            self.collector.observers.append(self.metrics.observe)
            self.metrics.add_collector(registry, self.collector.status)
        self._ids: tuple[str, dict[str, str]] = ("", {})
        self._refusals = RefusalLog(log)
        self.reach_cache: dict[Any, Any] = {}  # meshward.flows.report_service

    def add_to(self, server: grpc.aio.Server) -> None:
        self.collector.add_to(server)

    def resolve(self, spiffe_id: str) -> str | None:
        """The workload a caller's SPIFFE ID names (several workloads may share a service
        account: the first by name), or None."""
        policy = self.control.policy
        if self._ids[0] != policy.version:
            td = policy.mesh.trust_domain
            ids: dict[str, str] = {}
            for w in sorted(policy.workloads, key=lambda w: w.ref):
                ids.setdefault(w.spiffe_id(td), w.ref)
            self._ids = (policy.version, ids)
        return self._ids[1].get(spiffe_id)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def flush(self) -> None:
        try:
            await asyncio.to_thread(self.store.flush)
        except sa.exc.SQLAlchemyError as exc:  # logged once a minute: a down database
            self._refusals.refused(  # must not flood the log at every flush
                "flow-store", "write-failed",
                f"flow store write failed (batch dropped): {str(exc).splitlines()[0][:300]}",
                time.monotonic(),
            )  # fmt: skip

    def routes(self) -> dict[str, Route]:
        def handler(fn: Any) -> Route:
            def route(params: dict[str, str]) -> tuple[int, str, bytes]:
                try:
                    rows = fn(self.store, params)
                except query.QueryError as exc:
                    return 400, "text/plain", f"{exc}\n".encode()
                except sa.exc.SQLAlchemyError as exc:
                    return 503, "text/plain", f"flow store: {type(exc).__name__}\n".encode()
                body = json.dumps({"rows": rows}, indent=1, sort_keys=True) + "\n"
                return 200, "application/json", body.encode()

            return route

        def observed(params: dict[str, str]) -> tuple[int, str, bytes]:
            from meshward.flows.suggest_query import observed as rows

            try:
                body = json.dumps(rows(self.store, params), sort_keys=True) + "\n"
            except query.QueryError as exc:
                return 400, "text/plain", f"{exc}\n".encode()
            except sa.exc.SQLAlchemyError as exc:
                return 503, "text/plain", f"flow store: {type(exc).__name__}\n".encode()
            return 200, "application/json", body.encode()

        return {
            "/flows": handler(query.flows),
            "/denials": handler(query.denials),
            "/flows/observed": observed,  # everything `meshward policy suggest` reads
            "/report": self._report_route,
        }

    def _report_route(self, params: dict[str, str]) -> tuple[int, str, bytes]:
        from meshward.flows import report_service

        try:
            document = report_service.build_report(self, params, datetime.now(UTC))
        except query.QueryError as exc:
            return 400, "text/plain", f"{exc}\n".encode()
        except sa.exc.SQLAlchemyError as exc:
            return 503, "text/plain", f"flow store: {type(exc).__name__}\n".encode()
        # compact: a big mesh's report is tens of megabytes, indentation would add a third
        body = json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n"
        return 200, "application/json", body.encode()

    def status(self) -> dict[str, Any]:
        return self.collector.status()

    def close(self) -> None:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            self.store.flush()
        self.store.close()
