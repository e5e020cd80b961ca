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

Processes go through the one launcher, :class:`meshward.testing.processes.Launcher`, so a
sidecar or agent that dies is named with its log. The pieces the demo and the fault mesh share
(an agent's command line, its readiness, a handle on the Envoy it runs) are functions here.
Agent state directories live under a short private /tmp directory: Unix socket paths are limited
to ~100 bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from meshward.envoy.process import EnvoyProcess, tail
from meshward.testing.processes import (
    Component,
    Launcher,
    ReadyCheck,
    StartFailed,
    meshward_argv,
)
from meshward.testing.xds_resources import http_request

Sidecars = Literal["agent", "bootstrap"]

#: A listener update (an mTLS mode change, or a new kind of authorization filter; rule edits only
#: change the route config) leaves open connections on the old listener until they drain;
#: Envoy's default drains gradually over 600 s. Closing them at the next response keeps tests
#: that change the filter set quick.
ENVOY_DRAIN_ARGS = ("--drain-time-s", "2", "--drain-strategy", "immediate")


# -- pieces shared with the demo and the fault mesh ------------------------------------------------
def slug(ref: str) -> str:
    return ref.replace("/", "-")


def agent_argv(
    ref: str,
    xds: str,
    state_dir: Path,
    *,
    trust_domain: str = "cluster.local",
    root_namespace: str = "meshward-system",
    service_account: str | None = None,
    join: str | None = None,
    token_file: Path | None = None,
    root_cert: Path | None = None,
    delta: bool = False,
    envoy_args: Iterable[str] = ENVOY_DRAIN_ARGS,
    drain_seconds: float = 0.5,
    log_level: str = "warning",
    extra: Iterable[str] = (),
) -> list[str]:
    """``meshward agent`` for one workload; with ``join``/``token_file``/``root_cert`` it makes
    first contact with a join token, without them it resumes from the SVID in ``state_dir``."""
    argv = meshward_argv(
        "agent", "--workload", ref, "--xds", xds, "--dir", str(state_dir),
        "--trust-domain", trust_domain, "--root-namespace", root_namespace,
        "--drain-seconds", str(drain_seconds), "--envoy-log-level", log_level,
        *(f"--envoy-arg={arg}" for arg in envoy_args),
    )  # fmt: skip
    if service_account:
        argv += ["--service-account", service_account]
    if delta:
        argv.append("--delta")
    if join is not None:
        assert token_file is not None and root_cert is not None
        argv += [
            "--join",
            join,
            "--join-token-file",
            str(token_file),
            "--root-cert",
            str(root_cert),
        ]
    return argv + list(extra)


def write_join_token(
    ca_dir: Path, ref: str, path: Path, ttl: timedelta = timedelta(minutes=10)
) -> Path:
    """A fresh one-time join token for ``ref`` (what `meshward ca join-token` prints), 0600."""
    from meshward.certs.jointoken import load_or_create_key, mint

    path.write_text(mint(load_or_create_key(ca_dir), ref, ttl=ttl) + "\n")
    path.chmod(0o600)
    return path


def bootstrap_sidecar(
    ca_dir: Path, ref: str, xds: str, join: str | None, out: Path, *extra: str
) -> dict[str, Any]:
    """`meshward bootstrap` as an operator runs it (a process): with ``join``, first contact
    with a fresh join token (and the CA's roots to authenticate the control plane); without,
    ``extra`` says what (e.g. ``--renew``). Its ``--json`` result; StartFailed if it failed."""
    import subprocess

    argv = meshward_argv("bootstrap", "--workload", ref, "--xds", xds, "--out", str(out), "--json")
    if join is not None:
        from meshward.certs import CertificateAuthority

        roots = out.parent / f"{slug(ref)}.roots.pem"
        roots.write_bytes(CertificateAuthority.load(ca_dir).trust_bundle().roots_pem)
        token = write_join_token(ca_dir, ref, out.parent / f"{slug(ref)}.token")
        argv += ["--join", join, "--join-token-file", str(token), "--root-cert", str(roots)]
    done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise StartFailed(f"meshward bootstrap {ref} exited {done.returncode}: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def agent_status(state_dir: Path) -> dict[str, Any]:
    """The agent's health (its ``status.json``), {} while it has written none."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((state_dir / "status.json").read_text())
        if isinstance(data, dict):
            return data
    return {}


def agent_serving(state_dir: Path) -> ReadyCheck:
    """Ready once the agent holds an SVID and its Envoy answers ``/ready`` LIVE. An Envoy that
    exits before it was ever ready is a failed start (StartFailed, with Envoy's log), though the
    agent keeps restarting it with backoff as it should in production."""
    envoy = AgentEnvoy(state_dir)

    def check() -> bool:
        status = agent_status(state_dir)
        proxy = status.get("envoy") or {}
        if status.get("state") == "serving" and proxy.get("running") and envoy.ready():
            return True
        if proxy.get("restarts", 0) >= 1:
            raise StartFailed(
                f"its Envoy exited before it was ready; Envoy's last log lines "
                f"({envoy.log_path}):\n{tail(envoy.log_path, 10)}"
            )
        return False

    return check


class AgentEnvoy(EnvoyProcess):
    """The Envoy a `meshward agent` runs, seen from outside: its admin socket, log, pid and
    config in the agent's state directory. Admin helpers (stats, config_dump, ...) work as on
    any EnvoyProcess; starting and stopping it is the agent's job."""

    def __init__(self, state_dir: Path, name: str = "envoy") -> None:
        # Deliberately not EnvoyProcess.__init__: nothing here starts a process.
        self.name = name
        self.state_dir = state_dir
        self.workdir = state_dir / "envoy"
        self.admin_socket = state_dir / "admin.sock"
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.log_level = "warning"
        self.extra_args = []
        self._socket_dir = None
        self._proc = None

    @property
    def config(self) -> dict[str, Any]:  # type: ignore[override]
        data: dict[str, Any] = json.loads(self.config_path.read_text())
        return data

    @property
    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.workdir / "envoy.pid").read_text())
        return None

    @property
    def returncode(self) -> int | None:
        return None

    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        # a zombie (its agent was SIGKILLed and nobody reaped it) does not serve
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return True

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> EnvoyProcess:
        raise RuntimeError("the agent starts its Envoy")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGKILL an Envoy left behind (its agent was killed and not restarted)."""
        pid = self.pid
        if pid is not None and self.running():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return None


# -- the mesh ---------------------------------------------------------------------------------------
class Mesh:
    """Echo backends, each behind a real Envoy sidecar that gets everything over ADS from an
    in-process control plane watching ``policy_dir`` (see the module docstring).

    ``delta``: refs of the sidecars that use DELTA_GRPC (the others use SotW).
    ``compiler_hook``: wraps each workload's compiled resources (tests inject faults with it).
    ``agent_args``: extra ``meshward agent`` flags (e.g. faster renewal).
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
    ) -> None:
        if sidecars not in ("agent", "bootstrap"):
            raise ValueError(f"sidecars: 'agent' or 'bootstrap', not {sidecars!r}")
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
        self.launcher = Launcher(self.workdir, quiet=True, logs=self.workdir / "mesh-logs")
        self.echoes: dict[str, Any] = {}
        self.envoys: dict[str, EnvoyProcess] = {}
        self.xds: Any = None
        self.ca: Any = None
        self.ca_dir = self.workdir / "ca"
        self.bindings: dict[str, Any] = {}
        self.trust_domain = "cluster.local"
        self.root_namespace = "meshward-system"
        self.state_root = Path(tempfile.mkdtemp(prefix="mwa-"))  # short: Unix socket paths
        self._compiler: Any = None

    @property
    def supervisor(self) -> Launcher:  # the name the demo's and soak's code know
        return self.launcher

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Mesh:
        from meshward.compile import CompileOptions, runtime_bindings
        from meshward.net import free_port
        from meshward.policy import load
        from meshward.testing.echo import EchoServer
        from meshward.xds.bootstrap import XDS_CLUSTER

        policy = load([self.policy_dir])
        self.trust_domain = policy.mesh.trust_domain
        self.root_namespace = policy.mesh.root_namespace
        self._policy = policy
        for ref in self.refs:
            echo = EchoServer(ref.split("/")[1])
            echo.__enter__()
            self.echoes[ref] = echo
        app_ports = {
            (w.ref, p.port): self.echoes[w.ref].port
            for w in policy.workloads
            if w.ref in self.echoes
            for p in w.ports
        }
        supply = (free_port() for _ in itertools.count())
        self.bindings = runtime_bindings(policy.workloads, supply, app_ports=app_ports)
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

        CertificateAuthority.init(self.ca_dir, self.trust_domain)  # on disk: join tokens
        self.ca = CertificateAuthority.load(self.ca_dir)

    def start_control_plane(self, listen: str = "127.0.0.1:0") -> None:
        from meshward.certs import CertificateAuthority
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
            flows_db=None if self.flows_db is None else str(self.flows_db),
            join_listen="127.0.0.1:0",
        ).start()

    def stop_control_plane(self) -> str:
        """Stop the control plane; its ADS address, to start it there again."""
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
            *(("--delta",) if ref in self.delta else ()), *extra,
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
        service = self.xds.service
        state = self.state_dir(ref)
        workload = self._policy.workload(ref)
        join_args: dict[str, Any] = {}
        if join:
            roots = self.workdir / "root.pem"
            roots.write_bytes(service.control.ca.trust_bundle().roots_pem)
            join_args = {
                "join": service.join_address,
                "token_file": write_join_token(
                    self.ca_dir, ref, self.workdir / f"{slug(ref)}.token"
                ),
                "root_cert": roots,
            }
        argv = agent_argv(
            ref,
            service.address,
            state,
            trust_domain=self.trust_domain,
            root_namespace=self.root_namespace,
            service_account=workload.service_account if workload is not None else None,
            delta=ref in self.delta,
            log_level=self.log_level,
            extra=self.agent_args,
            **join_args,
        )
        self.envoys[ref] = AgentEnvoy(state, name=f"{ref.split('/')[1]}-sidecar")
        return self.launcher.launch(self._name(ref), argv, ready=agent_serving(state), timeout=60)

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
        result: dict[str, Any] = self.xds.status()
        return result

    def converged(self, policy_version: str | None = None) -> bool:
        status = self.status()
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
            if self.converged(policy_version):
                return
            time.sleep(0.05)
        logs = "\n".join(
            f"--- {ref}\n{self.agent_log(ref)[-2000:]}\n{self.envoy_log(ref)[-2000:]}"
            for ref in self.refs
        )
        raise TimeoutError(f"mesh did not converge in {timeout}s: {self.status()['nodes']}\n{logs}")

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
            if self.state_root is not None:
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
    "AgentEnvoy",
    "AgentMesh",
    "LocalMesh",
    "Mesh",
    "agent_argv",
    "agent_serving",
    "agent_status",
    "bootstrap_sidecar",
    "http_request",
    "write_join_token",
]
