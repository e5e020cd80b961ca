"""Watching a policy directory: apply a change only once it is complete and valid.

Polling (not inotify) keeps this portable and dependency-free; a poll is a ``stat`` per file.
A change is loaded only after the file set has stayed the same for one whole poll interval, so an
editor's partial write or a half-copied directory is never applied; editor temp and swap files are
never read. An invalid policy set is reported and the last good one stays in force.

Loading is incremental per file: the watcher keeps a ParseCache (meshward.policy.loader), so a
one-file edit re-parses that file's YAML and rebuilds the set from the other files' parsed
documents; the set, version included, is the one a full load gives. The control plane and
ext_authz both run it, so it sits between them and meshward.compile in the layering (and
meshward.policy stays pure: no threads).

Limit of any polling watcher: a writer that stalls in the middle of a file for longer than one
poll interval can have a valid prefix of it applied (say, a truncated file that drops a DENY
policy). Write policy files atomically — a temp file, then ``rename`` — as ``git checkout``,
sync tools and most editors do; then every state the watcher can see is a complete file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meshward.policy import PolicyError, PolicySet, Problem, load
from meshward.policy.files import policy_files
from meshward.policy.loader import ParseCache

# The logger keeps the name it had under meshward.xds, so log filters keep matching.
log = logging.getLogger("meshward.xds.watch")

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    entries = []
    for file in policy_files(paths):
        try:
            info = file.stat()
        except FileNotFoundError:  # removed between listing and stat: the next poll settles it
            continue
        entries.append((str(file), info.st_size, info.st_mtime_ns))
    return tuple(entries)


class PolicyWatcher:
    """Keeps ``current`` equal to the last valid policy set found at ``paths``.

    ``on_change`` runs (on the watcher's thread) with each new valid set whose version differs
    from the current one; ``on_error`` with each rejected change. Both must not raise; if they do
    the error is logged and watching goes on. ``check`` runs on every loaded set and may raise
    PolicyError to refuse it exactly like invalid YAML (the compiler's Envoy-limit check:
    a set Envoy would refuse never becomes ``current``).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        on_change: Callable[[PolicySet], None] | None = None,
        on_error: Callable[[PolicyError], None] | None = None,
        interval: float = 0.5,
        check: Callable[[PolicySet], None] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.check = check
        self.on_change = on_change
        self.on_error = on_error
        self.interval = interval
        self.current: PolicySet | None = None
        self.last_error: PolicyError | None = None
        self._seen: Fingerprint | None = None  # what was last loaded (or rejected)
        self._pending: Fingerprint | None = None  # a change waiting to stay still for a poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cache = ParseCache()  # per-file parse results, bounded by the files of the set

    def load_initial(self) -> PolicySet:
        """Load synchronously; a server should refuse to start on an invalid policy set."""
        self._seen = fingerprint(self.paths)
        self.current = self._load()
        return self.current

    def _load(self) -> PolicySet:
        candidate = load(policy_files(self.paths), cache=self.cache)
        if self.check is not None:
            self.check(candidate)
        return candidate

    def poll_once(self) -> bool:
        """One poll; True when a new policy set was applied."""
        now = fingerprint(self.paths)
        if now == self._seen:
            self._pending = None
            return False
        if now != self._pending:
            self._pending = now  # changed since the last poll: wait until it holds still
            return False
        self._pending = None
        self._seen = now
        try:
            candidate = self._load()
        except PolicyError as err:
            self.last_error = err
            log.warning(
                "policy change rejected; keeping version %s",
                self._version(),
                extra={"problems": [str(p) for p in err.problems]},
            )
            self._notify(self.on_error, err)
            return False
        self.last_error = None
        if self.current is not None and candidate.version == self.current.version:
            return False
        self.current = candidate
        log.info("policy version %s applied", candidate.version[:12])
        self._notify(self.on_change, candidate)
        return True

    def _version(self) -> str:
        return self.current.version[:12] if self.current else "none"

    @staticmethod
    def _notify(
        callback: Callable[[PolicySet], None] | Callable[[PolicyError], None] | None, value: object
    ) -> None:
        if callback is None:
            return
        try:
            callback(value)  # type: ignore[arg-type]
        except Exception:
            log.exception("policy watcher callback failed")

    def start(self) -> PolicyWatcher:
        """Load now (raising PolicyError if invalid), then poll on a daemon thread."""
        if self.current is None:
            self.load_initial()
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except Exception:  # never let the watcher die silently: the server would go stale
                log.exception("policy watcher poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class PolicyCheck:
    """:func:`meshward.compile.envoy_limits.check_policy_set` for a watcher, each policy object
    checked once: with the watcher's per-file parse cache, the policies of unchanged files are
    the same objects as last time, so a one-file edit checks that file's policies, not the set.
    Bounded by the policies of the last set checked."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, list[Problem]]] = {}

    def __call__(self, policy_set: PolicySet) -> None:
        from meshward.compile.envoy_limits import policy_value_problems

        seen: dict[int, tuple[Any, list[Problem]]] = {}
        found: list[Problem] = []
        for policy in policy_set.authorization_policies:
            hit = self._seen.get(id(policy))
            if hit is None or hit[0] is not policy:
                hit = (policy, policy_value_problems(policy))
            seen[id(policy)] = hit
            found.extend(hit[1])
        self._seen = seen
        if found:
            raise PolicyError(sorted(set(found)))
