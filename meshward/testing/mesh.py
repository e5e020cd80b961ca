"""The one mesh builder of the tests and benchmarks: echo apps, real Envoy sidecars, a control plane.

:class:`Mesh` starts an echo backend per workload, an in-process control plane watching a policy
directory, and one sidecar per workload, all on 127.0.0.1 with ports picked at run time:

- ``sidecars="agent"`` (the default, as in production): a ``meshward agent`` process per
  workload joins with a fresh one-time token, keeps its key on the node, serves SVID and bundle
  to its Envoy over SDS on a Unix socket and starts that Envoy.
- ``sidecars="bootstrap"``: the path of operators who run Envoy themselves: ``meshward
  bootstrap`` (a process) makes the key, joins with a fresh token and writes the sidecar
  directory; Envoy is started from its bootstrap and reads its SVID from those files
  (:meth:`Mesh.renew_bootstrap` re-runs it with ``--renew``).
Either way the control plane never makes a workload key.

``control_plane="process"`` runs the control plane (and, with ``extauthz``, ext_authz) as real
``meshward xds serve`` / ``meshward extauthz serve`` processes instead
(:mod:`meshward.testing.servers`): what the demo and the fault tests run, so a server can be
SIGKILLed and restarted where it listened. ``apps="process"`` runs each echo app as a process
too (the demo: every part of the mesh is a process an operator would see).

Processes go through the one launcher, :class:`meshward.testing.processes.Launcher`, so a
sidecar or agent that dies is named with its log. An agent seen from outside (its command line,
its readiness, a handle on the Envoy it runs) is :mod:`meshward.testing.agentproc`.
Agent state directories live under a short private /tmp directory: Unix socket paths are limited
to ~100 bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from meshward.envoy.process import EnvoyProcess
from meshward.testing import status_poll
from meshward.testing.agentproc import (
    ENVOY_DRAIN_ARGS,
    AgentEnvoy,
    agent_argv,
    agent_serving,
    agent_status,
    bootstrap_sidecar,
    slug,
    write_join_token,
)
from meshward.testing.processes import Component, Launcher
from meshward.testing.servers import EXTAUTHZ, XDS
from meshward.testing.xds_resources import http_request

if TYPE_CHECKING:
    from meshward.policy import WorkloadPort

Sidecars = Literal["agent", "bootstrap"]
Where = Literal["thread", "process"]
#: What the mesh waits for once every process is up (the demo prints it).
CONVERGED = "every sidecar has its listeners, routes, clusters and certificates (ADS ACKed)"


# -- the mesh ---------------------------------------------------------------------------------------
class Mesh:
    """Echo backends, each behind a real Envoy sidecar that gets everything over ADS from a
    control plane watching ``policy_dir``, in this process or a process of its own (see the
    module docstring).

    ``delta``: refs of the sidecars that use DELTA_GRPC (the others use SotW).
    ``compiler_hook``: wraps each workload's compiled resources (tests inject faults with it).
    ``agent_args``: extra ``meshward agent`` flags (e.g. faster renewal).

    With ``control_plane="process"`` (agent sidecars only): ``xds_args``/``xds_env`` add to
    ``meshward xds serve``'s command line and environment; ``extauthz`` (flags, or a function
    of the started mesh returning them, for flags that need its CA) runs ``meshward extauthz
    serve`` too; ``extra_ports`` are workload ports bound ahead that a test declares later.
    ``launcher``: the launcher to start processes with (the demo's prints progress);
    ``state_root``: where agents keep their state (default a private /tmp directory, removed on
    stop); ``timeout``: seconds each process has to become ready, and the mesh to converge.
    """

    def __init__(
        self,
        policy_dir: Any,
        workdir: Any,
        workloads: Iterable[str],
        *,
        sidecars: Sidecars = "agent",
        delta: Iterable[str] = (),
        svid_ttl: timedelta | None = None,
        schedule: Any = None,
        compiler_hook: Callable[[Any, list[Any]], Any] | None = None,
        drift_threshold: float = 10.0,
        log_level: str = "warning",
        watch_interval: float = 0.1,
        jwks_refresh_interval: float | None = None,
        flows_db: Any = None,
        agent_args: tuple[str, ...] = (),
        control_plane: Where = "thread",
        apps: Where = "thread",
        xds_args: Sequence[str] = (),
        xds_env: Mapping[str, str] | None = None,
        extauthz: Sequence[str] | Callable[[Mesh], Sequence[str]] | None = None,
        envoy_args: Sequence[str] = ENVOY_DRAIN_ARGS,
        drain_seconds: float = 0.5,
        extra_ports: Mapping[str, Sequence[WorkloadPort]] | None = None,
        launcher: Launcher | None = None,
        state_root: Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        if sidecars not in ("agent", "bootstrap"):
            raise ValueError(f"sidecars: 'agent' or 'bootstrap', not {sidecars!r}")
        if control_plane not in ("thread", "process") or apps not in ("thread", "process"):
            raise ValueError(
                f"control_plane, apps: 'thread' or 'process' ({control_plane!r}, {apps!r})"
            )
        if control_plane == "process" and (sidecars != "agent" or compiler_hook is not None):
            raise ValueError("control_plane='process' runs agent sidecars and no compiler hook")
        if extauthz is not None and control_plane != "process":
            raise ValueError("extauthz runs as a process beside a control_plane='process'")
        self.control_plane: Where = control_plane
        self.apps: Where = apps
        self.xds_args = tuple(xds_args)
        self.xds_env = dict(xds_env or {})
        self.extauthz = extauthz
        self.envoy_args = tuple(envoy_args)
        self.drain_seconds = drain_seconds
        self.extra_ports = {ref: tuple(ports) for ref, ports in (extra_ports or {}).items()}
        self.timeout = timeout
        self.servers: Any = None  # ServerProcesses, with control_plane="process"
        self.app_ports: dict[str, int] = {}  # ref -> the port its app listens on
        self.sidecars: Sidecars = sidecars
        self.policy_dir = Path(policy_dir)
        self.workdir = Path(workdir)
        self.refs = list(workloads)
        self.delta = set(delta)
        self.svid_ttl = svid_ttl or timedelta(hours=1)
        self.schedule = schedule
        self.compiler_hook = compiler_hook
        self.drift_threshold = drift_threshold
        self.log_level = log_level
        self.watch_interval = watch_interval
        self.jwks_refresh_interval = jwks_refresh_interval  # None: meshward.xds.jwks default
        self.flows_db = flows_db  # a flow store: sidecars stream flow logs to the control plane
        self.agent_args = agent_args
        self.launcher = launcher or Launcher(
            self.workdir, quiet=True, logs=self.workdir / "mesh-logs"
        )
        self.echoes: dict[str, Any] = {}
        self.envoys: dict[str, EnvoyProcess] = {}
        self.xds: Any = None
        self.ca: Any = None
        self.ca_dir = self.workdir / "ca"
        self.bindings: dict[str, Any] = {}
        self.trust_domain = "cluster.local"
        self.root_namespace = "meshward-system"
        self._own_state_root = state_root is None  # short: Unix socket paths
        self.state_root: Path = (
            Path(tempfile.mkdtemp(prefix="mwa-")) if state_root is None else state_root
        )
        self._compiler: Any = None

    @property
    def supervisor(self) -> Launcher:  # the name the demo's and soak's code know
        return self.launcher

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> Mesh:
        from dataclasses import replace

        from meshward.compile import CompileOptions, runtime_bindings
        from meshward.net import free_port
        from meshward.policy import load
        from meshward.xds.bootstrap import XDS_CLUSTER

        timeout = self.timeout if timeout is None else timeout
        policy = load([self.policy_dir])
        self.trust_domain = policy.mesh.trust_domain
        self.root_namespace = policy.mesh.root_namespace
        self._policy = policy
        self._start_apps()
        workloads = [
            replace(w, ports=(*w.ports, *self.extra_ports[w.ref]))
            if w.ref in self.extra_ports
            else w
            for w in policy.workloads
        ]
        app_ports = {
            (w.ref, p.port): self.app_ports[w.ref]
            for w in workloads
            if w.ref in self.app_ports
            for p in w.ports
        }
        supply = (free_port() for _ in itertools.count())
        self.bindings = runtime_bindings(workloads, supply, app_ports=app_ports)
        if self.control_plane == "process":
            return self._start_processes(timeout)
        options = CompileOptions(
            bindings=self.bindings,
            listen_host="127.0.0.1",
            access_log_path="/dev/stdout",
            flow_log_cluster=XDS_CLUSTER if self.flows_db is not None else None,
        )
        self._compiler = self._make_compiler(options)
        self._make_ca()
        self.start_control_plane()
        for ref in self.refs:
            self.start_sidecar(ref)
        self.launcher.wait_ready()
        self.wait_converged(timeout=timeout)
        return self

    def _start_apps(self) -> None:
        """One echo app per workload: in this process, or (``apps="process"``) as a process."""
        from meshward.net import free_port
        from meshward.testing.echo import EchoServer
        from meshward.testing.processes import port_open

        for ref in self.refs:
            name = ref.split("/")[1]
            if self.apps == "thread":
                echo = EchoServer(name)
                echo.__enter__()
                self.echoes[ref] = echo
                self.app_ports[ref] = echo.port
                continue
            port = self.app_ports[ref] = free_port()
            argv = [sys.executable, "-m", "meshward.testing.echo", "--name", name]
            argv += ["--port", str(port)]
            self.launcher.launch(
                name,
                argv,
                ready=lambda port=port: port_open(port),  # type: ignore[misc]
                timeout=self.timeout,
                what=f"{ref} app on 127.0.0.1:{port}",
            )

    def _start_processes(self, timeout: float) -> Mesh:
        """The control plane (and ext_authz) as processes, then the agents; wait until every
        sidecar has ACKed its config, naming what lags if it does not."""
        from meshward.xds.cli import dump_bindings

        run = self.workdir / "run"
        run.mkdir(parents=True, exist_ok=True)
        self._bindings_file = run / "bindings.json"
        self._bindings_file.write_text(json.dumps(dump_bindings(self.bindings), indent=2) + "\n")
        self._make_ca()
        self.start_control_plane()
        for ref in self.refs:
            self.start_sidecar(ref)
        self.launcher.wait_ready()
        if self.servers.extauthz_argv is not None:
            self.servers.wait((EXTAUTHZ,))  # ready already: read where it listens

        def explain() -> str:
            try:
                return "; ".join(status_poll.lagging(self.status(), self.refs))
            except OSError as exc:
                return f"control plane status unreachable: {exc}"

        self.launcher.wait_for(
            CONVERGED,
            lambda: status_poll.converged(self.status(), self.refs),
            timeout=timeout,
            explain=explain,
        )
        return self

    def _make_compiler(self, options: Any) -> Any:
        from meshward.xds.compile_adapter import compiler_for
        from meshward.xds.jwks import JwksCache

        jwks = (
            JwksCache(refresh_interval=self.jwks_refresh_interval, retry_interval=0.2)
            if self.jwks_refresh_interval is not None
            else JwksCache()
        )
        compiler: Any = compiler_for(options, jwks=jwks)
        if self.compiler_hook is not None:
            inner, hook = compiler, self.compiler_hook

            def hooked(policy_set: Any, workload: Any, now: Any) -> Any:
                return hook(workload, list(inner(policy_set, workload, now)))

            hooked.jwks = jwks  # type: ignore[attr-defined]  # XdsService keeps it fresh
            return hooked
        return compiler

    def _make_ca(self) -> None:
        from meshward.certs import CertificateAuthority

        CertificateAuthority.init(
            self.ca_dir, self.trust_domain, force=True
        )  # on disk: join tokens
        self.ca = CertificateAuthority.load(self.ca_dir)

    def start_control_plane(self, listen: str = "127.0.0.1:0") -> None:
        """Start the control plane (a process: where it listened before, once it has)."""
        if self.control_plane == "process":
            self._start_control_plane_process()
            return
        from meshward.certs import CertificateAuthority
        from meshward.flows.service import flows_for
        from meshward.xds.service import XdsServiceThread

        # as a restarted `xds serve` would: the CA as it is on disk now
        self.ca = CertificateAuthority.load(self.ca_dir)
        self.xds = XdsServiceThread(
            None,
            self.ca,
            self._compiler,
            listen=listen,
            policy_paths=[self.policy_dir],
            watch_interval=self.watch_interval,
            svid_ttl=self.svid_ttl,
            schedule=self.schedule,
            drift_threshold=self.drift_threshold,
            flows=None if self.flows_db is None else flows_for(str(self.flows_db)),
            join_listen="127.0.0.1:0",
        ).start()

    def _start_control_plane_process(self) -> None:
        from meshward.testing.servers import ServerProcesses

        if self.servers is not None:
            self.servers.start(XDS)
            return
        extauthz = self.extauthz(self) if callable(self.extauthz) else self.extauthz
        xds_args = [
            "--watch-interval", str(self.watch_interval),
            "--svid-ttl", f"{self.svid_ttl.total_seconds():g}s",
            "--drift-threshold", f"{self.drift_threshold:g}s",
            *(["--flows-db", str(self.flows_db)] if self.flows_db is not None else []),
            *self.xds_args,
        ]  # fmt: skip
        self.servers = ServerProcesses(
            self.launcher,
            self.workdir / "run",
            policy_dir=self.policy_dir,
            ca_dir=self.ca_dir,
            bindings_file=self._bindings_file,
            xds_args=xds_args,
            xds_env=self.xds_env,
            extauthz_args=None if extauthz is None else list(extauthz),
            timeout=self.timeout,
        )
        self.servers.launch()
        self.servers.wait((XDS,))

    def kill_server(self, name: str) -> None:
        """SIGKILL a server process (``xds`` or ``extauthz``; no goodbye to anyone)."""
        self.servers.kill(name)

    def start_server(self, name: str, *, wait: bool = True) -> None:
        """Start a server process again, where it listened before."""
        self.servers.start(name, wait=wait)

    @property
    def ads_address(self) -> str:
        return str(self.servers.ads if self.servers is not None else self.xds.service.address)

    @property
    def join_address(self) -> str:
        return str(self.servers.join if self.servers is not None else self.xds.service.join_address)

    @property
    def admin_url(self) -> str:
        """The control plane's admin URL (``http://127.0.0.1:PORT``)."""
        if self.servers is not None:
            return str(self.servers.admin_url)
        return str(self.xds.service.admin_url)

    def stop_control_plane(self) -> str:
        """Stop the control plane; its ADS address, to start it there again."""
        if self.servers is not None:
            self.servers.stop(XDS)
            return self.ads_address
        address: str = self.xds.service.address
        self.xds.stop()
        return address

    def restart_control_plane(self, down: float) -> None:
        """Stop the control plane, stay down ``down`` seconds, start it on the same ADS port."""
        address = self.stop_control_plane()
        time.sleep(down)
        self.start_control_plane(address)

    # -- sidecars ----------------------------------------------------------------------------------
    def component(self, ref: str) -> Component:
        return self.launcher[self._name(ref)]

    def _name(self, ref: str) -> str:
        if self.control_plane == "process":  # as the demo's progress lines name them
            return f"{ref.split('/')[1]}-sidecar"
        return ("agent-" if self.sidecars == "agent" else "sidecar-") + slug(ref)

    def start_sidecar(self, ref: str, *, join: bool = True) -> Component:
        """Launch ``ref``'s sidecar (no waiting): its agent (``join``: with a fresh token, else
        resuming from its state directory), or its Envoy from a `meshward bootstrap` config."""
        if self.sidecars == "agent":
            return self.start_agent(ref, join=join)
        return self._start_envoy(ref)

    def run_bootstrap(self, ref: str, *extra: str, join: bool = False) -> dict[str, Any]:
        """Run `meshward bootstrap` for ``ref`` (``join``: first contact with a fresh token;
        ``extra``: e.g. ``--renew``); its JSON result."""
        workload = self._policy.workload(ref)
        account = workload.service_account if workload is not None else None
        service = self.xds.service
        return bootstrap_sidecar(
            self.ca_dir, ref, service.address, service.join_address if join else None,
            self.state_root, "--trust-domain", self.trust_domain,
            "--root-namespace", self.root_namespace,
            *(("--service-account", account) if account else ()),
            "--delta" if ref in self.delta else "--sotw", *extra,
        )  # fmt: skip

    def renew_bootstrap(self, ref: str) -> dict[str, Any]:
        """`meshward bootstrap --renew` for an operator-run sidecar (what its cron would run)."""
        return self.run_bootstrap(ref, "--renew")

    def _start_envoy(self, ref: str) -> Component:
        result = self.run_bootstrap(ref, join=True)
        config = json.loads(Path(result["bootstrap"]).read_text())
        name = ref.split("/")[1]
        envoy = EnvoyProcess(
            config,
            name=f"{name}-sidecar",
            workdir=self.workdir / f"{name}-sidecar",
            log_level=self.log_level,
            extra_args=ENVOY_DRAIN_ARGS,
        )
        self.envoys[ref] = envoy
        return self.launcher.launch_envoy(self._name(ref), envoy, timeout=60)

    def state_dir(self, ref: str) -> Path:
        """The agent's state directory, or the `meshward bootstrap` sidecar directory."""
        if self.sidecars == "bootstrap":
            namespace, name = ref.split("/")
            return self.state_root / f"{name}.{namespace}"
        return self.state_root / slug(ref)

    def start_agent(self, ref: str, *, join: bool) -> Component:
        state = self.state_dir(ref)
        workload = self._policy.workload(ref)
        join_args: dict[str, Any] = {}
        if join:
            roots = self.workdir / "root.pem"
            roots.write_bytes(self._roots_pem())
            join_args = {
                "join": self.join_address,
                "token_file": write_join_token(
                    self.ca_dir, ref, self.workdir / f"{slug(ref)}.token"
                ),
                "root_cert": roots,
            }
        argv = agent_argv(
            ref,
            self.ads_address,
            state,
            trust_domain=self.trust_domain,
            root_namespace=self.root_namespace,
            service_account=workload.service_account if workload is not None else None,
            delta=ref in self.delta,
            envoy_args=self.envoy_args,
            drain_seconds=self.drain_seconds,
            log_level=self.log_level,
            extra=self.agent_args,
            **join_args,
        )
        self.envoys[ref] = AgentEnvoy(state, name=f"{ref.split('/')[1]}-sidecar")
        return self.launcher.launch(
            self._name(ref),
            argv,
            ready=agent_serving(state),
            timeout=self.timeout,
            what=f"meshward agent + Envoy for {ref}",
        )

    def _roots_pem(self) -> bytes:
        """The trust bundle a joining agent starts from: the running control plane's (a
        process: the CA on disk it loaded)."""
        if self.servers is not None:
            from meshward.certs import CertificateAuthority

            return CertificateAuthority.load(self.ca_dir).trust_bundle().roots_pem
        pem: bytes = self.xds.service.control.ca.trust_bundle().roots_pem
        return pem

    def wait_agent(self, ref: str, timeout: float = 60.0) -> dict[str, Any]:
        self.launcher.wait_ready([self._name(ref)])
        return self.agent_status(ref)

    def agent_status(self, ref: str) -> dict[str, Any]:
        return agent_status(self.state_dir(ref))

    def agent_log(self, ref: str) -> str:
        """The agent's output (still there after :meth:`stop`)."""
        path = self.launcher.logs / f"{self._name(ref)}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def envoy_log(self, ref: str) -> str:
        path = self.envoys[ref].log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(
        self, ref: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        """Wait until ``ref``'s agent status satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.agent_status(ref)
            if status and predicate(status):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"agent {ref}: condition not met; status {self.agent_status(ref)}")

    def kill_agent(self, ref: str) -> None:
        """SIGKILL the agent: no drain, no cleanup; its Envoy keeps running in its own session."""
        self.launcher.kill(self._name(ref))

    def stop_agent(self, ref: str, timeout: float = 20.0) -> int | None:
        return self.launcher.stop(self._name(ref), timeout)

    # -- addresses --------------------------------------------------------------------------------
    def inbound_port(self, ref: str, port: int = 8080) -> int:
        return int(self.bindings[ref].ports[port].listen.port)

    def outbound_port(self, source: str, target: str, port: int = 8080) -> int:
        return int(self.bindings[source].outbound[f"{target}:{port}"].port)

    # -- requests ---------------------------------------------------------------------------------
    def request(
        self,
        source: str,
        target: str,
        path: str = "/",
        *,
        method: str = "GET",
        port: int = 8080,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """``source`` calls ``target`` through its sidecar (outbound listener -> mTLS -> target's
        inbound listener -> target's app): (status, body)."""
        return http_request(
            self.outbound_port(source, target, port), path, method, timeout, headers=headers
        )

    def plaintext(self, target: str, path: str = "/", *, method: str = "GET") -> tuple[int, str]:
        """A client without a sidecar calling ``target``'s inbound listener directly."""
        return http_request(self.inbound_port(target), path, method, 5.0)

    # -- control plane ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self.servers is not None:
            return status_poll.fetch_status(self.servers.admin_url)
        result: dict[str, Any] = self.xds.status()
        return result

    def converged(self, policy_version: str | None = None) -> bool:
        status = self.status()
        if self.servers is not None:
            return status_poll.converged(status, self.refs, policy_version)
        if policy_version is not None and status["policy"]["version"] != policy_version:
            return False
        nodes = {n["node"]: n for n in status["nodes"]}
        for ref in self.refs:
            node = nodes.get(ref)
            if node is None or not node["connected"]:
                return False
            for stream in node["streams"]:
                if not stream["types"] or not all(t["in_sync"] for t in stream["types"]):
                    return False
        return True

    def wait_converged(self, policy_version: str | None = None, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # a control plane process (re)starting
                if self.converged(policy_version):
                    return
            time.sleep(0.05)
        logs = "\n".join(
            f"--- {ref}\n{self.agent_log(ref)[-2000:]}\n{self.envoy_log(ref)[-2000:]}"
            for ref in self.refs
        )
        try:
            status = self.status()
            nodes: Any = status["nodes"]
            if self.servers is not None:
                nodes = "; ".join(status_poll.lagging(status, self.refs, policy_version))
        except OSError as exc:
            nodes = f"control plane status unreachable: {exc}"
        raise TimeoutError(f"mesh did not converge in {timeout}s: {nodes}\n{logs}")

    def access_log(self, ref: str) -> list[dict[str, Any]]:
        entries = []
        for line in self.envoy_log(ref).splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue
        return entries

    def stop(self) -> None:
        try:
            self.launcher.stop_all()
            for envoy in self.envoys.values():
                if isinstance(envoy, AgentEnvoy):
                    envoy.stop()  # an Envoy whose agent was killed and never restarted
            if self.xds is not None:
                self.xds.stop()
        finally:
            for echo in self.echoes.values():
                echo.__exit__(None, None, None)
            if self.state_root is not None and self._own_state_root:
                shutil.rmtree(self.state_root, ignore_errors=True)

    def __enter__(self) -> Mesh:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The names the tests knew: LocalMesh (Envoy from `meshward bootstrap`, now the agent by
#: default) and AgentMesh (the agent) are the one builder.
LocalMesh = Mesh
AgentMesh = Mesh

__all__ = [
    "CONVERGED",
    "ENVOY_DRAIN_ARGS",
    "AgentEnvoy",
    "AgentMesh",
    "LocalMesh",
    "Mesh",
    "agent_argv",
    "agent_serving",
    "agent_status",
    "bootstrap_sidecar",
    "http_request",
    "slug",
    "write_join_token",
]
