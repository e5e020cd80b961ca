"""Where a demo mesh is and where its logs are: ``state.json``.

The local demo writes it into its state directory while it runs; the docker-compose setup ships
one describing the compose network (``sidecar-config/tour.json``). The tour and ``meshward
denials`` read nothing else, so both work on either topology and on a finished ``--state`` run.
The last local demo is recorded in a pointer file so ``meshward denials`` finds it without flags.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshward.errors import UserError

STATE_FILE = "state.json"
FORMAT = 1
LAST_ENV = "MESHWARD_DEMO_LAST"  # overrides where the "last demo" pointer lives


@dataclass(frozen=True)
class WorkloadState:
    ref: str  # "ns/name"
    spiffe_id: str
    inbound: str  # HOST:PORT of the sidecar's inbound listener (declared port 8080)
    app: str  # HOST:PORT of the application behind it
    outbound: Mapping[str, str] = field(default_factory=dict)  # "ns/peer:8080" -> HOST:PORT
    access_log: str | None = None  # the sidecar's JSON access log
    envoy_log: str | None = None
    admin: str | None = None  # the sidecar's Envoy admin Unix socket (mode 0600)

    @property
    def name(self) -> str:
        return self.ref.split("/", 1)[1]


@dataclass(frozen=True)
class DemoState:
    kind: str  # "local" or "compose"
    policy_dir: str
    xds_admin: str | None  # control plane admin URL (/status, /metrics)
    extauthz: str | None  # ext_authz gRPC HOST:PORT
    decision_log: str | None  # ext_authz decision log (JSON lines)
    workloads: Mapping[str, WorkloadState]
    signing_key: str | None = None  # demo-only JWT key (examples/demo-keys)
    extauthz_metrics: str | None = None
    otlp: str | None = None  # where spans go
    trace_file: str | None = None  # spans kept by the demo's own collector (JSON lines)
    state_dir: str | None = None
    ads: str | None = None
    pid: int | None = None  # the `meshward demo` process while it runs
    running: bool = False
    started_at: str | None = None
    logs: Mapping[str, str] = field(default_factory=dict)  # component -> log file
    format: int = FORMAT

    def workload(self, ref: str) -> WorkloadState:
        try:
            return self.workloads[ref]
        except KeyError:
            known = ", ".join(sorted(self.workloads))
            raise UserError(f"no workload {ref} in this demo (known: {known})") from None

    def outbound(self, source: str, target: str, port: int = 8080) -> str:
        key = f"{target}:{port}"
        try:
            return self.workload(source).outbound[key]
        except KeyError:
            raise UserError(f"{source} has no outbound listener for {key}") from None

    def alive(self) -> bool:
        """The demo process that wrote this is still running (local demos only)."""
        if not self.running or self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["workloads"] = {ref: asdict(w) for ref, w in sorted(self.workloads.items())}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "state") -> DemoState:
        try:
            workloads = {
                ref: WorkloadState(**{**w, "outbound": dict(w.get("outbound") or {})})
                for ref, w in (data.get("workloads") or {}).items()
            }
            fields = {k: v for k, v in data.items() if k != "workloads"}
            return cls(**{**fields, "workloads": workloads})
        except TypeError as exc:
            raise UserError(f"{source} is not a Meshward demo state file ({exc})") from None

    def resolve(self, base: Path) -> DemoState:
        """Relative paths in the file are relative to the file's directory."""

        def fix(value: str | None) -> str | None:
            if value is None or value == "" or os.path.isabs(value):
                return value
            return str(base / value)

        workloads = {
            ref: WorkloadState(
                **{
                    **asdict(w),
                    "outbound": dict(w.outbound),
                    "access_log": fix(w.access_log),
                    "envoy_log": fix(w.envoy_log),
                }
            )
            for ref, w in self.workloads.items()
        }
        data = asdict(self)
        data.update(
            workloads=workloads,
            policy_dir=fix(self.policy_dir),
            decision_log=fix(self.decision_log),
            signing_key=fix(self.signing_key),
            trace_file=fix(self.trace_file),
            logs={k: fix(v) for k, v in self.logs.items()},
        )
        return DemoState(**data)


def save(state: DemoState, path: Path) -> None:
    """Atomic write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load(path: Path) -> DemoState:
    """A state file, or a directory holding ``state.json``."""
    file = path / STATE_FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(
            f"no demo state at {file}; start one with `meshward demo --keep-running` or "
            "`meshward demo --state DIR`"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read demo state {file}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a Meshward demo state file")
    return DemoState.from_json(data, source=str(file)).resolve(file.parent.resolve())


# -- the "last demo" pointer ---------------------------------------------------------------------
def last_pointer() -> Path:
    """``$MESHWARD_DEMO_LAST``, else ``$XDG_RUNTIME_DIR/meshward-demo-last``, else
    ``<tmp>/meshward-demo-last-<uid>``: a file holding the last local demo's state directory."""
    explicit = os.environ.get(LAST_ENV)
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "meshward-demo-last"
    return Path(tempfile.gettempdir()) / f"meshward-demo-last-{os.getuid()}"


def record_last(state_dir: Path) -> None:
    pointer = last_pointer()
    try:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = pointer.with_name(f".{pointer.name}.tmp")
        tmp.write_text(str(state_dir.resolve()) + "\n")
        tmp.replace(pointer)
    except OSError:
        pass  # discovery is a convenience; --state always works


def forget_last(state_dir: Path) -> None:
    """Remove the pointer if it still names ``state_dir`` (a removed temp dir)."""
    pointer = last_pointer()
    try:
        if pointer.read_text().strip() == str(state_dir.resolve()):
            pointer.unlink()
    except OSError:
        pass


def find_state(explicit: str | None) -> Path:
    """``--state`` if given, else the last recorded local demo."""
    if explicit:
        return Path(explicit)
    pointer = last_pointer()
    try:
        recorded = pointer.read_text().strip()
    except OSError:
        recorded = ""
    if not recorded or not Path(recorded).exists():
        raise UserError(
            "no running demo found; start one with `meshward demo --keep-running` (or pass "
            "--state DIR of a `meshward demo --state DIR` run)"
        )
    return Path(recorded)
