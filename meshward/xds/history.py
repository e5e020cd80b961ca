"""The last N applied policy sets, content-addressed, and the audit log of every change.

Why on the control plane: it is the one place that knows what was *applied* (a policy file that
failed validation never was), in which order. Each applied set is stored once as its canonical
YAML under its version (SHA-256 of that canonical form, so a file can be checked against its
name), and an index lists the applications in order with what each did: the workloads whose
policy changed, and the flows it opened and closed (``meshward policy diff`` probing only those
workloads, under an evaluation budget so a mesh-wide edit of a big mesh cannot stall the
recorder). `meshward policy rollback` reads a stored set back and writes it into the policy
directory; the watcher applies it like any edit, and it is recorded as a rollback because its
version was applied before.

Layout of the directory (``--history-dir``, default ``history`` in the state directory)::

    index.json           entries, oldest first (written atomically: temp file + rename)
    sets/<version>.yaml  the canonical policy set of each version still listed
    audit.log            one JSON line per change (apply, rollback, rejected), rotated by size
                         (audit.log.1 .. audit.log.<backups>)

Bounded: ``keep`` entries (older ones and the sets no entry names are deleted), at most
:data:`MAX_FLOWS` flows listed per entry, the audit log by bytes and backups.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from meshward.certs.files import write_atomic
from meshward.policy import PolicyError, PolicySet, parse
from meshward.policy.diff import diff

log = logging.getLogger("meshward.xds.history")

DEFAULT_KEEP = 20
MAX_KEEP = 1000
MAX_FLOWS = 200  # flows opened/closed listed per entry
MAX_EVALUATIONS = 20_000  # diff budget per entry: ~1.5 s of one core at 1,000 workloads
MAX_WORKLOADS_LISTED = 500
AUDIT_MAX_BYTES = 1_000_000
AUDIT_BACKUPS = 3
VERSION = re.compile(r"^[0-9a-f]{64}$")
VERSION_PREFIX = re.compile(r"^[0-9a-f]{8,64}$")


class UnknownVersion(LookupError):
    """No kept entry has this version (or prefix), or the prefix is ambiguous."""


@dataclass
class Entry:
    version: str
    applied_at: str
    action: str  # start | apply | rollback
    previous: str | None
    workloads: list[str] = field(default_factory=list)  # whose policy changed
    workloads_total: int = 0
    opened: list[dict[str, Any]] = field(default_factory=list)
    closed: list[dict[str, Any]] = field(default_factory=list)
    flows_truncated: bool = False
    restores: str | None = None  # rollback: when this version was applied before

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def touched_workloads(old: PolicySet | None, new: PolicySet) -> list[str]:
    """Workloads whose selecting policies (authorization, peer or request authentication) or
    declaration differ between the two sets; every workload when there is no old set."""
    if old is None:
        return sorted(w.ref for w in new.workloads)
    if old.mesh != new.mesh:  # trust domain, enforcement...: every workload
        return sorted({w.ref for w in (*old.workloads, *new.workloads)})
    out: list[str] = []
    refs = {w.ref for w in (*old.workloads, *new.workloads)}
    for ref in sorted(refs):
        a, b = old.workload(ref), new.workload(ref)
        if a is None or b is None or a != b:
            out.append(ref)
            continue
        if (
            old.policies_for(a) != new.policies_for(b)
            or old.peer_authentications_for(a) != new.peer_authentications_for(b)
            or old.request_authentications_for(a) != new.request_authentications_for(b)
        ):
            out.append(ref)
    return out


def _flow(change: Any) -> dict[str, Any]:
    return {
        "source": change.source,
        "destination": change.destination,
        "port": change.probe.port,
        "method": change.probe.method,
        "path": change.probe.path,
    }


def describe_change(
    old: PolicySet | None, new: PolicySet, *, now: datetime
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(workloads touched, flows opened, flows closed, truncated)."""
    touched = touched_workloads(old, new)
    if old is None:
        return touched, [], [], False
    result = diff(
        old,
        new,
        now=now,
        destinations=touched,
        max_changes=MAX_FLOWS,
        max_evaluations=MAX_EVALUATIONS,
    )
    opened = [_flow(c) for c in result.changes if c.after.allowed]
    closed = [_flow(c) for c in result.changes if not c.after.allowed]
    return touched, opened, closed, result.truncated


class PolicyHistory:
    """Thread-safe: ``record`` runs off the event loop (one at a time, in order), reads come
    from the admin endpoint's threads."""

    def __init__(
        self,
        directory: Path,
        *,
        keep: int = DEFAULT_KEEP,
        audit_max_bytes: int = AUDIT_MAX_BYTES,
        audit_backups: int = AUDIT_BACKUPS,
    ) -> None:
        if not 1 <= keep <= MAX_KEEP:
            raise ValueError(f"history keep must be 1..{MAX_KEEP}")
        self.directory = directory
        self.keep = keep
        self.sets = directory / "sets"
        self.sets.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self.entries: list[Entry] = self._read_index()
        self._last: PolicySet | None = None
        # A Logger of its own (not in logging's registry): the audit trail never mixes with,
        # or is silenced by, the process's log configuration.
        self.audit = logging.Logger("meshward.xds.history.audit")
        handler = logging.handlers.RotatingFileHandler(
            directory / "audit.log", maxBytes=audit_max_bytes, backupCount=audit_backups
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.audit.addHandler(handler)

    # -- writing -------------------------------------------------------------------------------
    def record(self, policy: PolicySet, *, now: datetime) -> Entry | None:
        """``policy`` was applied at ``now``; None when it is the version already newest."""
        with self._lock:
            newest = self.entries[-1] if self.entries else None
        if newest is not None and newest.version == policy.version:
            self._last = policy
            return None
        previous = self._last if self._last is not None else self._load_newest(newest)
        touched, opened, closed, truncated = describe_change(previous, policy, now=now)
        earlier = next((e for e in reversed(self.entries) if e.version == policy.version), None)
        entry = Entry(
            version=policy.version,
            applied_at=now.isoformat(),
            action="start" if newest is None else "rollback" if earlier is not None else "apply",
            previous=newest.version if newest is not None else None,
            workloads=touched[:MAX_WORKLOADS_LISTED],
            workloads_total=len(touched),
            opened=opened,
            closed=closed,
            flows_truncated=truncated,
            restores=earlier.applied_at if earlier is not None else None,
        )
        self._write_set(policy)
        with self._lock:
            self.entries.append(entry)
            dropped = self.entries[: -self.keep]
            self.entries = self.entries[-self.keep :]
            self._write_index()
            kept = {e.version for e in self.entries}
        for gone in {e.version for e in dropped} - kept:
            (self.sets / f"{gone}.yaml").unlink(missing_ok=True)
        self._last = policy
        self._audit(
            entry.action,
            now,
            version=entry.version,
            previous=entry.previous,
            workloads=entry.workloads_total,
            opened=len(opened),
            closed=len(closed),
        )
        return entry

    def rejected(self, error: str, *, now: datetime, current: str) -> None:
        self._audit("rejected", now, version=current, error=error[:2000])

    def _audit(self, action: str, now: datetime, **fields: Any) -> None:
        self.audit.info(json.dumps({"time": now.isoformat(), "action": action, **fields}))

    def _write_set(self, policy: PolicySet) -> None:
        target = self.sets / f"{policy.version}.yaml"
        if not target.exists():
            _atomic_write(target, policy.dump())

    def _write_index(self) -> None:
        data = {"keep": self.keep, "entries": [asdict(e) for e in self.entries]}
        _atomic_write(self.directory / "index.json", json.dumps(data, indent=1) + "\n")

    def _read_index(self) -> list[Entry]:
        path = self.directory / "index.json"
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text())
            entries = [Entry.from_json(e) for e in data["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = path.with_suffix(".json.unreadable")
            path.replace(aside)
            log.warning("policy history index unreadable (%s): moved to %s, starting over",
                        exc, aside)  # fmt: skip
            return []
        return [e for e in entries if VERSION.match(e.version)][-self.keep :]

    def _load_newest(self, newest: Entry | None) -> PolicySet | None:
        if newest is None:
            return None
        text = self.set_text(newest.version)
        if text is None:
            return None
        try:
            return parse({f"{newest.version}.yaml": text})
        except PolicyError:
            return None

    def close(self) -> None:
        for handler in list(self.audit.handlers):
            handler.close()
            self.audit.removeHandler(handler)

    # -- reading -------------------------------------------------------------------------------
    def resolve(self, version: str) -> str:
        """A full version from a full one or a unique prefix of at least 8 hex digits."""
        if not VERSION_PREFIX.match(version):
            raise UnknownVersion(f"{version[:80]!r} is not a policy version (8 to 64 hex digits)")
        with self._lock:
            found = sorted({e.version for e in self.entries if e.version.startswith(version)})
        if not found:
            raise UnknownVersion(
                f"version {version} is not in the history (the last {self.keep} applied sets "
                "are kept: `meshward policy history`)"
            )
        if len(found) > 1:
            raise UnknownVersion(f"version prefix {version} is ambiguous: give more digits")
        return found[0]

    def set_text(self, version: str) -> str | None:
        if not VERSION.match(version):
            return None
        try:
            return (self.sets / f"{version}.yaml").read_text()
        except OSError:
            return None

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(e) for e in reversed(self.entries)]


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode(), mode=0o644, overwrite=True)
