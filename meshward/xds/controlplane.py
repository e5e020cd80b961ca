"""The control plane's brain: policy set + CA -> each node's snapshot, kept current.

- Policy: every workload's config is compiled once per policy version (and again at each
  ``meshward.dev/expires-at`` instant); only nodes whose workload's compiled resources changed
  get a new snapshot, so only they are pushed to.
- Identity: the control plane makes no workload key and serves no workload SVID. Each node's
  key is born on the node (`meshward agent`, or `meshward bootstrap` for operator-run Envoy), its
  SVID comes by CSR (:mod:`meshward.xds.certservice`), and its Envoy reads it from the agent's
  SDS socket or from files (:mod:`meshward.xds.filesds`): compiled TLS contexts point there, per
  node. The ADS server's own certificate renews at ~50% of its lifetime
  (:class:`meshward.certs.RotationSchedule`), signed by the *oldest* CA generation still
  trusted: sidecars may verify it with a bundle written before a `meshward ca rotate`; it moves
  to the next generation when the old root is dropped.
- Node authentication: a stream may act as node ``ns/name[/i]`` only if its client certificate
  is the SVID of workload ``ns/name`` (see :mod:`meshward.xds.nodeid`).

Everything here runs on the server's event loop; the policy watcher's thread hops onto it with
``call_soon_threadsafe`` (see :meth:`ControlPlane.watcher_callbacks`), and the compile a policy
change, an expires-at instant or a JWKS change needs runs in a worker thread
(meshward.xds.compiling), or in a worker process the thread waits for
(meshward.xds.compile_process), so streams are served meanwhile; its result reaches the nodes a
batch at a time, the heap frozen as it goes (meshward.xds.heap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from meshward.certs.reload import CaReloader
from meshward.certs.server_identity import SERVER_KEY, ServerCertificate
from meshward.certs.server_tls import ServerTls
from meshward.policy import PolicyError, PolicySet, Workload
from meshward.xds import compiling, heap, typeurls
from meshward.xds.cache import SnapshotCache
from meshward.xds.clientcert import ClientCertificate, credentials_status
from meshward.xds.compiling import (
    Compiled,
    CompileWorker,
    WorkloadConfig,
    config_compiler,
    paced,
    releasing,
)
from meshward.xds.filesds import FilesSdsRewriter, secrets_dir_of
from meshward.xds.limits import INSTANCE_LIMIT, IdentityIndex, NodeLimits, expired, next_expiry
from meshward.xds.nodeid import SERVER_SERVICE_ACCOUNT, NodeId, expected_spiffe_id
from meshward.xds.resources import Resource, make_resource
from meshward.xds.server import NodeRejected
from meshward.xds.snapshot import InconsistentSnapshot, Snapshot
from meshward.xds.timeline import EditTimeline

log = logging.getLogger("meshward.xds")

WorkloadCompiler = compiling.WorkloadCompiler  # where the service and older callers find it

INVALID_SECRETS_DIR = "invalid-secrets-dir"
CA_POLL_SECONDS = 5.0


def server_spiffe_id(policy: PolicySet, trust_domain: str) -> str:
    """The ADS server's identity, which sidecars pin in their bootstrap."""
    return expected_spiffe_id(trust_domain, policy.mesh.root_namespace, SERVER_SERVICE_ACCOUNT)


@dataclass
class NodeState:
    node: NodeId
    identity: str
    secrets_dir: str | None = None  # its Envoy reads its SVID from files there (filesds)
    connected: bool = False
    disconnected_at: float | None = None  # monotonic; garbage-collected after limits.node_gc_after
    snapshot_error: str | None = None  # why its newest snapshot was refused (InconsistentSnapshot)


class ControlPlane:
    def __init__(
        self,
        policy: PolicySet,
        ca: Any,  # meshward.certs.CertificateAuthority
        compiler: WorkloadCompiler,
        *,
        svid_ttl: timedelta = timedelta(hours=1),
        server_ttl: timedelta | None = None,
        schedule: Any = None,  # meshward.certs.RotationSchedule
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
        reload_ca: bool = True,
        limits: NodeLimits | None = None,
        compile_now: bool = True,
    ) -> None:
        """``svid_ttl``: the lifetime of SVIDs signed for nodes' CSRs (the certificate service
        reads it) and of the ADS server's own certificate unless ``server_ttl``.
        ``compile_now=False``: the first compile is the caller's (:meth:`compile_first`, e.g.
        while the ADS port already takes connections); until then no node has a config."""
        from meshward.certs import RotationSchedule

        self.policy = policy
        self.ca = ca
        self.compiler = compiler
        self.svid_ttl = svid_ttl
        self.server_ttl = server_ttl or svid_ttl
        self.schedule = schedule if schedule is not None else RotationSchedule()
        self.wall_clock = wall_clock
        self.clock = clock
        self.reload_ca = reload_ca
        self.limits = limits or NodeLimits()
        # Per files-mode node directory: listeners/clusters pointed at its SDS files (bounded).
        self.files_sds = FilesSdsRewriter()
        self.cache = SnapshotCache()
        self.nodes: dict[str, NodeState] = {}
        self.identities = IdentityIndex()
        self.configs: dict[str, WorkloadConfig] = {}
        self.policy_applied_at = wall_clock()
        self.policy_error: str | None = None
        self.policy_error_at: datetime | None = None
        self.metrics: Any = None  # XdsMetrics, set by XdsService
        # Told of every applied policy set and every rejected change (the policy history).
        self.on_applied: list[Callable[[PolicySet], None]] = []
        self.on_rejected: list[Callable[[str], None]] = []
        self.timeline = EditTimeline()  # the newest change's stages (status: last_change)
        self._bundle_version = ""
        self._rootca: Resource | None = None
        self._wake: asyncio.Event | None = None
        self._ca_reloader = CaReloader(getattr(ca, "directory", None))
        self.server_cert = ServerCertificate(
            lambda: server_spiffe_id(self.policy, self.ca.trust_domain),
            self.server_ttl,
            self.schedule,
        )
        self._compiled_at = wall_clock()
        self._first_compile = True
        # Compiles with its incremental state: here, or in a worker process of its own.
        self._compile = config_compiler(compiler)
        self.heap = heap.Heap()  # frozen as the fan-out goes (meshward.xds.heap)
        self._fanning_out = False
        self._latest_policy = policy  # the newest policy asked for (worker results older: dropped)
        self._recompile_reason = ""  # why the policy in force is being recompiled in the worker
        self._expiry_asked: datetime | None = None  # an expires-at recompile is queued as of then
        self.compile_worker = CompileWorker(
            self._compile_newest, self._installed, threading.Lock(), self._compile_failed
        )
        if compile_now:
            self.compile_first()
        self._refresh_bundle(self._compiled_at)

    @property
    def compiled(self) -> bool:
        """The first compile is done (until then every node would get an empty config)."""
        return not self._first_compile

    def compile_first(self) -> None:
        """The first compile of the policy set (blocking; a worker thread may run it). Errors
        are not logged one by one: the caller reports them (`xds serve` refuses to start)."""
        self._recompile(self._compiled_at)
        self._first_compile = False

    # -- policy --------------------------------------------------------------------------------
    def _recompile(self, now: datetime, *, full: bool = False) -> set[str]:
        """Compile every workload (incrementally unless ``full``), here and now; return the
        refs whose resources changed."""
        with self.compile_worker.lock:
            compiled = self._compile(
                self.policy, now, self.configs, full=full, quiet=self._first_compile
            )
            self._install(compiled)
        return compiled.changed

    def _install(self, compiled: Compiled) -> None:
        self.configs = compiled.configs
        self._compiled_at = compiled.now

    def _compile_newest(self, policy: PolicySet, full: bool) -> Compiled:
        """In the worker thread (under the compile lock): compile ``policy`` from the state in
        force (from scratch if ``full``)."""
        return self._compile(policy, self.wall_clock(), self.configs, full=full)

    def _compile_failed(self, policy: PolicySet, error: str) -> None:
        """On the loop: a compile gave no result (its worker died twice); the configs in force
        stay, and status and metrics say why. An expires-at recompile is asked for again at
        the next maintenance pass (an expired allow must not stay in force)."""
        self._expiry_asked = None
        if policy is not self._latest_policy:
            return
        self.policy_error = f"compiling policy {policy.version[:12]} failed: {error}"
        self.policy_error_at = self.wall_clock()
        if self.metrics is not None:
            self.metrics.policy_updates.labels("compile_failed").inc()

    def apply_policy(self, policy: PolicySet) -> set[str]:
        """A new valid policy set: recompile (here, blocking the caller), push to the nodes of
        affected workloads only."""
        self._latest_policy = policy
        self.policy = policy
        self.timeline.mark(policy.version, "compile_started")
        changed = self._recompile(self.wall_clock())
        self.timeline.mark(policy.version, "compiled")
        self._applied(policy, changed)
        self.timeline.mark(policy.version, "pushed")
        return changed

    def apply_policy_later(self, policy: PolicySet) -> None:
        """A new valid policy set, compiled in the worker thread: the loop keeps serving streams
        and installs the result when it is ready (a newer policy arriving meanwhile replaces
        this one)."""
        self._latest_policy = policy
        self.compile_worker.submit(policy)

    def recompile_later(self, reason: str, *, full: bool = False) -> None:
        """Recompile the policy set in force (an expires-at instant, changed JWKS) in the
        worker: the loop keeps serving streams meanwhile, and the nodes whose config changed
        are pushed to when it is done (``full``: from scratch, when the compiler's own inputs
        changed)."""
        self._recompile_reason = reason
        self.compile_worker.submit(self._latest_policy, full=full)

    async def _installed(self, compiled: Compiled) -> None:
        """On the loop: a worker compile is done; its nodes are woken a batch at a time."""
        if compiled.policy is not self._latest_policy:
            return  # a newer policy was applied meanwhile
        applied = compiled.policy is not self.policy  # else: the set in force, recompiled
        # The configs replaced are let go of a few at a time during the fan-out: dropped at
        # once, a mesh-wide edit's old configs were freed in one 170 ms pause of the loop.
        retired = dict(self.configs)
        version = compiled.policy.version
        if applied:
            self.timeline.mark(version, "compile_started", compiled.now.timestamp())
            self.timeline.mark(version, "compiled")
        with self.compile_worker.lock:
            self.policy = compiled.policy
            self._install(compiled)
        self._expiry_asked = None
        if applied:
            self.policy_applied_at = self.wall_clock()
            self.policy_error = None
            self.policy_error_at = None
        await self._fan_out(compiled.changed, retired)
        if applied:
            self.timeline.mark(version, "pushed")
            self._applied(compiled.policy, compiled.changed, refresh=False)
            return
        log.info(
            "%s: recompiled, %d workload(s) changed",
            self._recompile_reason or "recompile", len(compiled.changed),
        )  # fmt: skip
        self._poke()

    async def _fan_out(
        self, workload_refs: set[str], retired: dict[str, WorkloadConfig] | None = None
    ) -> None:
        """Refresh the nodes of ``workload_refs`` a batch at a time (meshward.xds.compiling.paced),
        freezing what each batch allocated (meshward.xds.heap); ``retired`` (configs no longer
        in force) is emptied one entry per step meanwhile."""
        self._fanning_out = True
        try:
            await paced(
                releasing(self._refresh_steps(workload_refs), retired or {}),
                backlog=lambda: self.cache.pushing,
                settle=self.heap.settle,
            )
        finally:
            self._fanning_out = False
            self.heap.settle()

    def _applied(self, policy: PolicySet, changed: set[str], *, refresh: bool = True) -> None:
        if refresh:
            self.policy_applied_at = self.wall_clock()
            self.policy_error = None
            self.policy_error_at = None
            self._refresh_nodes(changed)
        if self.metrics is not None:
            self.metrics.policy_updates.labels("applied").inc()
        log.info(
            "policy %s applied: %d workload(s) changed%s",
            policy.version[:12], len(changed), f" ({', '.join(sorted(changed))})" if changed else "",
        )  # fmt: skip
        for observer in self.on_applied:
            observer(policy)
        self._poke()

    def refresh(self) -> set[str]:
        """Recompile the current policy set (e.g. after the compiler's inputs changed) and push
        whatever changed."""
        changed = self._recompile(self.wall_clock(), full=True)
        self._refresh_nodes(changed)
        self._poke()
        return changed

    def reject_policy(self, error: PolicyError) -> None:
        """An invalid change: the running version stays; the error shows in status."""
        self.policy_error = str(error)
        self.policy_error_at = self.wall_clock()
        if self.metrics is not None:
            self.metrics.policy_updates.labels("rejected").inc()
        log.warning("policy change rejected, keeping %s: %s", self.policy.version[:12], error)
        for observer in self.on_rejected:
            observer(str(error))

    def watcher_callbacks(
        self,
        loop: asyncio.AbstractEventLoop,
        marks: Callable[[], dict[str, float]] | None = None,
    ) -> tuple[Callable[[PolicySet], None], Callable[[PolicyError], None]]:
        """``on_change``/``on_error`` for a PolicyWatcher thread: they hop onto ``loop``.
        ``marks``: the watcher's stages of the change (PolicyWatcher.marks), for the timeline."""

        def on_change(policy: PolicySet) -> None:
            passed = marks() if marks is not None else {}
            loop.call_soon_threadsafe(self._watched, policy, passed)

        def on_error(error: PolicyError) -> None:
            loop.call_soon_threadsafe(self.reject_policy, error)

        return on_change, on_error

    def _watched(self, policy: PolicySet, marks: dict[str, float]) -> None:
        self.timeline.begin(policy.version, marks)
        self.apply_policy_later(policy)

    def next_expiry(self, now: datetime) -> datetime | None:
        """The next expires-at instant not compiled for yet (nor queued for compiling)."""
        since = self._compiled_at
        if self._expiry_asked is not None and self._expiry_asked > since:
            since = self._expiry_asked
        upcoming = [
            p.expires_at
            for p in self.policy.authorization_policies
            if p.expires_at is not None and p.expires_at > since
        ]
        return min(upcoming, default=None)

    def _expire(self, now: datetime) -> None:
        """An expires-at instant: recompile in the worker (on the loop), or here and now
        (called without a running loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            changed = self._recompile(now)
            log.info("expires-at reached: recompiled, %d workload(s) changed", len(changed))
            self._refresh_nodes(changed)
            return
        self._expiry_asked = now
        self.recompile_later("expires-at reached")

    def compile_errors(self) -> dict[str, str]:
        """Workload ref -> why its config could not be compiled (it keeps its previous one)."""
        return {ref: c.error for ref, c in sorted(self.configs.items()) if c.error}

    # -- nodes ---------------------------------------------------------------------------------
    def _workload(self, node: NodeId) -> Workload | None:
        return self.policy.workload(node.workload_ref)

    def expected_identity(self, node: NodeId) -> str:
        workload = self._workload(node)
        account = (workload.service_account or workload.name) if workload else node.workload
        return expected_spiffe_id(self.ca.trust_domain, node.namespace, account)

    def authorize(self, node: NodeId, peer_identity: str | None) -> None:
        if peer_identity is None:
            raise NodeRejected(
                "no-client-certificate",
                "ADS requires a client certificate (mTLS): run `meshward bootstrap` for this "
                "workload and use the credentials it writes",
            )
        expected = self.expected_identity(node)
        if peer_identity != expected:
            raise NodeRejected(
                "identity-mismatch",
                f"a client certificate for {peer_identity} may not act as node {node} "
                f"(that node must present {expected})",
            )

    async def node_connected(self, node: NodeId, envoy_node: Any = None) -> None:
        """Raises NodeRejected when a per-identity limit refuses the node (see limits.py), or
        when ``envoy_node`` (the first request's ``Node``) names an unusable secrets directory.
        Nothing is issued here: the node brings its own SVID (agent or `meshward bootstrap`)."""
        key = str(node)
        state = self.nodes.get(key)
        identity = state.identity if state else self.expected_identity(node)
        try:
            secrets_dir = secrets_dir_of(envoy_node)
        except ValueError as exc:
            raise NodeRejected(INVALID_SECRETS_DIR, f"node {node}: {exc}") from None
        evict: str | None = None
        if state is None:
            evict, ok = self.identities.make_room(self.nodes, identity, self.limits.max_instances)
            if not ok:
                raise NodeRejected(
                    INSTANCE_LIMIT,
                    f"{identity} already has {self.limits.max_instances} connected node(s), "
                    f"the most one identity may have (--max-instances); node {node} refused",
                )
            if evict is not None:
                log.info("node %s forgotten to make room for %s (--max-instances)", evict, node)
                self.forget_node(evict)
            state = self.nodes[key] = NodeState(node, identity)
            self.identities.add(identity, key)
        state.connected = True
        state.disconnected_at = None
        state.secrets_dir = secrets_dir
        self._refresh_node(state)

    def node_disconnected(self, node: NodeId) -> None:
        self.heap.stream_closed()  # its gRPC call's reference cycles (meshward.xds.heap)
        state = self.nodes.get(str(node))
        if state is not None:
            state.connected = False
            state.disconnected_at = self.clock()

    def forget_node(self, key: str) -> None:
        """Drop a disconnected node: its state, snapshot and renewal (it is new if it returns)."""
        self.identities.discard(key)
        self.nodes.pop(key, None)
        self.cache.discard(key)

    def collect_nodes(self) -> list[str]:
        """Forget nodes disconnected for ``limits.node_gc_after``; return their keys."""
        keys = list(expired(self.nodes, self.clock(), self.limits.node_gc_after))
        for key in keys:
            self.forget_node(key)
        if keys:
            if self.metrics is not None:
                self.metrics.nodes_collected.inc(len(keys))
            log.info(
                "forgot %d node(s) disconnected for %gs or more: %s",
                len(keys), self.limits.node_gc_after, ", ".join(keys[:10]),
            )  # fmt: skip
        return keys

    def node_details(self, node: NodeId) -> dict[str, Any]:
        state = self.nodes.get(str(node))
        workload = self._workload(node)
        details: dict[str, Any] = {
            "workload": node.workload_ref,
            "known_workload": workload is not None,
            "identity": state.identity if state else self.expected_identity(node),
        }
        config = self.configs.get(node.workload_ref)
        if config is not None and config.error:
            details["compile_error"] = config.error
        elif state is not None and state.snapshot_error:
            details["compile_error"] = state.snapshot_error
        if state is not None and state.secrets_dir is not None:
            details["secrets"] = {"source": "files", "directory": state.secrets_dir}
        elif state is not None:
            details["secrets"] = {"source": "agent"}
        return details

    def failed_workloads(self) -> set[str]:
        """Workload refs whose last compile failed (they keep their previous config)."""
        return {ref for ref, config in self.configs.items() if config.error}

    def policy_documents(self, node_name: str) -> list[str]:
        """The policy documents behind a node's config (for a NOT ENFORCED report)."""
        from meshward.xds.enforcement import documents

        try:
            ref = NodeId.parse(node_name).workload_ref
        except ValueError:
            return []
        return documents(self.policy, ref)

    def client_certificate(self, certificate: Any) -> ClientCertificate:
        generation = self.ca.issuing_generation(certificate)
        return ClientCertificate(
            generation.number if generation is not None else None,
            certificate.not_valid_after_utc,
        )

    def client_certificate_status(self, cert: ClientCertificate) -> dict[str, Any]:
        return credentials_status(cert, self.ca.generations, self.wall_clock())

    def _snapshot(self, state: NodeState) -> Snapshot:
        config = self.configs.get(state.node.workload_ref)
        resources: dict[str, list[Resource]] = dict(config.resources) if config else {}
        if state.secrets_dir is not None:
            resources = self.files_sds.rewrite(resources, state.secrets_dir)
        # Public: the trust bundle only. No node's SVID or key is ever in a snapshot.
        resources[typeurls.SECRET] = [self._rootca] if self._rootca is not None else []
        return self.cache.build(str(state.node), resources, self.clock())

    def _refresh_node(self, state: NodeState) -> bool:
        """Build and store the node's snapshot. An inconsistent one is refused: the node keeps
        its last good snapshot and status shows why (as a compile error: not enforced)."""
        try:
            snapshot = self._snapshot(state)
        except InconsistentSnapshot as exc:
            if state.snapshot_error != str(exc):
                log.error("node %s keeps its last good config: %s", state.node, exc)
            state.snapshot_error = str(exc)
            return False
        state.snapshot_error = None
        return self.cache.set(str(state.node), snapshot)

    def _refresh_nodes(self, workload_refs: set[str]) -> int:
        return sum(self._refresh_steps(workload_refs))

    def _refresh_steps(self, workload_refs: set[str]) -> Iterator[bool]:
        """Refresh the nodes of ``workload_refs`` one at a time (True: it was pushed to)."""
        for state in list(self.nodes.values()):
            if state.node.workload_ref in workload_refs:
                yield self._refresh_node(state)

    # -- trust bundle and the server's own certificate -------------------------------------------
    def _refresh_bundle(self, now: datetime) -> bool:
        from meshward.certs.sds import validate_secret, validation_context_secret

        bundle = self.ca.trust_bundle(now=now)
        if bundle.version == self._bundle_version:
            return False
        secret = validation_context_secret(bundle)
        validate_secret(secret, now=now)
        self._bundle_version = bundle.version
        self._rootca = make_resource(secret)
        for state in self.nodes.values():
            self._refresh_node(state)
        self.server_cert.bundle_changed(self.ca, bundle.roots_pem, now)
        return True

    def make_server_tls(self) -> ServerTls:
        """Issue the ADS server's certificate and return its (renewable) TLS config."""
        return self.server_cert.make_tls(self.ca, self.wall_clock())

    # -- background work ---------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def maintain(self, now: datetime) -> None:
        """One pass of time-driven work: renewals due, policies expiring, CA changes."""
        for renewal in list(self.schedule.due(now)):  # only the ADS server's own certificate
            try:
                if renewal.key == SERVER_KEY:
                    self.server_cert.renew(self.ca, now)
                else:
                    self.schedule.forget(renewal.key)
            except Exception:
                log.exception("renewing the certificate of %s failed; retrying in 5s", renewal.key)
                self.schedule.retry(renewal.key, now + timedelta(seconds=5))
        expiry = self.next_expiry(now)
        if expiry is not None and now >= expiry:
            self._expire(now)
        if self.reload_ca:
            self.ca = self._ca_reloader.reload(self.ca)
        self._refresh_bundle(now)
        self.collect_nodes()
        self._settle_heap()

    def _settle_heap(self) -> None:
        """Freeze what the last few seconds allocated (connections, snapshots: no collection
        pass on the loop walks a whole fleet of them), and collect the reference cycles frozen
        meanwhile once a fleet's worth of streams has closed or the frozen heap has grown
        (meshward.xds.heap), never while a compile, a fan-out or its pushes are under way."""
        self.heap.settle()
        busy = self._fanning_out or self.cache.pushing or self.compile_worker.busy
        if busy or not self.heap.thaw_due(len(self.nodes)):
            return
        started = time.perf_counter()
        freed = self.heap.thaw()
        log.info(
            "heap thawed: a full garbage collection freed %d object(s) in %.0f ms",
            freed, (time.perf_counter() - started) * 1000,
        )  # fmt: skip

    def seconds_until_next(self, now: datetime) -> float:
        waits = [CA_POLL_SECONDS]
        dropped = [
            g.trusted_until
            for g in self.ca.generations
            if g.trusted_until is not None and g.trusted_until > now
        ]
        if dropped:  # the bundle (and maybe the server certificate) changes at that instant
            waits.append((min(dropped) - now).total_seconds())
        renewal = self.schedule.seconds_until_next(now)
        if renewal is not None:
            waits.append(renewal)
        expiry = self.next_expiry(now)
        if expiry is not None:
            waits.append(max(0.0, (expiry - now).total_seconds()))
        collect = next_expiry(self.nodes.values(), self.clock(), self.limits.node_gc_after)
        if collect is not None:
            waits.append(collect)
        return max(0.0, min(waits))

    async def run(self) -> None:
        """Timers: the server certificate's renewals, expires-at re-pushes, CA reloads. Cancel
        to stop."""
        self._wake = asyncio.Event()
        self.heap.start()  # the compiled mesh is long-lived: out of the garbage collector's scans
        try:
            await self._timers()
        finally:
            self.compile_worker.close()
            self.heap.stop()
            self._compile.close()

    async def _timers(self) -> None:
        assert self._wake is not None
        while True:
            now = self.wall_clock()
            failed = False
            try:
                self.maintain(now)
            except Exception:
                log.exception("control plane maintenance failed")
                failed = True
            checked = self.wall_clock()
            delay = self.seconds_until_next(checked)
            if failed:  # what failed is due again at once: retry each second, not in a spin
                delay = max(delay, 1.0)
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives as
            # the wait ends (a poke during shutdown), and stop() then waits for this forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay + 0.001):
                    await self._wake.wait()

    # -- status ------------------------------------------------------------------------------------
    def status(self, *, workloads: bool = True) -> dict[str, Any]:
        """The control plane's own state; ``workloads=False``: per-workload resource counts
        reduced to totals and the workloads that failed to compile (the summary view)."""
        now = self.wall_clock()
        expiry = self.next_expiry(now)
        return {
            "policy": {
                "version": self.policy.version,
                "applied_at": self.policy_applied_at.isoformat(),
                "error": self.policy_error,
                "error_at": self.policy_error_at.isoformat() if self.policy_error_at else None,
                "next_expiry": expiry.isoformat() if expiry else None,
                "last_change": self.timeline.status(),
            },
            "compiler": self._compile.status(),
            "trust_domain": self.ca.trust_domain,
            "trust_bundle": self._bundle_version[:16],
            "server_certificate": (
                {
                    "spiffe_id": self.server_cert.svid.spiffe_id,
                    "not_after": self.server_cert.svid.not_after.isoformat(),
                    "ca_generation": self.server_cert.generation,
                }
                if self.server_cert.svid is not None
                else None
            ),
            "workloads": self._workload_status()
            if workloads
            else {
                "count": len(self.configs),
                "errors": {ref: c.error for ref, c in sorted(self.configs.items()) if c.error},
            },
        }

    def _workload_status(self) -> dict[str, Any]:
        return {
            ref: {
                "resources": {
                    typeurls.short(t): len(items) for t, items in sorted(config.resources.items())
                },
                "error": config.error,
            }
            for ref, config in sorted(self.configs.items())
        }
