"""The whole control plane as one object: ADS server + control plane + admin endpoint + policy
watcher, started in-process (:class:`XdsService` on a running loop, :class:`XdsServiceThread` from
synchronous code such as the demo and the tests) or as a process (``meshward xds serve``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from meshward.lifecycle import StartStop
from meshward.policy import PolicySet
from meshward.telemetry.fleet import MAX_NODE_SERIES
from meshward.xds.admin import AdminServer
from meshward.xds.attached import AttachedService, AttachedServiceFactory
from meshward.xds.controlplane import ControlPlane, WorkloadCompiler, server_spiffe_id
from meshward.xds.fleetcounts import metrics_view
from meshward.xds.jwks import JwksCache, jwks_uris
from meshward.xds.limits import NodeLimits
from meshward.xds.metrics import XdsMetrics
from meshward.xds.nodeid import InvalidNodeId, NodeId
from meshward.xds.server import AdsServer
from meshward.xds.status import DEFAULT_DRIFT_THRESHOLD

log = logging.getLogger("meshward.xds")
T = TypeVar("T")


def split_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class XdsService:
    def __init__(
        self,
        policy: PolicySet | None,
        ca: Any,  # meshward.certs.CertificateAuthority
        compiler: WorkloadCompiler,
        *,
        listen: str = "127.0.0.1:0",
        admin: str | None = "127.0.0.1:0",
        svid_ttl: timedelta = timedelta(hours=1),
        drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
        policy_paths: Sequence[str | Path] | None = None,
        watch_interval: float = 0.5,
        schedule: Any = None,
        limits: NodeLimits | None = None,
        join_listen: str | None = None,
        state_dir: Path | None = None,
        flows: AttachedServiceFactory | None = None,
        history_dir: Path | None = None,
        history_keep: int = 20,
        compile_on_start: bool = False,
    ) -> None:
        """``policy``: the policy set to serve, or None with ``policy_paths`` (loaded now, so an
        invalid set raises PolicyError here, then watched). ``compiler``: usually
        :func:`meshward.xds.compile_adapter.compiler_for` with the mesh's CompileOptions. ``listen``:
        the ADS address (mTLS); ``admin``: /status and /metrics (None: off). ``schedule``: a
        :class:`meshward.certs.RotationSchedule` (default: renew at 50% ± 10%). ``limits``:
        per-identity limits on nodes, streams and SVIDs (:class:`meshward.xds.limits.NodeLimits`).
        ``join_listen``: where node agents present join tokens (None: no joins; renewals by CSR
        are always served on the ADS port, see :mod:`meshward.xds.certservice`); ``state_dir``:
        where spent join tokens are recorded (default: the CA directory). No workload key is made
        here: each node brings its own SVID (by CSR) and serves it to its Envoy (the agent's SDS,
        or files from `meshward bootstrap`). ``flows``: builds the flow collector that
        shares the ADS port and serves the admin's /flows, /denials and /report, usually
        :func:`meshward.flows.service.flows_for` with the flow store's URL (None: no collector;
        see :mod:`meshward.xds.attached` for why it is handed in).
        ``history_dir``: where the last ``history_keep`` applied policy sets and the audit log
        are kept (meshward.xds.history; None: no history, /policy is still served).
        ``compile_on_start``: the first compile runs in :meth:`start`, with the ADS port already
        open (a restarted control plane's fleet does its TLS handshakes meanwhile; their streams
        wait for the compile, nothing is served before it), not here."""
        self.watcher: Any = None
        if policy_paths:
            # Loads now (PolicyError if invalid: a server refuses to start on a bad policy set);
            # watches from start() on. A policy passed alongside paths is ignored.
            from meshward.policy_watch import PolicyCheck, PolicyWatcher

            self.watcher = PolicyWatcher(policy_paths, interval=watch_interval, check=PolicyCheck())
            policy = self.watcher.load_initial()
        if policy is None:
            raise ValueError("give a policy set or policy paths to watch")
        self.metrics = XdsMetrics()
        # The compiler's JWKS cache (meshward.xds.jwks): fetched once now, before the first
        # compile, so sidecars start with the keys; then kept fresh by a task (start()).
        self.jwks: JwksCache | None = getattr(compiler, "jwks", None)
        if self.jwks is not None:
            self.jwks.on_fetch = lambda result: self.metrics.jwks_fetches.labels(result).inc()
            self.jwks.refresh(jwks_uris(policy))
        self.limits = limits or NodeLimits()
        self.control = ControlPlane(
            policy, ca, compiler, svid_ttl=svid_ttl, schedule=schedule, limits=self.limits,
            compile_now=not compile_on_start,
        )  # fmt: skip
        self.certs = _cert_service(self.control, self.limits, ca, state_dir)
        self.join_listen = join_listen
        self.control.metrics = self.metrics
        self.ads = AdsServer(
            self.control, metrics=self.metrics, drift_threshold=drift_threshold, limits=self.limits
        )
        self.flows: AttachedService | None = None
        if flows is not None:
            self.flows = flows(self.control, self.metrics.registry)
            self.ads.services.append(self.flows.add_to)
        from meshward.xds.history import PolicyHistory
        from meshward.xds.history_service import HistoryService

        self.history = HistoryService(
            PolicyHistory(history_dir, keep=history_keep) if history_dir is not None else None,
            lambda: self.control.policy,
            self.control.wall_clock,
            # Its diffs wait for the rollout: pushes in flight, then the ACKs still to come.
            backlog=lambda: self.control.cache.pushing + self.ads.fleet.pending(),
        )
        self.control.on_applied.append(self.history.applied)
        self.control.on_rejected.append(self.history.rejected)
        self.metrics.add_state(self.metrics_state, ca=lambda: self.control.ca)
        self.listen = listen
        self.admin_address = admin
        self.admin: AdminServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port: int | None = None

    @property
    def address(self) -> str:
        host, _ = split_address(self.listen)
        return f"{host}:{self.port}"

    @property
    def admin_url(self) -> str | None:
        return self.admin.url if self.admin is not None else None

    @property
    def join_address(self) -> str | None:
        """Where agents present join tokens (HOST:PORT), or None without joins."""
        if self.join_listen is None or self.certs.join_port is None:
            return None
        return f"{split_address(self.join_listen)[0]}:{self.certs.join_port}"

    @property
    def server_identity(self) -> str:
        return server_spiffe_id(self.control.policy, self.control.ca.trust_domain)

    async def start(self, check: Callable[[], None] | None = None) -> XdsService:
        """Listen and serve. ``check``: called once the first compile is done, before anything
        else starts (its exception stops the service: `xds serve` refuses to start on a policy
        set that does not compile)."""
        tls = self.control.make_server_tls()
        self.ads.extra_handlers.append(self.certs.handler())  # CSR renewals on the ADS port
        first = not self.control.compiled
        if first:
            self.ads.accepting.clear()
        self.port = await self.ads.start(self.listen, tls.credentials())
        try:
            if first:
                await asyncio.to_thread(self.control.compile_first)
            if check is not None:
                check()
        except BaseException:
            await self.ads.stop(0)
            raise
        self.ads.accepting.set()
        for ref, error in self.control.compile_errors().items():
            log.error("workload %s cannot be compiled (it gets no config): %s", ref, error)
        if self.join_listen is not None:
            try:
                await self.certs.start_join(self.join_listen, tls)
            except OSError:
                await self.ads.stop(0)
                raise
        if self.admin_address is not None:
            host, port = split_address(self.admin_address)
            routes = {
                **(self.flows.routes() if self.flows is not None else {}),
                **self.history.routes(),
            }
            admin = AdminServer(self.status, self.metrics.exposition, routes)
            try:
                await admin.start(host, port)
            except OSError:  # e.g. the admin port is taken: release the ADS port too
                await self.ads.stop(0)
                raise
            self.admin = admin
        self._tasks.append(asyncio.create_task(self.control.run(), name="meshward-xds-timers"))
        if self.jwks is not None:
            self._tasks.append(asyncio.create_task(self._jwks_loop(), name="meshward-xds-jwks"))
        if self.flows is not None:
            self._tasks.append(asyncio.create_task(self.flows.run(), name="meshward-flows"))
        self._tasks.append(asyncio.create_task(self.history.run(), name="meshward-history"))
        if self.watcher is not None:
            watcher = self.watcher
            on_change, on_error = self.control.watcher_callbacks(
                asyncio.get_running_loop(), marks=lambda: dict(watcher.marks)
            )
            self.watcher.on_change, self.watcher.on_error = on_change, on_error
            self.watcher.start()
        log.info(
            "ADS listening on %s (mTLS, server identity %s); admin %s",
            self.address, self.server_identity, self.admin_url or "off",
        )  # fmt: skip
        return self

    async def stop(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
            self.watcher = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.certs.stop()
        await self.ads.stop(0.5)
        if self.admin is not None:
            await self.admin.stop()
        if self.flows is not None:
            await asyncio.to_thread(self.flows.close)
        self.history.close()

    async def _jwks_loop(self) -> None:
        """Refetch due JWKS URIs (new ones within a second of a policy naming them) off the
        event loop; re-push when the keys changed."""
        assert self.jwks is not None
        while True:
            try:
                if await asyncio.to_thread(self.jwks.refresh, jwks_uris(self.control.policy)):
                    # In the compile worker: the loop keeps serving (the fan-out logs it).
                    self.control.recompile_later("JWKS changed", full=True)
            except Exception:
                log.exception("JWKS refresh failed")
            await asyncio.sleep(min(1.0, max(0.05, self.jwks.seconds_until_due())))

    def _settle_policy_error(self) -> None:
        if (
            self.watcher is not None
            and self.watcher.last_error is None
            and self.control.policy_error
        ):
            # The files were fixed back to the version in force: the watcher reports no change
            # (same version) but the rejection is over.
            self.control.policy_error = None
            self.control.policy_error_at = None

    def metrics_state(self) -> dict[str, Any]:
        """What a /metrics scrape needs: fleet counts kept on events (as the summary), the
        drifting nodes, per-node health for the first MAX_NODE_SERIES nodes by name (the
        per-node series are bounded to those), the policy state; not the per-node status
        documents, which cost O(nodes) of JSON per scrape at fleet scale."""
        self._settle_policy_error()
        control = self.control.status(workloads=False)
        return {
            **metrics_view(
                self.ads.fleet,
                self.ads.clock(),
                self.ads.drift_threshold,
                self.control.failed_workloads(),
                MAX_NODE_SERIES,
            ),
            "policy": control["policy"],
            "server_certificate": control["server_certificate"],
            "jwks": self.jwks.status() if self.jwks is not None else None,
        }

    def status(
        self,
        view: str = "nodes",
        *,
        nodes: Sequence[str] = (),
        offset: int = 0,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """``view="nodes"``: everything `meshward status` shows, control plane state and the
        per-node documents (only ``nodes``, node names or workload refs, when given; a page of
        ``limit`` from ``offset``). ``view="summary"``: control plane state and counts over the
        fleet kept on events (meshward.xds.fleetcounts: O(1) plus the nodes needing attention,
        at most 20 named), no per-node documents, what ``GET /status`` serves by default."""
        self._settle_policy_error()
        result = self.control.status(workloads=view != "summary")
        result["ads"] = {"address": self.address, "server_identity": self.server_identity}
        result["certificates"] = {"join": self.join_address, "requests": dict(self.certs.counts)}
        result["drift_threshold_seconds"] = self.ads.drift_threshold
        if self.jwks is not None:
            result["jwks"] = self.jwks.status()
        if self.flows is not None:
            result["flows"] = self.flows.status()
        if view == "summary":
            result["view"] = "summary"
            result["fleet"] = self.ads.fleet_counts(self.control.failed_workloads())
            return result
        names = self.ads.node_names()
        if nodes:
            wanted = set(nodes)
            names = [n for n in names if n in wanted or _workload_ref(n) in wanted]
        total = len(names)
        end = total if limit is None else min(total, offset + limit)
        result["nodes"] = self.ads.node_status(names[offset:end])
        if limit is not None or offset:
            result["page"] = {
                "offset": offset,
                "limit": limit,
                "total": total,
                "next_offset": end if end < total else None,
            }
        return result


def _workload_ref(node_name: str) -> str | None:
    try:
        return NodeId.parse(node_name).workload_ref
    except InvalidNodeId:
        return None


def _cert_service(control: Any, limits: NodeLimits, ca: Any, state_dir: Path | None) -> Any:
    """The CSR service; joins need the CA directory's join-token key and a state directory."""
    from meshward.certs.jointoken import load_or_create_key
    from meshward.xds.certservice import CertService

    directory = getattr(ca, "directory", None)
    key = load_or_create_key(directory) if directory is not None else None
    return CertService(
        control, join_key=key, state_dir=state_dir or directory if key else None, limits=limits
    )


class XdsServiceThread(StartStop):
    """An :class:`XdsService` on its own event loop thread, for synchronous callers.

    ``with XdsServiceThread(policy, ca, compiler) as xds:`` then ``xds.port``, ``xds.admin_url``,
    ``xds.status()``, ``xds.call(lambda: xds.service.control.apply_policy(new))``.
    """

    @property
    def started(self) -> bool:
        return self.service is not None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="meshward-xds", daemon=True)
        self.service: XdsService | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self, timeout: float = 30.0) -> XdsServiceThread:
        self._thread.start()

        async def boot() -> XdsService:
            service = XdsService(*self._args, **self._kwargs)
            return await service.start()

        self.service = asyncio.run_coroutine_threadsafe(boot(), self.loop).result(timeout)
        return self

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` on the service's loop (where all its state lives) and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def status(self) -> dict[str, Any]:
        assert self.service is not None
        service = self.service
        return self.call(service.status)

    @property
    def port(self) -> int:
        assert self.service is not None and self.service.port is not None
        return self.service.port

    @property
    def admin_url(self) -> str | None:
        assert self.service is not None
        return self.service.admin_url

    def stop(self, timeout: float = 10.0) -> None:
        if self.service is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(timeout)
            self.service = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self.loop.is_running():
            self.loop.close()
