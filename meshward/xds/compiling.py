"""Compiling the mesh for the control plane: incremental, packed once, off the event loop.

- **Incremental.** A compiler made by :func:`meshward.xds.compile_adapter.compiler_for` also compiles
  the whole mesh from the previous compile's state (meshward.compile.incremental), so an edit
  recompiles only the workloads and halves it affects. Any other :data:`WorkloadCompiler` (a
  plain function of one workload, as tests and the demo pass) is run for every workload.
- **Packed once.** The compiler shares protos between workloads (a peer's cluster, route and
  endpoints; a listener whose source did not change) and between compiles: each distinct proto
  object is packed, hashed and scanned for its dependencies once (:class:`Packed`), and every
  node holding it gets the same :class:`Resource`.
- **Off the event loop.** :class:`CompileWorker` runs compiles in one worker thread, one at a
  time, the newest policy winning over those still queued (one in flight, one pending); the
  ADS streams keep being served on the loop meanwhile. The compile itself runs where the
  control plane's :class:`ConfigCompiler` says: :class:`LocalCompile` in this process (it then
  shares the interpreter with the streams), or meshward.xds.compile_process in a worker
  process of its own (`xds serve`; the thread only waits for it and unpacks the changes).
  An expires-at instant and a JWKS change are queued here too (the policy set in force,
  recompiled); compiles the caller waits for (a synchronous ``apply_policy``, ``refresh``, an
  expiry with no loop running) take the same lock, so two compiles never run at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, overload

from meshward.compile import spliced
from meshward.policy import PolicySet, Workload
from meshward.xds.resources import Resource, make_resource

log = logging.getLogger("meshward.xds")

#: Compiles one workload: (policy set, workload, now) -> resource protos (any mix of Listener,
#: Cluster, ClusterLoadAssignment, RouteConfiguration). Pure.
WorkloadCompiler = Callable[[PolicySet, Workload, datetime], Sequence[Any]]
#: A workload's outcome: its resource protos, or why its compile failed.
Outcome = Sequence[Any] | str


class MeshCompiler(Protocol):
    """(policy set, now, the previous call's state or None) -> (state for the next call,
    outcome by workload ref). Pure."""

    def __call__(
        self, policy: PolicySet, now: datetime, previous: Any
    ) -> tuple[Any, Mapping[str, Outcome]]: ...


def mesh_compiler(compiler: WorkloadCompiler) -> MeshCompiler:
    """The compiler's own mesh compile (``compiler.mesh``) if it has one, else ``compiler``
    run for every workload."""
    mesh = getattr(compiler, "mesh", None)
    if callable(mesh):
        found: MeshCompiler = mesh
        return found

    def every_workload(
        policy: PolicySet, now: datetime, previous: Any
    ) -> tuple[Any, Mapping[str, Outcome]]:
        out: dict[str, Outcome] = {}
        for workload in policy.workloads:
            try:
                out[workload.ref] = list(compiler(policy, workload, now))
            except Exception as exc:  # reported by compile_configs; the others still compile
                out[workload.ref] = f"{type(exc).__name__}: {exc}"
        return None, out

    return every_workload


class Messages(Sequence[Any]):
    """A workload's messages (an :data:`Outcome`) as the runs of shared tuples they are made of
    (meshward.compile.spliced): packing and fingerprinting do their per-message work once per
    shared tuple, not once per workload holding it. Not flattened unless read as a sequence
    (at N workloads each holding ~N messages, every flat copy is O(N^2) references)."""

    def __init__(self, runs: spliced.Runs) -> None:
        self.runs = runs

    def __len__(self) -> int:
        return sum(stop - start + len(mine) for _, start, stop, mine in self.runs)

    def __iter__(self) -> Iterator[Any]:
        for shared, start, stop, mine in self.runs:
            yield from shared[start:stop]
            yield from mine

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Any, ...]: ...
    def __getitem__(self, index: int | slice) -> Any:
        return spliced.flat(self.runs)[index]


#: (type URL, name, hash)
Key = tuple[str, str, str]
#: A workload's resource keys in the order of its resources, as runs: (keys, start, stop) is
#: keys[start:stop]; a shared tuple's keys are one object for every workload holding a run.
Fingerprint = tuple[tuple[tuple[Key, ...], int, int], ...]


def fingerprint_of(keys: Sequence[Key]) -> Fingerprint:
    """``keys`` (in the order of the resources) as a :data:`Fingerprint` of one run."""
    return ((tuple(keys), 0, len(keys)),) if keys else ()


@dataclass
class WorkloadConfig:
    resources: dict[str, list[Resource]] = field(default_factory=dict)
    # Every resource's key in the order of ``resources`` (type by type, as compiled: sorted by
    # name), as runs of shared key tuples: compare with :meth:`same_resources`.
    fingerprint: Fingerprint = ()
    error: str | None = None
    # The compiler's message list this was packed from: the compiler hands out the same list
    # for an unchanged workload, which is then not packed and fingerprinted again (a one-policy
    # edit costs O(affected workloads) here, not O(every resource of the mesh)).
    source: Any = field(default=None, compare=False, repr=False)
    # Per run of ``fingerprint``, the Resources its key tuple names (a shared tuple's packing
    # for a shared run): the compile worker counts references per shared tuple with them
    # (meshward.xds.refcount). Empty for configs not packed here.
    rows: tuple[tuple[Resource, ...], ...] = field(default=(), compare=False, repr=False)

    def flat_keys(self) -> tuple[Key, ...]:
        """Every resource's key, in the order of ``resources`` (C-level slices of the runs)."""
        runs = self.fingerprint
        if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == len(runs[0][0]):
            return runs[0][0]
        out: list[Key] = []
        for keys, start, stop in runs:
            out.extend(keys[start:stop])
        return tuple(out)

    def same_resources(self, other: WorkloadConfig | None) -> bool:
        """``other`` holds the same resources in the same order. Runs of the same lengths are
        compared run by run: the same key tuple and bounds in O(1), else the same Resource
        objects (pointer comparisons: the compile process's parent keeps one Resource per
        key, each answer's key tuples being new objects), else the keys themselves."""
        if other is None:
            return False
        mine, theirs = self.fingerprint, other.fingerprint
        if len(mine) != len(theirs) or any(
            a[2] - a[1] != b[2] - b[1] for a, b in zip(mine, theirs, strict=True)
        ):
            if sum(r[2] - r[1] for r in mine) != sum(r[2] - r[1] for r in theirs):
                return False
            return self.flat_keys() == other.flat_keys()
        rows = len(self.rows) == len(mine) and len(other.rows) == len(theirs)
        for j, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if a[0] is b[0] and a[1] == b[1]:
                continue
            if rows and self.rows[j][a[1] : a[2]] == other.rows[j][b[1] : b[2]]:
                continue
            if a[0][a[1] : a[2]] != b[0][b[1] : b[2]]:
                return False
        return True


#: id(proto) -> (the proto, kept alive so its id is not reused; its Resource)
Packed = Mapping[int, tuple[Any, Resource]]


@dataclass(frozen=True, eq=False)
class PackedTuple:
    """A shared tuple of protos (meshward.compile.spliced), packed once for every workload
    holding a run of it: its Resources, their keys, and their type URL when they all have one
    (the compiler's shared tuples do: one kind each). Holds the tuple so its id is not reused."""

    messages: tuple[Any, ...]
    resources: tuple[Resource, ...]
    keys: tuple[Key, ...]
    type_url: str | None


#: id(shared tuple) -> its packing
PackedShared = Mapping[int, PackedTuple]


@dataclass(frozen=True)
class Compiled:
    """One compile's result, ready to install on the loop."""

    policy: PolicySet
    now: datetime
    state: Any
    configs: dict[str, WorkloadConfig]
    changed: set[str]  # refs whose resources changed (added and removed included)
    packed: Packed
    shared: PackedShared = field(default_factory=dict)


class _Packer:
    """One compile's packing: each distinct proto packed once (or taken from the previous
    compile's table), each shared tuple packed once (:class:`PackedTuple`); ``packed`` and
    ``shared`` end up holding what the result holds, for the next compile."""

    def __init__(self, previous: Packed, previous_shared: PackedShared) -> None:
        self.previous = previous
        self.previous_shared = previous_shared
        self.packed: dict[int, tuple[Any, Resource]] = {}
        self.shared: dict[int, PackedTuple] = {}

    def one(self, message: Any) -> Resource:
        key = id(message)
        hit = self.packed.get(key) or self.previous.get(key)
        if hit is None or hit[0] is not message:
            hit = (message, make_resource(message))
        self.packed[key] = hit
        return hit[1]

    def tuple_(self, messages: tuple[Any, ...]) -> PackedTuple:
        key = id(messages)
        hit = self.shared.get(key)
        if hit is not None and hit.messages is messages:
            return hit
        hit = self.previous_shared.get(key)
        if hit is not None and hit.messages is messages:
            packed, previous = self.packed, self.previous  # keep its protos' packing too
            for message in messages:
                if (found := previous.get(id(message))) is not None:
                    packed[id(message)] = found
        else:
            resources = tuple(map(self.one, messages))
            kinds = {r.type_url for r in resources}
            hit = PackedTuple(
                messages,
                resources,
                tuple(r.key for r in resources),
                next(iter(kinds)) if len(kinds) == 1 else None,
            )
        self.shared[key] = hit
        return hit

    def config(self, outcome: Sequence[Any]) -> WorkloadConfig:
        """A workload's packed config: per run of a shared tuple, C-level slices of its
        packing; per message of its own, one lookup."""
        runs = outcome.runs if isinstance(outcome, Messages) else spliced.own(tuple(outcome))
        by_type: dict[str, list[Resource]] = {}
        runs_of: dict[str, list[tuple[tuple[tuple[Key, ...], int, int], tuple[Resource, ...]]]] = {}
        loose: dict[str, list[Resource]] = {}  # own resources since the type's last shared run

        def settle(type_url: str) -> None:
            mine = loose.pop(type_url, None)
            if mine:
                keys = tuple(r.key for r in mine)
                runs_of.setdefault(type_url, []).append(((keys, 0, len(keys)), tuple(mine)))

        packed_now, previous = self.packed, self.previous
        for shared, start, stop, mine in runs:
            if stop > start:
                packed = self.tuple_(shared)
                if packed.type_url is not None:
                    by_type.setdefault(packed.type_url, []).extend(packed.resources[start:stop])
                    settle(packed.type_url)
                    runs_of.setdefault(packed.type_url, []).append(
                        ((packed.keys, start, stop), packed.resources)
                    )
                else:
                    for resource in packed.resources[start:stop]:
                        by_type.setdefault(resource.type_url, []).append(resource)
                        loose.setdefault(resource.type_url, []).append(resource)
            last = ""
            for message in mine:  # (inlined: one lookup per own message, as the flat pass)
                hit = packed_now.get(id(message)) or previous.get(id(message))
                if hit is None or hit[0] is not message:
                    hit = (message, make_resource(message))
                packed_now[id(message)] = hit
                resource = hit[1]
                if resource.type_url != last:
                    last = resource.type_url
                    group = by_type.setdefault(last, [])
                    own_group = loose.setdefault(last, [])
                group.append(resource)
                own_group.append(resource)
        for type_url in list(loose):
            settle(type_url)
        both = [run for type_url in by_type for run in runs_of.get(type_url, ())]
        return WorkloadConfig(
            by_type,
            tuple(run for run, _ in both),
            source=outcome,
            rows=tuple(rows for _, rows in both),
        )

    def keep(self, outcome: Sequence[Any]) -> None:
        """Carry an unchanged workload's packing over to the next compile."""
        runs = outcome.runs if isinstance(outcome, Messages) else spliced.own(tuple(outcome))
        for shared, start, stop, mine in runs:
            if stop > start:
                hit = self.previous_shared.get(id(shared))
                if hit is not None and hit.messages is shared:
                    self.tuple_(shared)  # once per shared tuple, with its protos' packing
                else:
                    for message in shared[start:stop]:
                        self._carry(message)
            for message in mine:
                self._carry(message)

    def _carry(self, message: Any) -> None:
        hit = self.previous.get(id(message))
        if hit is not None:
            self.packed[id(message)] = hit


def compile_configs(
    compiler: MeshCompiler,
    policy: PolicySet,
    now: datetime,
    state: Any,
    configs: Mapping[str, WorkloadConfig],
    packed: Packed,
    *,
    quiet: bool = False,
    shared: PackedShared | None = None,
) -> Compiled:
    """Compile ``policy`` and pack the result. A workload whose compile failed keeps its
    previous config (with the error), logged in one line unless ``quiet`` (the first compile's
    errors are the caller's to report: `xds serve` refuses to start). ``packed``/``shared``:
    the previous result's packing (:class:`Compiled`), reused for the protos and shared tuples
    still held. Pure: safe to run in a worker thread."""
    next_state, outcomes = compiler(policy, now, state)
    fresh: dict[str, WorkloadConfig] = {}
    packer = _Packer(packed, shared or {})
    changed: set[str] = set()
    for workload in policy.workloads:
        ref = workload.ref
        previous = configs.get(ref)
        outcome = outcomes.get(ref, "no compile result")
        if isinstance(outcome, str):
            if not quiet:
                log.error("compiling %s failed; it keeps its previous config: %s", ref, outcome)
            config = WorkloadConfig(
                previous.resources if previous else {},
                previous.fingerprint if previous else (),
                outcome,
                rows=previous.rows if previous else (),
            )
        elif previous is not None and previous.source is outcome and previous.error is None:
            packer.keep(outcome)  # keep their packing for the next compile
            config = previous
        else:
            config = packer.config(outcome)
        fresh[ref] = config
        if not config.same_resources(previous):
            changed.add(ref)
    changed.update(ref for ref in configs if ref not in fresh)
    return Compiled(policy, now, next_state, fresh, changed, packer.packed, packer.shared)


class ConfigCompiler(Protocol):
    """Compiles a policy set into every workload's packed config, keeping what the next call
    reuses. Called under the control plane's compile lock (never twice at once). ``configs``:
    the configs in force, which ``changed`` is relative to; ``full``: from scratch."""

    def __call__(
        self,
        policy: PolicySet,
        now: datetime,
        configs: Mapping[str, WorkloadConfig],
        *,
        full: bool = False,
        quiet: bool = False,
    ) -> Compiled: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalCompile:
    """:func:`compile_configs` in this process (in the worker thread, or on the caller's
    thread for a synchronous compile). Its state advances with every compile, installed or
    not: the incremental compile is byte-identical from any previous state, and ``changed``
    is computed against the configs passed in."""

    def __init__(self, mesh: MeshCompiler) -> None:
        self._mesh = mesh
        self._state: Any = None
        self._packed: Packed = {}
        self._shared: PackedShared = {}

    def __call__(
        self,
        policy: PolicySet,
        now: datetime,
        configs: Mapping[str, WorkloadConfig],
        *,
        full: bool = False,
        quiet: bool = False,
    ) -> Compiled:
        compiled = compile_configs(
            self._mesh, policy, now, None if full else self._state, configs, self._packed,
            quiet=quiet, shared=self._shared,
        )  # fmt: skip
        self._state, self._packed, self._shared = compiled.state, compiled.packed, compiled.shared
        return compiled

    def status(self) -> dict[str, Any]:
        return {"mode": "thread"}

    def close(self) -> None:
        pass


def config_compiler(compiler: WorkloadCompiler) -> ConfigCompiler:
    """The compiler's own :class:`ConfigCompiler` (``compiler.config_compiler()``: e.g. one
    in a process of its own, meshward.xds.compile_process) if it has one, else
    :class:`LocalCompile` over :func:`mesh_compiler`."""
    make = getattr(compiler, "config_compiler", None)
    if callable(make):
        made: ConfigCompiler = make()
        return made
    return LocalCompile(mesh_compiler(compiler))


class CompileFailed(Exception):
    """A compile produced no result at all (e.g. its worker process died): nothing of it is
    installed, the configs in force stay."""


class CompileWorker:
    """Runs :func:`compile_configs` in one worker thread for the control plane's loop.

    ``submit(policy)`` (on the loop) queues a compile of ``policy``; while one runs, further
    submissions replace the queued one (only the newest policy matters; ``full`` sticks: a
    queued compile from scratch stays one). ``install`` is awaited on the loop with each
    result. ``lock`` serializes every compile of the control plane, in the worker or on the loop.
    """

    def __init__(
        self,
        run: Callable[[PolicySet, bool], Compiled],
        install: Callable[[Compiled], Awaitable[None]],
        lock: threading.Lock,
        failed: Callable[[PolicySet, str], None] | None = None,
    ) -> None:
        self._run = run
        self._install = install
        self._failed = failed
        self.lock = lock
        self._pending: PolicySet | None = None
        self._full = False  # the queued compile is from scratch
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, policy: PolicySet, *, full: bool = False) -> None:
        self._pending = policy
        self._full = self._full or full
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="meshward-xds-compile"
            )

    @property
    def busy(self) -> bool:
        """A compile is queued, running or being installed."""
        return self._task is not None and not self._task.done()

    def _compile(self, policy: PolicySet, full: bool) -> Compiled:
        with self.lock:
            return self._run(policy, full)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="meshward-compile"
            )
        while self._pending is not None:
            policy, self._pending = self._pending, None
            full, self._full = self._full, False
            try:
                compiled = await loop.run_in_executor(self._executor, self._compile, policy, full)
            except Exception as exc:
                log.exception(
                    "compiling policy %s failed; keeping the one in force", policy.version[:12]
                )
                if self._failed is not None:
                    self._failed(policy, f"{type(exc).__name__}: {exc}")
                continue
            try:
                await self._install(compiled)
            except Exception:
                log.exception("installing policy %s failed", policy.version[:12])

    async def idle(self) -> None:
        """Wait until every submitted compile is installed."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


#: Nodes refreshed between two pauses when a worker compile's result is pushed out. At 5,005
#: delta nodes (bench/xds_fleet.py, 1,000 x 5, interleaved A/B): 32 kept the loop waiting
#: between batches, 5.26-5.36 s per mesh-wide edit and ~4 s of server CPU; 128 took 3.65-4.98 s
#: and 2.5-3.9 s (gRPC's threads get more to do per wake-up), longest probe stall 127-341 ms
#: against 217-228 ms (a request waits behind at most two batches of pushes).
FANOUT_BATCH = 128
FANOUT_PAUSE = 0.002  # seconds
#: The most a batch waits for earlier pushes to drain (a stream that never reads has its own
#: write timeout; this only keeps a miscount from stopping the fan-out).
FANOUT_MAX_WAIT = 2.0


async def paced(
    steps: Iterable[object],
    batch: int = FANOUT_BATCH,
    pause: float = FANOUT_PAUSE,
    backlog: Callable[[], int] | None = None,
    settle: Callable[[], None] | None = None,
) -> None:
    """Run ``steps`` (each wakes one node's streams), pausing after every ``batch``: the
    streams already woken push their config, and every other stream's requests are served,
    before more nodes are woken. ``backlog``: streams woken and not yet pushed; after a batch
    the next waits until it is at most ``batch`` (bounded by FANOUT_MAX_WAIT), so pushes in
    flight stay bounded and a stream's own request never waits behind thousands of them.
    ``settle``: called after every batch (the control plane freezes what the batch allocated,
    meshward.xds.heap, so no garbage collection pass on the loop walks the whole fan-out)."""
    loop = asyncio.get_running_loop()
    for count, _ in enumerate(steps, 1):
        if count % batch == 0:
            if settle is not None:
                settle()
            await asyncio.sleep(pause)
            deadline = loop.time() + FANOUT_MAX_WAIT
            while backlog is not None and backlog() > batch and loop.time() < deadline:
                await asyncio.sleep(pause)


def releasing(steps: Iterator[bool], retired: dict[str, Any]) -> Iterator[bool]:
    """``steps``, letting go of one entry of ``retired`` after each, then of the rest one per
    step (each a step of its own, so the fan-out's pauses spread the deallocation too)."""
    for step in steps:
        yield step
        if retired:
            retired.popitem()
    while retired:
        retired.popitem()
        yield False
