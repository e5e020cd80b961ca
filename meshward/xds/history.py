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

Off the critical path of a rollout: an applied set gets its entry at once (in memory, marked
``diff: pending``, its set served from memory), and what the change did is worked out later, in
a thread, once the rollout's pushes are out (meshward.xds.history_service), then written to disk
(``diff: done``). Readers that need it wait for it, bounded (``GET /history?wait=S``, which
`meshward policy history` uses). An entry whose diff was never worked out says so: ``skipped``
(a flood of changes; the set is still kept), ``interrupted`` (the control plane stopped first),
``failed``.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from meshward.certs.files import write_atomic
from meshward.policy import PolicyError, PolicySet, parse
from meshward.policy.diff import diff
from meshward.policy.policyset import selects

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
    diff: str = "done"  # pending | done | skipped | interrupted | failed (see the module doc)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def touched_workloads(old: PolicySet | None, new: PolicySet) -> list[str]:
    """Workloads whose selecting policies (authorization, peer or request authentication) or
    declaration differ between the two sets; every workload when there is no old set.

    Found from the documents that differ (objects the loader reused for unchanged files are
    the same objects, so telling them apart is an identity check): the workloads each changed
    document selects, in either version. O(documents + workloads x changed documents)."""
    if old is None:
        return sorted(w.ref for w in new.workloads)
    if old.mesh != new.mesh:  # trust domain, enforcement...: every workload
        return sorted({w.ref for w in (*old.workloads, *new.workloads)})
    out = {key for key, _ in _differing(old.workloads, new.workloads, lambda w: w.ref)}
    changed = [
        item
        for kind in ("authorization_policies", "peer_authentications", "request_authentications")
        for pair in _differing(getattr(old, kind), getattr(new, kind), _name)
        for item in pair[1]
    ]
    if changed:
        root = new.mesh.root_namespace
        for workload in (*old.workloads, *new.workloads):
            if workload.ref not in out and any(
                item.namespace in (workload.namespace, root)
                and selects(item.selector, workload.labels)
                for item in changed
            ):
                out.add(workload.ref)
    return sorted(out)


def _name(item: Any) -> tuple[str, str]:
    return (item.namespace, item.name)


def _differing(
    old: Iterable[Any], new: Iterable[Any], key: Callable[[Any], Any]
) -> Iterator[tuple[Any, list[Any]]]:
    """(key, the versions that exist) of each object that differs between the two."""
    before = {key(i): i for i in old}
    after = {key(i): i for i in new}
    for k in before.keys() | after.keys():
        a, b = before.get(k), after.get(k)
        if a is not b and (a is None or b is None or a != b):
            yield k, [i for i in (a, b) if i is not None]


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
    """Thread-safe: ``begin`` runs on the event loop (cheap: memory only), ``complete`` off it
    (one at a time, in order), reads come from the admin endpoint's threads."""

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
        self._settled = threading.Condition(self._lock)  # notified when an entry completes
        self.entries: list[Entry] = self._read_index()
        self._last: PolicySet | None = None  # the set of the newest entry begun
        # version -> set, for listed entries whose set is not on disk yet (bounded by keep)
        self._unwritten: dict[str, PolicySet] = {}
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
        """``policy`` was applied at ``now``: its entry, complete; None when it is the version
        already newest."""
        begun = self.begin(policy, now=now)
        if begun is None:
            return None
        self.complete(*begun, now=now)
        return begun[0]

    def begin(
        self, policy: PolicySet, *, now: datetime
    ) -> tuple[Entry, PolicySet, PolicySet | None] | None:
        """The entry of ``policy``, listed at once with its diff pending (memory only: on the
        event loop); then :meth:`complete` (off it) with what this returns. None when
        ``policy`` is the version already newest."""
        with self._lock:
            newest = self.entries[-1] if self.entries else None
            previous = self._last
            self._last = policy
            if newest is not None and newest.version == policy.version:
                return None
            earlier = next((e for e in reversed(self.entries) if e.version == policy.version), None)
            entry = Entry(
                version=policy.version,
                applied_at=now.isoformat(),
                action="start" if newest is None else "rollback" if earlier else "apply",
                previous=newest.version if newest is not None else None,
                restores=earlier.applied_at if earlier is not None else None,
                diff="pending",
            )
            self.entries.append(entry)
            self.entries = self.entries[-self.keep :]
            self._unwritten[policy.version] = policy  # written (unless it is on disk) by settle
            self._trim_unwritten()
        return entry, policy, previous

    def complete(
        self, entry: Entry, policy: PolicySet, previous: PolicySet | None, *, now: datetime
    ) -> None:
        """Work out what the change did (``previous``: the set before it; None: read back from
        disk), write the set and the index, drop what is no longer kept, audit."""
        if previous is None and entry.previous is not None:
            previous = self._load_version(entry.previous)
        try:
            touched, opened, closed, truncated = describe_change(previous, policy, now=now)
        except Exception:
            self.settle(entry, "failed")
            raise
        with self._lock:
            entry.workloads = touched[:MAX_WORKLOADS_LISTED]
            entry.workloads_total = len(touched)
            entry.opened, entry.closed, entry.flows_truncated = opened, closed, truncated
        self.settle(entry, "done")
        self._audit(
            entry.action,
            now,
            version=entry.version,
            previous=entry.previous,
            workloads=entry.workloads_total,
            opened=len(opened),
            closed=len(closed),
        )

    def settle(self, entry: Entry, diff: str) -> None:
        """``entry``'s diff is ``diff`` now (done, or skipped/failed: never worked out): write
        the sets still only in memory and the index, delete the sets no entry names."""
        with self._lock:
            entry.diff = diff
            unwritten = [p for v, p in self._unwritten.items() if any(
                e.version == v for e in self.entries)]  # fmt: skip
        for policy in unwritten:
            self._write_set(policy)
        with self._lock:
            for policy in unwritten:
                self._unwritten.pop(policy.version, None)
            self._write_index()
            kept = {e.version for e in self.entries} | set(self._unwritten)
            self._settled.notify_all()
        for path in self.sets.glob("*.yaml"):
            if path.stem not in kept:
                path.unlink(missing_ok=True)

    def skip(self, entry: Entry, *, now: datetime) -> None:
        """``entry``'s diff will not be worked out (a flood of changes); its set is still kept
        (written by the next settle). Audited."""
        with self._lock:
            entry.diff = "skipped"
            self._settled.notify_all()
        self._audit("skipped", now, version=entry.version, previous=entry.previous)

    def _trim_unwritten(self) -> None:
        listed = {e.version for e in self.entries}
        for version in [v for v in self._unwritten if v not in listed]:
            del self._unwritten[version]

    def wait_settled(self, timeout: float, current: str | None = None) -> bool:
        """Wait (bounded by ``timeout`` seconds) until no listed entry's diff is pending and,
        given ``current``, the newest entry is that version; True when so."""

        def settled() -> bool:
            if any(e.diff == "pending" for e in self.entries):
                return False
            return current is None or (bool(self.entries) and self.entries[-1].version == current)

        with self._lock:
            return self._settled.wait_for(settled, timeout)

    def poke(self) -> None:
        """Wake :meth:`wait_settled` callers to look again (the set in force changed)."""
        with self._lock:
            self._settled.notify_all()

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
        for e in entries:
            if e.diff == "pending":  # the previous run stopped before working it out
                e.diff = "interrupted"
        return [e for e in entries if VERSION.match(e.version)][-self.keep :]

    def _load_version(self, version: str) -> PolicySet | None:
        text = self.set_text(version)
        if text is None:
            return None
        try:
            return parse({f"{version}.yaml": text})
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
        with self._lock:
            unwritten = self._unwritten.get(version)
        if unwritten is not None:
            return unwritten.dump()
        try:
            return (self.sets / f"{version}.yaml").read_text()
        except OSError:
            return None

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(e) for e in reversed(self.entries)]


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode(), mode=0o644, overwrite=True)
