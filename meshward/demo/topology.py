"""The local mesh as processes on 127.0.0.1: what ``meshward demo`` starts.

- a fresh CA in ``<state>/ca`` and the example policies copied to ``<state>/policies`` (the live
  edit changes the copy, never the repository);
- ``meshward xds serve`` (control plane) and ``meshward extauthz serve`` as processes (ext_authz
  over mTLS with an SVID for ``meshward-extauthz`` from the demo's CA, in ``run/extauthz-tls``);
- each shop workload's app (``python -m meshward.testing.echo``) and its sidecar: a ``meshward agent``
  that generates the key, joins with a one-time token, serves SVID and bundle to its Envoy over
  SDS on a Unix socket and starts that Envoy (ADS over mTLS with the same SVID; everything else
  over ADS);
- a trace collector of its own when no ``--otlp-endpoint`` is given (Envoy stamps trace ids only
  when it has a tracer, and the tour and ``meshward denials`` key on trace ids).

The processes are built and launched by the one mesh builder of the project,
:class:`meshward.testing.mesh.Mesh` (``control_plane="process"``, ``apps="process"``); this module
keeps what is the demo's own. Ports come from the kernel at run time. Independent processes start
in parallel: apps, ext_authz and the control plane at once, then every sidecar once the control
plane listens. ``start()`` returns the :class:`~meshward.demo.state.DemoState` it also writes to ``state.json``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from meshward.demo import state as demo_state
from meshward.errors import UserError
from meshward.telemetry.tracing import OTLP_ENDPOINT_ENV
from meshward.testing.mesh import AgentEnvoy, Mesh, slug
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
    """Context manager: ``with DemoMesh(options, out=...) as mesh: mesh.state ...``.

    The processes are the one mesh builder's (:class:`meshward.testing.mesh.Mesh` with the
    control plane, ext_authz and apps as processes); what is the demo's own is here: the state
    directory, the example policies, its trace collector, ext_authz's flags and the state file."""

    def __init__(
        self, options: MeshOptions, *, out: TextIO | None = None, quiet: bool = False
    ) -> None:
        self.options = options
        self.dir = options.state_dir
        claim(self.dir)
        self.supervisor = Launcher(self.dir, out=out, quiet=quiet)
        self.mesh: Mesh | None = None
        self.state: demo_state.DemoState | None = None
        self.refs: list[str] = []
        self._sink: Any = None
        self._rotator: Any = None  # keeps the sidecars' access logs under their cap
        self.otlp_endpoint = ""  # where spans go: --otlp-endpoint or the demo's own collector
        self.agents: dict[str, Path] = {}  # ref -> its agent's state directory
        self._short_root: Path | None = None

    # -- preparation (no processes) -----------------------------------------------------------
    def _prepare(self) -> Any:
        """Fresh copy of the policies, clean logs; return the policy set (the mesh makes a
        fresh CA)."""
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
            return load([policies])
        except PolicyError as exc:
            raise UserError(f"the example policies do not load:\n{exc}") from None

    def _agent_root(self) -> Path:
        """Where the agents keep their SVIDs and sockets: under the state directory, or a
        short private /tmp directory when that path is too long for a Unix socket."""
        path = self.dir / "agents"
        longest = max((slug(ref) for ref in self.refs), key=len, default="")
        if len(str((path / longest / "admin.sock").resolve())) > 100:
            self._short_root = Path(tempfile.mkdtemp(prefix="mwd-"))
            path = self._short_root
        return path

    def _extauthz_args(self, mesh: Mesh, policy: Any, otlp: str, decision_log: Path) -> list[str]:
        """ext_authz over mTLS with an SVID for ``meshward-extauthz`` from the mesh's CA."""
        from meshward.testing.extauthz import issue_service_tls

        tls = issue_service_tls(mesh.ca, policy.mesh, self.dir / "run" / "extauthz-tls")
        return [
            "--tls-dir", str(tls.directory),
            "--metrics-listen", "127.0.0.1:0",
            "--decision-log", str(decision_log),
            "--otlp-endpoint", otlp,
            "--poll-interval", "0.2",
            *(["--log-allows"] if self.options.log_allows else []),
        ]  # fmt: skip

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> demo_state.DemoState:
        started = time.monotonic()
        policy = self._prepare()
        self.refs = sorted(w.ref for w in policy.workloads)

        otlp = self.options.otlp_endpoint
        trace_file: Path | None = None
        if otlp is None:
            from meshward.demo.traces import SpanFile

            trace_file = self.dir / "traces.jsonl"
            self._sink = SpanFile(trace_file).start()
            otlp = self._sink.endpoint
        self.otlp_endpoint = otlp
        decision_log = self.dir / "logs" / "decisions.jsonl"
        runtime = (
            [f"--envoy-runtime={k}={v}" for k, v in PROMPT_TRACING.items()]
            if self.options.tune_tracing
            else []
        )
        self.mesh = Mesh(
            self.dir / "policies",
            self.dir,
            self.refs,
            control_plane="process",
            apps="process",
            delta=self.refs,  # the product's default ADS variant (`meshward agent`)
            launcher=self.supervisor,
            state_root=self._agent_root(),
            watch_interval=0.2,
            flows_db=self.dir / "flows.db",
            xds_args=("--otlp", otlp, "--access-log", ACCESS_LOG),
            xds_env={OTLP_ENDPOINT_ENV: otlp},  # for any span Meshward's own code emits
            extauthz=lambda mesh: self._extauthz_args(mesh, policy, otlp, decision_log),
            envoy_args=ENVOY_ARGS,
            drain_seconds=1.0,
            agent_args=(*runtime, "--bundle-poll", "5"),  # the demo's compressed clock
            timeout=self.options.timeout,
        )
        self.mesh.start()
        self.agents = {ref: self.mesh.state_dir(ref) for ref in self.refs}
        self._rotate_access_logs()
        self.state = self._state(self.mesh, decision_log, otlp, trace_file)
        demo_state.save(self.state, self.dir / demo_state.STATE_FILE)
        self.supervisor.say(f"[ready] mesh up in {time.monotonic() - started:.1f}s")
        return self.state

    def _rotate_access_logs(self) -> None:
        """Envoy never rotates its file access logs: rotate each sidecar's by size (64 MiB
        with its backups) and have Envoy reopen it (meshward.envoy.logrotate)."""
        from meshward.envoy.logrotate import AccessLogRotator

        rotator = AccessLogRotator()
        for state in self.agents.values():
            envoy = AgentEnvoy(state)
            if envoy.pid is not None:
                rotator.watch(envoy.workdir / ACCESS_LOG, envoy.pid)
        self._rotator = rotator.start()

    def _state(
        self, mesh: Mesh, decision_log: Path, otlp: str, trace_file: Path | None
    ) -> demo_state.DemoState:
        from meshward.policy import load

        policy = load([self.dir / "policies"])
        workloads = {}
        for w in sorted(policy.workloads, key=lambda w: w.ref):
            binding = mesh.bindings[w.ref]
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
        metrics = mesh.servers.extauthz_metrics
        return demo_state.DemoState(
            kind="local",
            workloads=workloads,
            policy_dir=str(self.dir / "policies"),
            xds_admin=mesh.admin_url,
            ads=mesh.ads_address,
            extauthz=mesh.servers.extauthz_address,
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
            if self.mesh is not None:
                self.mesh.stop()  # every process, and an Envoy whose agent died
            self.supervisor.stop_all()
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
