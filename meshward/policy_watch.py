"""Watching a policy directory: apply a change only once it is complete and valid.

Change detection, two ways with one rule:

- **Events** (the default where the kernel has them): ``watchfiles`` (inotify on Linux, the
  maintained Rust ``notify`` crate underneath) wakes the watcher only when something under the
  watched directories changed; it then ``stat``\\ s the changed policy files only, so a one-file
  edit costs O(changed files), and an idle watcher costs nothing. Anything it cannot place
  (a directory, a symlink such as the ``..data`` swap of a Kubernetes ConfigMap volume, an
  overflowed event queue) makes it rescan the whole set. A full rescan also runs every
  :data:`RESCAN_SECONDS` as insurance against a lost event.
- **Polling** (a ``stat`` per file every ``interval``): where events are unavailable (watchfiles
  not installed, the inotify watch limit reached, explicit file paths, whose inotify watches an
  atomic rename would orphan) or not wanted (``events=False``).

Either way a change is loaded only after the file set has stayed the same for one whole
``interval``, so an editor's partial write or a half-copied directory is never applied; editor
temp and swap files are never read. An invalid policy set is reported and the last good one
stays in force.

Loading is incremental per file: the watcher keeps a ParseCache (meshward.policy.loader), so a
one-file edit re-parses that file's YAML and rebuilds the set from the other files' parsed
documents; the set, version included, is the one a full load gives. The control plane and
ext_authz both run it, so it sits between them and meshward.compile in the layering (and
meshward.policy stays pure: no threads).

Limit of any such watcher: a writer that stalls in the middle of a file for longer than one
interval can have a valid prefix of it applied (say, a truncated file that drops a DENY
policy). Write policy files atomically — a temp file, then ``rename`` — as ``git checkout``,
sync tools and most editors do; then every state the watcher can see is a complete file.
"""

from __future__ import annotations

import logging
import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from meshward.policy import PolicyError, PolicySet, Problem, load
from meshward.policy.files import is_policy_file, policy_files
from meshward.policy.loader import ParseCache

# The logger keeps the name it had under meshward.xds, so log filters keep matching.
log = logging.getLogger("meshward.xds.watch")

Fingerprint = tuple[tuple[str, int, int], ...]
#: path -> (size, mtime_ns) of every policy file: what a change is detected against
State = dict[str, tuple[int, int]]

RESCAN_SECONDS = 30.0  # events mode: a full rescan this often, should an event be lost
EVENT_STEP_MS = (
    10  # watchfiles groups events this close together; its idle cost is a wake-up per step
)


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    entries = []
    for file in policy_files(paths):
        try:
            info = file.stat()
        except FileNotFoundError:  # removed between listing and stat: the next poll settles it
            continue
        entries.append((str(file), info.st_size, info.st_mtime_ns))
    return tuple(entries)


def scan(paths: Sequence[Path]) -> State:
    return {path: (size, mtime) for path, size, mtime in fingerprint(paths)}


class PolicyWatcher:
    """Keeps ``current`` equal to the last valid policy set found at ``paths``.

    ``on_change`` runs (on the watcher's thread) with each new valid set whose version differs
    from the current one; ``on_error`` with each rejected change. Both must not raise; if they do
    the error is logged and watching goes on. ``check`` runs on every loaded set and may raise
    PolicyError to refuse it exactly like invalid YAML (the compiler's Envoy-limit check:
    a set Envoy would refuse never becomes ``current``). ``events``: use file events where
    available (see the module docstring); False: always poll. ``marks``: wall-clock times of the
    newest change (``detected``: first seen; ``loaded``: loaded and checked, just before
    ``on_change``), for the control plane's edit timeline.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        on_change: Callable[[PolicySet], None] | None = None,
        on_error: Callable[[PolicyError], None] | None = None,
        interval: float = 0.5,
        check: Callable[[PolicySet], None] | None = None,
        events: bool = True,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.check = check
        self.on_change = on_change
        self.on_error = on_error
        self.interval = interval
        self.events = events
        self.mode = "polling"  # "events" while file events drive it
        self.current: PolicySet | None = None
        self.last_error: PolicyError | None = None
        self.marks: dict[str, float] = {}
        self.stats = 0  # files stat'ed so far: what a test of the events mode's cost counts
        self._seen: State | None = None  # what was last loaded (or rejected)
        self._pending: State | None = None  # a change waiting to stay still for an interval
        self._observed: State = {}  # the newest state seen (events mode: updated per change)
        self._batch: set[str] = set()  # events mode: paths changed since the last settled state
        # (the name policy_files gives, the directory's absolute and real paths): to name the
        # files that events report (absolute, symlinks resolved or not) as a scan does
        self._roots = [
            (p, base) for p in self.paths for base in {p.absolute(), p.resolve()}
        ]  # fmt: skip
        self._stop = threading.Event()
        # Set once the thread watches (file events set up and caught up with, or polling).
        self.watching = threading.Event()
        self._thread: threading.Thread | None = None
        self.cache = ParseCache()  # per-file parse results, bounded by the files of the set

    def load_initial(self) -> PolicySet:
        """Load synchronously; a server should refuse to start on an invalid policy set."""
        self._seen = self._scan()
        self._observed = dict(self._seen)
        self.current = self._load()
        return self.current

    def _load(self) -> PolicySet:
        candidate = load(policy_files(self.paths), cache=self.cache)
        if self.check is not None:
            self.check(candidate)
        return candidate

    def _scan(self) -> State:
        state = scan(self.paths)
        self.stats += len(state)
        return state

    def poll_once(self) -> bool:
        """One poll (a full scan); True when a new policy set was applied."""
        self._observed = self._scan()
        return self._step(self._observed)

    def _step(self, now: State) -> bool:
        """One observation of the file set; True when a new policy set was applied."""
        if now == self._seen:
            self._pending = None
            return False
        if now != self._pending:
            if self._pending is None:
                self.marks = {"detected": time.time()}
            self._pending = now  # changed since the last look: wait until it holds still
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
        self.marks["loaded"] = time.time()
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

    # -- events mode ---------------------------------------------------------------------------
    def _key(self, raw: str) -> str | None:
        """An event's path under the name a scan gives it, or None outside the watched paths."""
        path = Path(raw)
        for root, base in self._roots:
            try:
                relative = path.relative_to(base)
            except ValueError:
                continue
            return str(root / relative)
        return None

    def _is_policy_path(self, key: str) -> bool:
        path = Path(key)
        for root, _ in self._roots:
            try:
                relative = path.relative_to(root)
            except ValueError:
                continue
            return is_policy_file(path) and not any(p.startswith(".") for p in relative.parts)
        return False

    def apply_events(self, changed: Iterable[str]) -> State:
        """The observed state updated for the paths events reported: a ``stat`` per changed
        policy file; editor temp files and other non-policy files ignored; anything else (a
        directory, a symlink such as a ConfigMap's ``..data``, a removed directory) a full
        rescan."""
        state = dict(self._observed)
        for raw in changed:
            key = self._key(raw)
            if key is None:
                return self._scan()
            path = Path(key)
            if self._is_policy_path(key):
                try:
                    info = path.stat()
                except (FileNotFoundError, NotADirectoryError):
                    state.pop(key, None)
                    continue
                self.stats += 1
                if not stat_module.S_ISREG(info.st_mode):
                    return self._scan()  # e.g. a directory named x.yaml
                state[key] = (info.st_size, info.st_mtime_ns)
                continue
            try:
                info = path.lstat()
            except (FileNotFoundError, NotADirectoryError):
                prefix = key.rstrip("/") + "/"
                if any(k.startswith(prefix) for k in state):
                    return self._scan()  # a directory holding policy files went away
                continue
            if not stat_module.S_ISREG(info.st_mode):
                return self._scan()
        return state

    def _events_possible(self) -> bool:
        if not self.events:
            return False
        if not all(p.is_dir() for p in self.paths):
            log.info("policy watcher: a path is a file, not a directory: polling")
            return False
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            log.info("policy watcher: watchfiles is not installed: polling")
            return False
        return True

    def _events(self) -> Any:
        """watchfiles' change batches (an empty batch each quiet ``interval``), or None where
        file events are unavailable. Blocks up to one ``interval`` (watchfiles yields its first
        batch then): called on the watcher's thread, never in :meth:`start`."""
        if not self._events_possible():
            return None
        import watchfiles

        interval_ms = max(EVENT_STEP_MS, int(self.interval * 1000))
        changes = watchfiles.watch(
            *self.paths,
            watch_filter=None,
            debounce=interval_ms,
            step=EVENT_STEP_MS,
            stop_event=self._stop,
            rust_timeout=interval_ms,
            yield_on_timeout=True,
            raise_interrupt=False,
            force_polling=False,
        )
        try:
            next(changes)  # starts watching (or fails here: watch limit reached, path gone)
        except StopIteration:
            return None
        except Exception as exc:
            log.warning("policy watcher: file events unavailable (%s): polling", exc)
            return None
        return changes

    def _on_batch(self, batch: set[tuple[Any, str]]) -> None:
        if batch:
            paths = {path for _, path in batch}
            self._batch |= paths
            self._observed = self.apply_events(paths)
        elif self._pending is not None:
            # Quiet for a whole interval: look again at what changed (a stat per file, in case
            # an event was lost) and apply it if it still is what was seen.
            self._observed = self.apply_events(self._batch)
        else:
            return
        self._step(self._observed)
        if self._pending is None:
            self._batch.clear()

    def _run_events(self, changes: Any) -> bool:
        """Handle event batches until stopped; True when a watched directory itself went away
        (removed, or replaced by another: its watch no longer sees anything)."""
        last_scan = time.monotonic()
        bases = {str(base) for _, base in self._roots}
        for batch in changes:
            if self._stop.is_set():
                return False
            try:
                if not batch and self._pending is None:
                    if time.monotonic() - last_scan >= RESCAN_SECONDS:
                        last_scan = time.monotonic()
                        self._observed = self._scan()
                        self._batch.clear()
                        self._step(self._observed)
                    continue
                self._on_batch(batch)
            except Exception:  # never let the watcher die silently: the server would go stale
                log.exception("policy watcher failed to handle a change")
            if any(path in bases for _, path in batch):
                changes.close()
                return True
        return False

    # -- the thread ----------------------------------------------------------------------------
    def start(self) -> PolicyWatcher:
        """Load now (raising PolicyError if invalid), then watch on a daemon thread."""
        if self.current is None:
            self.load_initial()
        if self._events_possible():
            self.mode = "events"  # (back to "polling" if the watch cannot be had after all)
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # Set up here, not in start(): watchfiles yields its first batch only after a whole
        # interval (a server's start-up, and a 60 s interval's test, waited that long).
        changes = self._events() if self.mode == "events" else None
        if changes is not None:
            # catch up with anything changed between the initial load and the watch
            self._observed = self._scan()
            self._step(self._observed)
        self.watching.set()
        while changes is not None:
            try:
                again = self._run_events(changes)
            except Exception:
                log.exception("policy watcher: file events failed: polling from now on")
                again = False
            if self._stop.is_set():
                return
            # A watched directory was replaced: watch what is there now (polling while it is
            # missing, or if events cannot be had).
            changes = self._events() if again else None
            if changes is not None:
                log.info("policy watcher: a watched directory was replaced: watching it anew")
                self._observed = self._scan()
                self._step(self._observed)
        self.mode = "polling"
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
