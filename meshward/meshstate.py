"""Where a demo mesh is and where its logs are: ``state.json``.

Shared by the demo (which writes it) and by ``meshward status`` / ``meshward denials`` (which
find the running demo through it), so it lives outside meshward.demo: the control plane's
code never imports the demo.

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
    # "ns/peer:8080" -> HOST:PORT, only for peers its sidecar has an outbound listener for
    # (some policy may let it call them) when the state was written.
    outbound: Mapping[str, str] = field(default_factory=dict)
    # Ports reserved for the other peers: nothing listens there (connection refused) unless a
    # later policy edit lets this workload call that peer.
    unlistened: Mapping[str, str] = field(default_factory=dict)
    access_log: str | None = None  # the sidecar's JSON access log
    envoy_log: str | None = None
    admin: str | None = None  # the sidecar's Envoy admin Unix socket (mode 0600)

    @property
    def name(self) -> str:
        return self.ref.split("/", 1)[1]


def split_outbound(
    policy: Any, ref: str, addresses: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(listened, unlistened) of a caller's "ns/peer:port" -> address map: listened are the
    peers the compiler gives ``ref`` an outbound listener for, as of now."""
    from datetime import UTC, datetime

    from meshward.compile.peers import peers_of

    workload = policy.workload(ref)
    peers = (
        set()
        if workload is None
        else {p.ref for p in peers_of(policy, workload, datetime.now(UTC))}
    )
    listened: dict[str, str] = {}
    unlistened: dict[str, str] = {}
    for key, address in sorted(addresses.items()):
        (listened if key.rsplit(":", 1)[0] in peers else unlistened)[key] = address
    return listened, unlistened


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
            raise UserError(
                f"{source} has no outbound listener for {key}: no policy lets it call {target}"
            ) from None

    def reserved(self, source: str, target: str, port: int = 8080) -> str:
        """The address of ``source``'s outbound listener for ``target``, or of the port kept
        for it when there is none (to show that such a call is refused)."""
        key = f"{target}:{port}"
        workload = self.workload(source)
        found = workload.outbound.get(key) or workload.unlistened.get(key)
        if found is None:
            raise UserError(f"{source} has no outbound port for {key}")
        return found

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
        """Checked field by field: a hand-edited or foreign file is named with the field that
        is wrong, never a Python TypeError from deep inside `meshward denials`."""
        problem = _check(data, _STATE_FIELDS, "")
        raw_workloads: dict[str, Any] = data.get("workloads") or {}
        if problem is None:
            for ref, w in raw_workloads.items():
                problem = _check(w, _WORKLOAD_FIELDS, f"workloads[{ref!r}].")
                if problem:
                    break
        if problem is None and data.get("kind") not in ("local", "compose"):
            problem = f"kind: expected 'local' or 'compose', got {data.get('kind')!r}"
        if problem is None and data.get("format", FORMAT) != FORMAT:
            problem = f"format {data.get('format')!r}: this Meshward reads format {FORMAT}"
        if problem is not None:
            raise UserError(f"{source} is not a valid Meshward demo state file: {problem}")
        workloads = {
            ref: WorkloadState(
                **{
                    **w,
                    "outbound": dict(w.get("outbound") or {}),
                    "unlistened": dict(w.get("unlistened") or {}),
                }
            )
            for ref, w in raw_workloads.items()
        }
        fields = {k: v for k, v in data.items() if k != "workloads"}
        return cls(**{**fields, "workloads": workloads})

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
                    "unlistened": dict(w.unlistened),
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


# Each field of state.json: (allowed JSON types, required). "map" = object of strings.
_STR, _OPT_STR = ((str,), True), ((str, type(None)), False)
_STRING_MAPS = frozenset({"outbound", "unlistened", "logs"})
_WORKLOAD_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "ref": _STR,
    "spiffe_id": _STR,
    "inbound": _STR,
    "app": _STR,
    "outbound": ((dict, type(None)), False),
    "unlistened": ((dict, type(None)), False),
    "access_log": _OPT_STR,
    "envoy_log": _OPT_STR,
    "admin": _OPT_STR,
}
_STATE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "kind": _STR,
    "policy_dir": _STR,
    "xds_admin": ((str, type(None)), True),
    "extauthz": ((str, type(None)), True),
    "decision_log": ((str, type(None)), True),
    "workloads": ((dict,), True),
    "signing_key": _OPT_STR,
    "extauthz_metrics": _OPT_STR,
    "otlp": _OPT_STR,
    "trace_file": _OPT_STR,
    "state_dir": _OPT_STR,
    "ads": _OPT_STR,
    "pid": ((int, type(None)), False),
    "running": ((bool,), False),
    "started_at": _OPT_STR,
    "logs": ((dict,), False),
    "format": ((int,), False),
}


def _check(
    value: Any, fields: Mapping[str, tuple[tuple[type, ...], bool]], where: str
) -> str | None:
    """What is wrong with one JSON object against ``fields`` (None when nothing is)."""
    if not isinstance(value, dict):
        return f"{where.rstrip('.') or 'the file'}: expected an object"
    for key in value:
        if key not in fields:
            return f"{where}{key}: unknown field"
    for key, (types, required) in fields.items():
        if key not in value:
            if required:
                return f"{where}{key}: missing"
            continue
        item = value[key]
        # bool is an int in Python; JSON true is not a pid
        if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
            return f"{where}{key}: expected {_names(types)}, got {_json_type(item)}"
        if (
            isinstance(item, dict)
            and key in _STRING_MAPS
            and not all(isinstance(k, str) and isinstance(v, str) for k, v in item.items())
        ):
            return f"{where}{key}: expected an object of strings"
    return None


def _names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", bool: "true or false", dict: "an object"}
    return " or ".join(names.get(t, "null") for t in types)


def _json_type(value: Any) -> str:
    return (
        _names((type(value),))
        if type(value) in (str, int, bool, dict)
        else (
            "null"
            if value is None
            else "a list"
            if isinstance(value, list)
            else type(value).__name__
        )
    )


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
