"""Serving Check over gRPC: one server in this process (``ExtAuthzServer``), the whole service
with policy watching, telemetry and metrics (``run``), or N worker processes sharing one port
through SO_REUSEPORT (``run_workers``), because one CPython process is bound to one core.

Server kinds: ``sync`` (grpcio thread pool) and ``aio`` (grpc.aio). bench/extauthz.py measures
both on cache hits; sync was faster here (see the bench), so it is the default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from meshward.errors import UserError
from meshward.extauthz.tracing import DEFAULT_MAX_PER_SECOND, DEFAULT_RATIO
from meshward.lifecycle import StartStop, on_stop_signals, wait_for_stop_signal
from meshward.net import LOOPBACK

log = logging.getLogger("meshward.extauthz")

ServerKind = Literal["sync", "aio"]
DEFAULT_KIND: ServerKind = "sync"
DEFAULT_THREADS = 4  # CPython: more threads only add GIL handoffs (bench: 4 beat 16)
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
MAX_MESSAGE_BYTES = (
    1 << 20
)  # a CheckRequest past this is refused by gRPC: Envoy denies (fail closed)


class Checker(Protocol):
    def check(self, request: Any, metadata: Any = None) -> Any: ...


#: ``gate(request, peer SPIFFE ID or None) -> refusal or None`` (meshward.extauthz.callers).
Gate = Callable[[Any, "str | None"], "str | None"]


def _grpc_options(reuse_port: bool) -> list[tuple[str, Any]]:
    # grpcio turns SO_REUSEPORT on by default on Linux; off unless asked, so a second server on
    # a taken port fails loudly instead of silently sharing it.
    return [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


class ExtAuthzServer(StartStop):
    """A gRPC server answering ``Authorization/Check`` with ``checker`` plus the standard health
    service, on ``host:port`` (0: the kernel picks; read ``.port``). Context manager.

    ``tls`` (a meshward.certs.server_tls.ServerTls): mTLS, client certificate required; without
    it the port is plaintext (in-process tests and the benchmark only: ``meshward extauthz
    serve`` always has TLS). ``gate`` runs before ``checker`` and a refusal ends the call with
    PERMISSION_DENIED: nothing reaches the decision cache or the decision log."""

    @property
    def started(self) -> bool:
        return self._server is not None

    def __init__(
        self,
        checker: Checker,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        kind: ServerKind = DEFAULT_KIND,
        threads: int = DEFAULT_THREADS,
        reuse_port: bool = False,
        tls: Any = None,
        gate: Gate | None = None,
    ) -> None:
        self.checker = checker
        self.tls = tls
        self.gate = gate
        self.host = host
        self.kind = kind
        self.threads = threads
        self.reuse_port = reuse_port
        self._requested_port = port
        self.port = 0
        self._server: Any = None
        self._health: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ExtAuthzServer:
        if self.kind == "sync":
            self._start_sync()
        elif self.kind == "aio":
            self._start_aio()
        else:
            raise ValueError(f"unknown server kind {self.kind!r}")
        return self

    def _bind(self, server: Any) -> int:
        try:
            address = f"{self.host}:{self._requested_port}"
            if self.tls is not None:
                port = int(server.add_secure_port(address, self.tls.credentials()))
            else:
                port = int(server.add_insecure_port(address))
        except RuntimeError as exc:
            port = 0
            log.debug("bind failed: %s", exc)
        if port == 0:
            raise UserError(
                f"cannot listen on {self.host}:{self._requested_port} (in use?); pick another --listen port"
            )
        return port

    def _start_sync(self) -> None:
        import grpc
        from envoy.service.auth.v3 import external_auth_pb2_grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from meshward.extauthz.callers import peer_identity

        checker, gate = self.checker, self.gate

        class Servicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
            def Check(self, request: Any, context: Any) -> Any:
                if gate is not None:
                    refusal = gate(request, peer_identity(context))
                    if refusal is not None:
                        context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
                return checker.check(request, context.invocation_metadata())

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="check"),
            options=_grpc_options(self.reuse_port),
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Servicer(), server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = self._bind(server)
        server.start()
        for name in ("", AUTHORIZATION_SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    def _start_aio(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._aio_start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()
                self._stopped.set()

        self._thread = threading.Thread(target=run, name="extauthz-aio", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]

    async def _aio_start(self) -> None:
        import grpc
        from envoy.service.auth.v3 import external_auth_pb2_grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from meshward.extauthz.callers import peer_identity

        checker, gate = self.checker, self.gate

        class Servicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
            async def Check(self, request: Any, context: Any) -> Any:
                if gate is not None:
                    refusal = gate(request, peer_identity(context))
                    if refusal is not None:
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
                return checker.check(request, context.invocation_metadata())

        server = grpc.aio.server(options=_grpc_options(self.reuse_port))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Servicer(), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = self._bind(server)
        await server.start()
        for name in ("", AUTHORIZATION_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    def stop(self, grace: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self.kind == "sync":
            self._health.enter_graceful_shutdown()  # health checkers see NOT_SERVING first
            server.stop(grace).wait(grace + 5)
            return
        loop = self._loop
        assert loop is not None

        async def shutdown() -> None:
            await self._health.enter_graceful_shutdown()
            await server.stop(grace)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(grace + 5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(grace + 5)


# ---- the whole service -------------------------------------------------------------------------


@dataclass
class ServeOptions:
    """Everything `meshward extauthz serve` takes; the demo builds one of these directly."""

    policy_paths: list[Path]
    # mTLS credentials (cert-chain.pem, key.pem, root-cert.pem of the ext_authz SVID). Required
    # unless ``plaintext`` (in-process tests and the benchmark; not offered by the CLI).
    tls_dir: Path | None = None
    ca_dir: Path | None = None  # or: issue (and renew) its own SVID from this CA
    plaintext: bool = False
    host: str = LOOPBACK
    port: int = 0
    workers: int = 1
    kind: ServerKind = DEFAULT_KIND
    threads: int = DEFAULT_THREADS
    otlp_endpoint: str | None = None
    trace_sample_ratio: float = (
        DEFAULT_RATIO  # cache hits that get a span (meshward.extauthz.tracing)
    )
    max_spans_per_second: int = DEFAULT_MAX_PER_SECOND
    decision_log: Path | None = None
    decision_log_max_bytes: int = 64 * 1024 * 1024  # the log and its rotated files together
    log_allows: bool = False
    metrics_host: str = LOOPBACK
    metrics_port: int | None = None  # None: no /metrics endpoint
    cache_bytes: int = 64 * 1024 * 1024  # decision cache budget (accounted bytes)
    cache_ttl: float = 60.0
    leeway: float = 60.0
    max_token_bytes: int = 8192
    jwks_timeout: float = 3.0
    jwks_refresh_interval: float = 30.0
    poll_interval: float = 1.0
    service_name: str = "meshward-extauthz"
    ready_file: Path | None = None  # where a JSON line with the bound addresses is written
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Running:
    """A started service in this process: stop() tears everything down (flushing spans)."""

    server: ExtAuthzServer
    service: Any
    authorizer: Any
    watcher: Any
    tracer_provider: Any
    metrics: Any
    metrics_server: Any = None
    metrics_port: int | None = None
    _stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        self.server.stop()
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()


def start_service(options: ServeOptions, *, reuse_port: bool = False) -> Running:
    """Load the policy (raising PolicyError/UserError if invalid), start watching it, and serve
    (over mTLS from ``options.tls_dir``; UserError without it unless ``options.plaintext``)."""
    from meshward.compile.envoy_limits import check_policy_set
    from meshward.extauthz.authorizer import Authorizer, decision_cache
    from meshward.extauthz.callers import (
        CaCredentials,
        CallerGate,
        TlsFiles,
        expected_server_identity,
        server_tls,
        watch_tls,
    )
    from meshward.extauthz.decisionlog import open_decision_log
    from meshward.extauthz.metrics import Metrics, serve_metrics
    from meshward.extauthz.service import CheckService
    from meshward.extauthz.tokens import JwtVerifier
    from meshward.policy_watch import PolicyWatcher
    from meshward.telemetry import setup_tracing

    if options.tls_dir is None and options.ca_dir is None and not options.plaintext:
        raise UserError(
            "ext_authz serves Check only over mTLS: pass --tls-dir DIR with the ext_authz SVID "
            "(cert-chain.pem, key.pem, root-cert.pem; `meshward ca issue --spiffe-id "
            "spiffe://<trust domain>/ns/<root namespace>/sa/meshward-extauthz --out DIR`), "
            "or --ca DIR to issue it from the mesh CA"
        )
    # The same refusals as the control plane: both serve one policy version or neither moves.
    watcher = PolicyWatcher(
        options.policy_paths, interval=options.poll_interval, check=check_policy_set
    )
    policy_set = watcher.load_initial()
    tls: Any = None
    renew: Callable[[], Callable[[], None]] | None = None
    interval = max(options.poll_interval, 1.0)
    if options.tls_dir is not None:
        tls_files = TlsFiles(options.tls_dir)
        tls = server_tls(tls_files, policy_set)
        renew = lambda: watch_tls(tls_files, tls, interval)  # noqa: E731
    elif options.ca_dir is not None:
        from datetime import UTC, datetime

        issuer = CaCredentials(options.ca_dir, expected_server_identity(policy_set))
        tls = issuer.make_tls(datetime.now(UTC))
        renew = lambda: issuer.watch(interval)  # noqa: E731
    verifier = JwtVerifier(
        leeway=options.leeway,
        max_token_bytes=options.max_token_bytes,
        fetch_timeout=options.jwks_timeout,
        refresh_interval=options.jwks_refresh_interval,
    )
    authorizer = Authorizer(
        policy_set,
        verifier=verifier,
        cache=decision_cache(options.cache_bytes, options.cache_ttl),
    )
    watcher.on_change = authorizer.update
    watcher.on_error = lambda err: log.warning(
        "policy change rejected; still serving %s",
        authorizer.version[:12],
        extra={"error": str(err)},
    )
    open_decision_log(options.decision_log, max_bytes=options.decision_log_max_bytes)
    provider = setup_tracing(options.service_name, options.otlp_endpoint)
    metrics = Metrics()
    metrics.attach(authorizer)
    service = CheckService(
        authorizer,
        metrics=metrics,
        tracer_provider=provider,
        log_allows=options.log_allows,
        sample_ratio=options.trace_sample_ratio,
        max_spans_per_second=options.max_spans_per_second,
    )
    server = ExtAuthzServer(
        service,
        host=options.host,
        port=options.port,
        kind=options.kind,
        threads=options.threads,
        reuse_port=reuse_port,
        tls=tls,
        gate=None if tls is None else CallerGate(lambda: authorizer.policy_set, metrics=metrics),
    ).start()
    running = Running(server, service, authorizer, watcher, provider, metrics)
    if renew is not None:
        running._stops.append(renew())
    watcher.start()
    running._stops.append(watcher.stop)
    if hasattr(provider, "shutdown"):
        running._stops.insert(0, provider.shutdown)  # runs last: flush spans after the server stops
    from meshward.extauthz.metrics import multiprocess_enabled

    if multiprocess_enabled():
        stop_sync = metrics.start_sync_thread()
        running._stops.append(stop_sync.set)
    elif options.metrics_port is not None:
        metrics_server, metrics_port = serve_metrics(
            options.metrics_port, options.metrics_host, metrics=metrics
        )
        running.metrics_server, running.metrics_port = metrics_server, metrics_port
        running._stops.append(metrics_server.shutdown)
    log.info(
        "ext_authz serving",
        extra={
            "listen": server.address,
            "kind": options.kind,
            "policy_version": authorizer.version[:12],
            "metrics_port": running.metrics_port,
            "mtls": tls is not None,
        },
    )
    return running


def _announce(options: ServeOptions, info: dict[str, Any]) -> None:
    line = json.dumps(info, sort_keys=True)
    print(line, flush=True)
    if options.ready_file is not None:
        tmp = options.ready_file.with_suffix(".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(options.ready_file)


def run(options: ServeOptions) -> int:
    """Serve in this process until SIGTERM/SIGINT."""
    if options.workers > 1:
        return run_workers(options)
    running = start_service(options)
    _announce(
        options,
        {
            "listen": running.server.address,
            "metrics": f"{options.metrics_host}:{running.metrics_port}"
            if running.metrics_port
            else None,
            "policy_version": running.authorizer.version,
            "workers": 1,
            "kind": options.kind,
            "pid": os.getpid(),
        },
    )
    try:
        wait_for_stop_signal()
    finally:
        running.stop()
    return 0


# ---- worker processes --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervising process dies, even by SIGKILL, so no
    orphan keeps serving a stale policy on the port."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker_main(options: ServeOptions, index: int, ready: Any, parent: int) -> None:
    """One worker: the full service on the shared port (SO_REUSEPORT)."""
    from meshward.telemetry import setup_json_logging

    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return
    setup_json_logging(options.extra.get("log_level", "INFO"))
    try:
        running = start_service(options, reuse_port=True)
    except Exception as exc:
        ready.put((index, None, f"{type(exc).__name__}: {exc}"))
        return
    ready.put((index, running.port, running.authorizer.version))
    try:
        wait_for_stop_signal()
    finally:
        running.stop()


@contextlib.contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """Hold ``host:port`` (bound, not listening, SO_REUSEPORT) so the workers can all bind it and
    nobody else takes it in between; a bound socket that never listens gets no connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def run_workers(options: ServeOptions) -> int:
    """N processes serving one port; the parent restarts a worker that dies and serves the
    aggregated /metrics. Decision caches are per process."""
    stop = threading.Event()
    with on_stop_signals(stop.set):  # before spawning: a stop while starting is clean
        return _serve_workers(options, stop)


def _serve_workers(options: ServeOptions, stop: threading.Event) -> int:
    from meshward.extauthz.metrics import MULTIPROC_ENV

    context = multiprocessing.get_context("spawn")  # grpc state must not cross a fork
    metrics_dir: str | None = None
    if options.metrics_port is not None:
        metrics_dir = tempfile.mkdtemp(prefix="meshward-extauthz-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        with _reserved_port(options.host, options.port) as port:
            worker_options = ServeOptions(**{**options.__dict__, "port": port, "ready_file": None})
            ready: Any = context.Queue()
            processes: dict[int, Any] = {}

            def spawn(index: int) -> None:
                proc = context.Process(
                    target=_worker_main,
                    args=(worker_options, index, ready, os.getpid()),
                    name=f"extauthz-worker-{index}",
                )
                proc.start()
                processes[index] = proc

            for index in range(options.workers):
                spawn(index)
            version = _await_workers(processes, ready, options.workers, stop)
            if version is None:
                return 0  # stopped while starting
            metrics_port = None
            metrics_server = None
            if options.metrics_port is not None:
                from meshward.extauthz.metrics import serve_metrics

                metrics_server, metrics_port = serve_metrics(
                    options.metrics_port, options.metrics_host
                )
            _announce(
                options,
                {
                    "listen": f"{options.host}:{port}",
                    "metrics": f"{options.metrics_host}:{metrics_port}" if metrics_port else None,
                    "policy_version": version,
                    "workers": options.workers,
                    "kind": options.kind,
                    "pid": os.getpid(),
                },
            )
            _supervise(processes, spawn, ready, metrics_dir, stop)
            if metrics_server is not None:
                metrics_server.shutdown()
    finally:
        if metrics_dir is not None:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _await_workers(
    processes: dict[int, Any], ready: Any, count: int, stop: threading.Event
) -> str | None:
    """The policy version once every worker serves; UserError if one fails or dies first."""
    import queue

    version = ""
    started: set[int] = set()
    deadline = time.monotonic() + 60
    while len(started) < count:
        if stop.is_set():
            _terminate(processes)
            return None
        try:
            index, bound, detail = ready.get(timeout=0.2)
        except queue.Empty:
            dead = [i for i, p in processes.items() if i not in started and p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                _terminate(processes)
                why = (
                    f"exited with code {processes[dead[0]].exitcode}"
                    if dead
                    else "not serving after 60s"
                )
                raise UserError(
                    f"ext_authz worker {dead[0] if dead else '?'} {why}; see the log above"
                ) from None
            continue
        if bound is None:
            _terminate(processes)
            raise UserError(f"ext_authz worker {index} failed to start: {detail}")
        started.add(index)
        version = detail
    return version


def _supervise(
    processes: dict[int, Any],
    spawn: Callable[[int], None],
    ready: Any,
    metrics_dir: str | None,
    stop: threading.Event,
) -> None:
    restarts: dict[int, float] = {}
    while not stop.wait(0.5):
        for index, proc in list(processes.items()):
            if proc.is_alive():
                continue
            log.warning("ext_authz worker %d exited with %s; restarting", index, proc.exitcode)
            if metrics_dir is not None:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            if time.monotonic() - restarts.get(index, 0.0) < 1.0:
                time.sleep(1.0)  # a worker that dies at once must not spin the CPU
            restarts[index] = time.monotonic()
            spawn(index)
        with contextlib.suppress(Exception):
            while True:
                ready.get_nowait()
    _terminate(processes)


def _terminate(processes: dict[int, Any]) -> None:
    for proc in processes.values():
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in processes.values():
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
