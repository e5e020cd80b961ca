"""The local mesh as processes on 127.0.0.1: what ``meshward demo`` starts.

- a fresh CA in ``<state>/ca`` and the example policies copied to ``<state>/policies`` (the live
  edit changes the copy, never the repository);
- ``meshward xds serve`` (control plane) and ``meshward extauthz serve`` as processes (ext_authz
  over mTLS with an SVID for ``meshward-extauthz`` from the demo's CA, in ``run/extauthz-tls``);
- each shop workload's app (``python -m meshward.testing.echo``) and its sidecar: a ``meshward agent``
  (``xds serve --secrets agent``) that generates the key, joins with a one-time token, serves
  SVID and bundle to its Envoy over SDS on a Unix socket and starts that Envoy (ADS over mTLS
  with the same SVID; everything else over ADS);
- a trace collector of its own when no ``--otlp-endpoint`` is given (Envoy stamps trace ids only
  when it has a tracer, and the tour and ``meshward denials`` key on trace ids).

Ports come from the kernel at run time. Independent processes start in parallel: apps,
ext_authz and the control plane at once, then every sidecar once the control plane listens.
``start()`` returns the :class:`~meshward.demo.state.DemoState` it also writes to ``state.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from meshward.demo import state as demo_state
from meshward.demo import status_poll
from meshward.errors import UserError
from meshward.telemetry.tracing import OTLP_ENDPOINT_ENV
from meshward.testing.mesh import AgentEnvoy
from meshward.testing.processes import ComponentFailed, Launcher
from meshward.xds.bootstrap import ENVOY_ARGS

EXAMPLES_ENV = "MESHWARD_EXAMPLES"
SIGNING_KEY = Path("demo-keys") / "jwt-signing-key.pem"
ACCESS_LOG = "access.log"  # relative: each sidecar writes it in its own working directory
MARKER = ".meshward-demo"  # a state directory the demo may wipe and refill


def find_examples(explicit: str | Path | None = None) -> Path:
    """``--examples``, else ``$MESHWARD_EXAMPLES``, else the checkout's ``examples/``."""
    import meshward

    if explicit:
        chosen = Path(explicit)
        if not (chosen / "workloads.yaml").is_file():
            raise UserError(f"--examples {chosen}: no workloads.yaml there")
        return chosen
    candidates = [
        Path(os.environ[EXAMPLES_ENV]) if os.environ.get(EXAMPLES_ENV) else None,
        Path(meshward.__file__).resolve().parent.parent / "examples",
        Path.cwd() / "examples",
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "workloads.yaml").is_file():
            return candidate
    raise UserError(
        "cannot find the example policies (examples/workloads.yaml); run from a Meshward "
        f"checkout, or pass --examples DIR (or set ${EXAMPLES_ENV})"
    )


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def claim(directory: Path) -> None:
    """Make ``directory`` the demo's to wipe and refill: new, empty, or used by it before."""
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()) and not (directory / MARKER).exists():
        raise UserError(
            f"--state {directory} holds other files; give an empty or new directory (or one "
            "an earlier `meshward demo --state` used): the demo wipes and refills it"
        )
    (directory / MARKER).write_text("state directory of `meshward demo`; wiped on each run\n")


@dataclass
class MeshOptions:
    state_dir: Path
    examples: Path
    otlp_endpoint: str | None = None  # None: the demo's own collector (traces.jsonl)
    timeout: float = 30.0  # per component
    log_allows: bool = True  # ext_authz logs allows too, so the tour can show who allowed
    # Envoy batches spans (5 s or 5 spans); the demo asks for every span at once so a trace is
    # complete in the collector while the tour is still printing.
    tune_tracing: bool = True


#: Envoy runtime keys of its OpenTelemetry tracer (defaults: 5 spans, 5000 ms).
PROMPT_TRACING = {
    "tracing.opentelemetry.min_flush_spans": 1,
    "tracing.opentelemetry.flush_interval_ms": 1000,
}


class DemoMesh:
    """Context manager: ``with DemoMesh(options, out=...) as mesh: mesh.state ...``."""

    def __init__(
        self, options: MeshOptions, *, out: TextIO | None = None, quiet: bool = False
    ) -> None:
        self.options = options
        self.dir = options.state_dir
        claim(self.dir)
        self.supervisor = Launcher(self.dir, out=out, quiet=quiet)
        self.state: demo_state.DemoState | None = None
        self.refs: list[str] = []
        self._sink: Any = None
        self._rotator: Any = None  # keeps the sidecars' access logs under their cap
        self.otlp_endpoint = ""  # where spans go: --otlp-endpoint or the demo's own collector
        self.agents: dict[str, Path] = {}  # ref -> its agent's state directory
        self._short_root: Path | None = None

    # -- preparation (no processes) -----------------------------------------------------------
    def _prepare(self) -> tuple[Any, Any]:
        """Fresh CA, fresh copy of the policies, clean logs; return (policy set, CA)."""
        from meshward.certs import CertificateAuthority
        from meshward.policy import PolicyError, load

        for stale in ("policies", "sidecars", "agents", "logs", "run"):
            shutil.rmtree(self.dir / stale, ignore_errors=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        for name in ("traces.jsonl", demo_state.STATE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
        policies = self.dir / "policies"
        policies.mkdir()
        for source in sorted(self.options.examples.iterdir()):
            if source.suffix in (".yaml", ".yml") and source.is_file():
                shutil.copy2(source, policies / source.name)
        try:
            policy = load([policies])
        except PolicyError as exc:
            raise UserError(f"the example policies do not load:\n{exc}") from None
        ca = CertificateAuthority.init(self.dir / "ca", policy.mesh.trust_domain, force=True)
        return policy, ca

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> demo_state.DemoState:
        from meshward.compile import runtime_bindings
        from meshward.net import free_port
        from meshward.xds.cli import dump_bindings

        sup = self.supervisor
        started = time.monotonic()
        policy, ca = self._prepare()
        workloads = sorted(policy.workloads, key=lambda w: w.ref)
        self.refs = [w.ref for w in workloads]
        python = sys.executable
        env = {"PYTHONUNBUFFERED": "1"}

        otlp = self.options.otlp_endpoint
        trace_file: Path | None = None
        if otlp is None:
            from meshward.demo.traces import SpanFile

            trace_file = self.dir / "traces.jsonl"
            self._sink = SpanFile(trace_file).start()
            otlp = self._sink.endpoint
        self.otlp_endpoint = otlp

        # Apps, ext_authz and the control plane do not depend on each other: start them at once.
        app_ports = {(w.ref, p.port): free_port() for w in workloads for p in w.ports}
        for w in workloads:
            port = app_ports[(w.ref, w.ports[0].port)]
            sup.launch(
                w.name,
                [python, "-m", "meshward.testing.echo", "--name", w.name, "--port", str(port)],
                ready=lambda port=port: _port_open(port),  # type: ignore[misc]
                env=env,
                timeout=self.options.timeout,
                what=f"{w.ref} app on 127.0.0.1:{port}",
            )
        supply = (free_port() for _ in itertools.count())
        bindings = runtime_bindings(workloads, supply, app_ports=app_ports)
        bindings_file = self.dir / "run" / "bindings.json"
        bindings_file.write_text(json.dumps(dump_bindings(bindings), indent=2) + "\n")

        from meshward.testing.extauthz import issue_service_tls

        extauthz_port = free_port()
        extauthz_ready = self.dir / "run" / "extauthz.json"
        extauthz_tls = issue_service_tls(ca, policy.mesh, self.dir / "run" / "extauthz-tls")
        decision_log = self.dir / "logs" / "decisions.jsonl"
        extauthz_argv = [
            python, "-m", "meshward", "extauthz", "serve",
            "--policy", str(self.dir / "policies"),
            "--listen", f"127.0.0.1:{extauthz_port}",
            "--tls-dir", str(extauthz_tls.directory),
            "--metrics-listen", "127.0.0.1:0",
            "--decision-log", str(decision_log),
            "--otlp-endpoint", otlp,
            "--poll-interval", "0.2",
            "--ready-file", str(extauthz_ready),
        ]  # fmt: skip
        if self.options.log_allows:
            extauthz_argv.append("--log-allows")
        sup.launch(
            "extauthz",
            extauthz_argv,
            ready=lambda: extauthz_ready.exists(),
            env=env,
            timeout=self.options.timeout,
            what=f"ext_authz on 127.0.0.1:{extauthz_port}",
        )
        xds_ready = self.dir / "run" / "xds.json"
        xds_argv = [
                python, "-m", "meshward", "xds", "serve",
                "--policy", str(self.dir / "policies"),
                "--ca", str(self.dir / "ca"),
                "--listen", "127.0.0.1:0",
                "--admin", "127.0.0.1:0",
                "--bindings", str(bindings_file),
                "--extauthz", f"127.0.0.1:{extauthz_port}",
                "--otlp", otlp,
                "--access-log", ACCESS_LOG,
                "--watch-interval", "0.2",
                "--flows-db", str(self.dir / "flows.db"),
                "--secrets", "agent",  # sidecars run under `meshward agent`: keys stay with them
                "--join-listen", "127.0.0.1:0",
                "--ready-file", str(xds_ready),
        ]  # fmt: skip
        sup.launch(
            "xds",
            xds_argv,
            ready=lambda: xds_ready.exists(),
            env={**env, OTLP_ENDPOINT_ENV: otlp},  # for any span Meshward's own code emits
            timeout=self.options.timeout,
            what="control plane",
        )
        sup.wait_ready(["xds"])
        xds_info = _json_file(xds_ready) or {}
        self._launch_sidecars(policy, ca, workloads, str(xds_info["ads"]), str(xds_info["join"]))
        sup.wait_ready()
        admin_url = str(xds_info["admin"])

        def status_problems() -> str:
            try:
                return "; ".join(status_poll.lagging(status_poll.fetch_status(admin_url), self.refs))
            except OSError as exc:
                return f"control plane status unreachable: {exc}"

        sup.wait_for(
            "every sidecar has its listeners, routes, clusters and certificates (ADS ACKed)",
            lambda: status_poll.converged(status_poll.fetch_status(admin_url), self.refs),
            timeout=self.options.timeout,
            explain=status_problems,
        )
        self._rotate_access_logs(workloads)
        extauthz_info = _json_file(extauthz_ready) or {}
        self.state = self._state(
            bindings, xds_info, extauthz_info, extauthz_port, decision_log, otlp, trace_file
        )
        demo_state.save(self.state, self.dir / demo_state.STATE_FILE)
        sup.say(f"[ready] mesh up in {time.monotonic() - started:.1f}s")
        return self.state

    def _agent_dir(self, name: str) -> Path:
        """Where ``name``'s agent keeps its SVID and sockets: under the state directory, or
        a short private /tmp directory when that path is too long for a Unix socket."""
        path = self.dir / "agents" / name
        if len(str((path / "admin.sock").resolve())) > 100:
            if self._short_root is None:
                self._short_root = Path(tempfile.mkdtemp(prefix="mwd-"))
            path = self._short_root / name
        return path

    def _launch_sidecars(
        self, policy: Any, ca: Any, workloads: list[Any], ads: str, join: str
    ) -> None:
        """One `meshward agent` per workload: it generates the key, joins with a one-time
        token, serves SVID and bundle to its Envoy over SDS and starts that Envoy."""
        from meshward.testing.mesh import agent_argv, agent_serving, write_join_token

        roots = self.dir / "run" / "root.pem"
        roots.write_bytes(ca.trust_bundle().roots_pem)
        runtime = (
            [f"--envoy-runtime={k}={v}" for k, v in PROMPT_TRACING.items()]
            if self.options.tune_tracing
            else []
        )
        for w in workloads:
            state = self._agent_dir(w.name)
            shutil.rmtree(state, ignore_errors=True)
            token = write_join_token(self.dir / "ca", w.ref, self.dir / "run" / f"{w.name}.token")
            argv = agent_argv(
                w.ref,
                ads,
                state,
                trust_domain=policy.mesh.trust_domain,
                root_namespace=policy.mesh.root_namespace,
                service_account=w.service_account or w.name,
                join=join,
                token_file=token,
                root_cert=roots,
                envoy_args=ENVOY_ARGS,
                drain_seconds=1.0,
                extra=[*runtime, "--bundle-poll", "5"],  # the demo's compressed clock
            )
            self.agents[w.ref] = state
            self.supervisor.launch(
                f"{w.name}-sidecar",
                argv,
                ready=agent_serving(state),
                timeout=self.options.timeout,
                what=f"meshward agent + Envoy for {w.ref}",
            )

    def _rotate_access_logs(self, workloads: list[Any]) -> None:
        """Envoy never rotates its file access logs: rotate each sidecar's by size (64 MiB
        with its backups) and have Envoy reopen it (meshward.envoy.logrotate)."""
        from meshward.envoy.logrotate import AccessLogRotator

        rotator = AccessLogRotator()
        for w in workloads:
            envoy = AgentEnvoy(self.agents[w.ref])
            if envoy.pid is not None:
                rotator.watch(envoy.workdir / ACCESS_LOG, envoy.pid)
        self._rotator = rotator.start()

    def _state(
        self,
        bindings: Any,
        xds: dict[str, Any],
        extauthz: dict[str, Any],
        extauthz_port: int,
        decision_log: Path,
        otlp: str,
        trace_file: Path | None,
    ) -> demo_state.DemoState:
        from meshward.policy import load

        policy = load([self.dir / "policies"])
        workloads = {}
        for w in sorted(policy.workloads, key=lambda w: w.ref):
            binding = bindings[w.ref]
            port = min(binding.ports)
            envoy = AgentEnvoy(self.agents[w.ref])
            listened, unlistened = demo_state.split_outbound(
                policy, w.ref, {k: str(v) for k, v in binding.outbound.items()}
            )
            workloads[w.ref] = demo_state.WorkloadState(
                ref=w.ref,
                spiffe_id=w.spiffe_id(policy.mesh.trust_domain),
                inbound=str(binding.ports[port].listen),
                app=str(binding.ports[port].app),
                outbound=listened,
                unlistened=unlistened,
                access_log=str(envoy.workdir / ACCESS_LOG),
                envoy_log=str(envoy.log_path),
                admin=str(envoy.admin_socket),
            )
        metrics = extauthz.get("metrics")
        return demo_state.DemoState(
            kind="local",
            workloads=workloads,
            policy_dir=str(self.dir / "policies"),
            xds_admin=str(xds["admin"]),
            ads=str(xds["ads"]),
            extauthz=f"127.0.0.1:{extauthz_port}",
            extauthz_metrics=f"http://{metrics}" if metrics else None,
            decision_log=str(decision_log),
            signing_key=str(self.options.examples / SIGNING_KEY),
            otlp=None if trace_file is not None else otlp,
            trace_file=str(trace_file) if trace_file is not None else None,
            state_dir=str(self.dir),
            pid=os.getpid(),
            running=True,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            logs={name: str(c.log_path) for name, c in self.supervisor.components.items()},
        )

    # -- stop ----------------------------------------------------------------------------------
    def mark_stopped(self) -> None:
        """Keep state.json for `meshward denials --state`, saying nothing runs any more."""
        if self.state is None:
            return
        from dataclasses import replace

        self.state = replace(self.state, running=False, pid=None)
        with contextlib.suppress(OSError):
            demo_state.save(self.state, self.dir / demo_state.STATE_FILE)

    def stop(self) -> None:
        try:
            if self._rotator is not None:
                self._rotator.stop()
                self._rotator = None
            self.supervisor.stop_all()
            for state in self.agents.values():
                AgentEnvoy(state).stop()  # only if its agent died without stopping it
        finally:
            if self._short_root is not None:
                shutil.rmtree(self._short_root, ignore_errors=True)
            if self._sink is not None:
                self._sink.stop()
                self._sink = None
            self.mark_stopped()

    def __enter__(self) -> DemoMesh:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["ComponentFailed", "DemoMesh", "MeshOptions", "find_examples"]
