"""The mesh compile in a process of its own, so no ADS stream waits for it.

A compile thread shares the GIL with the event loop serving every stream: during a mesh-wide
recompile at 1,000 services the loop got the interpreter only between the compile's slices and
streams stalled for a second. Here one long-lived worker process (spawned, not forked: the
parent runs threads and an event loop) keeps the whole incremental compile state
(meshward.compile.incremental, the Envoy-limits backstop, the packing) and answers each compile
with only what changed since its previous answer, already packed:

- per workload whose resources or error changed: its resource keys ``(type URL, name, hash)``
  in order, as runs of key tuples (a mesh-wide tuple that every caller holds most of is sent
  once, and the parent looks it up once: meshward.compile.spliced), and its error;
- per key this parent has not been sent yet: the packed bytes and the names it depends on.

The policy set goes the other way as only the documents that differ from the set the worker
compiled last (:class:`PolicyDelta`; the loader reuses the objects of unchanged files, so
finding them is an identity check): pickling and unpickling a 1,000-service set took ~0.15 s of
a one-policy edit's critical path. A worker that does not hold the base set (a new one) says so
and gets the whole set.

The parent rebuilds a :class:`Resource` from those bytes without parsing or walking anything,
in the compile worker thread (meshward.xds.compiling), so the loop only installs the result.

Failure handling, fail closed: a compile either returns a whole result or nothing. When the
worker dies (killed, out of memory, a crash in a C extension), the pool is replaced, the new
worker rebuilds its state from the last policy set it compiled successfully, and the failed
policy is tried once more; if the worker dies again it raises :class:`CompileFailed` (the
control plane keeps serving the configs in force and shows the error in status). Bounded: one
compile in flight (the worker thread waits for it), the parent's table of packed resources
holds only the resources of the newest result.

The worker's heap is its compile state (every workload's protos, their JSON sources, the
packing): hundreds of thousands of long-lived objects that every full pass of the cyclic
garbage collector walks, several times during a compile (gc callbacks timing each pass, 300
services: 0.21 s of a 1.6 s first compile, 0.26 s of a ~1 s mesh-wide edit). A compile makes
no cyclic garbage (``gc.collect()`` after a compile run with the collector off finds 0
objects), so the worker runs with the collector off and freezes what each compile left
(:func:`_settle`; ``gc.freeze`` is O(1)). Anything kept alive by a reference cycle waits for a
full collection, which comes when the heap has grown to ``GROWTH`` times its size after the
last one (as meshward.xds.heap does for the event loop's heap): bounded.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import multiprocessing
import signal
import sys
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from google.protobuf import any_pb2

from meshward.policy import PolicySet
from meshward.xds.compiling import (
    Compiled,
    CompileFailed,
    Fingerprint,
    LocalCompile,
    WorkloadConfig,
)
from meshward.xds.refcount import RefCounts
from meshward.xds.resources import Resource

log = logging.getLogger("meshward.xds")

#: (type URL, resource name, content hash): one packed resource version
Key = tuple[str, str, str]
#: packed bytes, then the secrets, clusters, routes and EDS names it references
Body = tuple[bytes, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True)
class Delta:
    """One compile's answer: what changed since the worker's previous answer."""

    # changed ref -> (its resources' keys as runs of key tuples, compiling.Fingerprint: a
    # shared tuple is pickled once per answer, not once per workload; its error)
    workloads: dict[str, tuple[Fingerprint, str | None]]
    removed: tuple[str, ...]  # refs no longer in the set
    bodies: dict[Key, Body]  # keys the parent was not sent before
    live: int  # distinct keys of the whole result (the parent's table size after this)
    # Keys no workload holds any more: the parent drops them from its table in O(changes)
    # (finding them by walking every workload's resources held the GIL for ~0.1 s beside the
    # event loop at 1,000 services, every mesh-wide edit).
    dropped: tuple[Key, ...] = ()


KINDS = ("workloads", "authorization_policies", "peer_authentications", "request_authentications")


@dataclass(frozen=True)
class PolicyDelta:
    """A policy set as what differs from ``base`` (a version the worker compiled last)."""

    base: str
    version: str
    mesh: Any
    changed: dict[str, tuple[Any, ...]]  # kind -> objects added or changed
    removed: dict[str, tuple[tuple[str, str], ...]]  # kind -> (namespace, name) gone
    warnings: tuple[Any, ...]


class StaleBase(Exception):
    """The worker does not hold the delta's base set: send the whole set."""


def _by_key(items: tuple[Any, ...]) -> dict[tuple[str, str], Any]:
    return {(i.namespace, i.name): i for i in items}


def policy_delta(old: PolicySet, new: PolicySet) -> PolicyDelta | None:
    """``new`` as a delta from ``old``, or None where the whole set must go (a subclass, which
    may pickle its own way; two objects of a kind under one name, which a delta cannot say)."""
    if type(old) is not PolicySet or type(new) is not PolicySet:
        return None
    changed: dict[str, tuple[Any, ...]] = {}
    removed: dict[str, tuple[tuple[str, str], ...]] = {}
    for kind in KINDS:
        items: tuple[Any, ...] = getattr(new, kind)
        before, after = _by_key(getattr(old, kind)), _by_key(items)
        if len(after) != len(items) or len(before) != len(getattr(old, kind)):
            return None
        changed[kind] = tuple(i for k, i in after.items() if before.get(k) is not i)
        removed[kind] = tuple(k for k in before if k not in after)
    return PolicyDelta(old.version, new.version, new.mesh, changed, removed, new.warnings)


def apply_policy_delta(old: PolicySet, delta: PolicyDelta) -> PolicySet:
    """The set ``delta`` stands for, from ``old`` (whose version must be its base): objects
    sorted by namespace and name as :meth:`PolicySet.create` sorts them, the version as sent
    (the parent computed it)."""
    if old.version != delta.base:
        raise StaleBase(delta.base)
    fields: dict[str, tuple[Any, ...]] = {}
    for kind in KINDS:
        merged = _by_key(getattr(old, kind))
        for key in delta.removed[kind]:
            merged.pop(key, None)
        merged.update(_by_key(delta.changed[kind]))
        fields[kind] = tuple(merged[k] for k in sorted(merged))
    return PolicySet(mesh=delta.mesh, version=delta.version, warnings=delta.warnings, **fields)


# -- in the worker process ----------------------------------------------------------------------
class _Worker:
    """The compile state of the worker process: everything the next incremental compile needs,
    and what the parent already holds (``live``: keys of the previous answer's result)."""

    def __init__(self, options: Any, agent_secrets: bool) -> None:
        from meshward.xds.compile_adapter import compiler_for
        from meshward.xds.compiling import mesh_compiler

        self.compiler = compiler_for(options, agent_secrets=agent_secrets)
        self.local = LocalCompile(mesh_compiler(self.compiler))
        self.configs: dict[str, WorkloadConfig] = {}
        # How many workloads hold each key over the previous answer's result (counted per
        # shared tuple where possible): what the parent holds and when a key first appears
        self.live = RefCounts()
        self.policy: PolicySet | None = None  # the set compiled last (a delta's base)

    def compile(
        self, policy: PolicySet, now: datetime, jwks: Mapping[str, str], full: bool
    ) -> Delta:
        self.compiler.jwks.documents = dict(jwks)
        compiled = self.local(policy, now, self.configs, full=full, quiet=True)
        previous, self.configs = self.configs, compiled.configs
        workloads: dict[str, tuple[Fingerprint, str | None]] = {}
        pairs: list[tuple[WorkloadConfig | None, WorkloadConfig | None]] = []
        for ref, config in compiled.configs.items():
            old = previous.get(ref)
            if old is config:
                continue
            pairs.append((old, config))
            if old is None or old.error != config.error or not config.same_resources(old):
                workloads[ref] = (config.fingerprint, config.error)
        removed = tuple(ref for ref in previous if ref not in compiled.configs)
        pairs.extend((previous[ref], None) for ref in removed)
        fresh, dropped = self.live.recount(pairs)
        bodies = {key: _body(resource) for key, resource in fresh.items()}
        return Delta(workloads, removed, bodies, len(self.live), dropped)


def _body(resource: Resource) -> Body:
    return (
        resource.body.value,
        tuple(sorted(resource.secrets)),
        tuple(sorted(resource.clusters)),
        tuple(sorted(resource.routes)),
        tuple(sorted(resource.endpoints)),
    )


_WORKER: _Worker | None = None
#: A thaw (a full collection) is due when the heap has grown to this many times its size after
#: the last one, and by at least FLOOR memory blocks.
GROWTH = 4.0
FLOOR = 1_000_000
_REFERENCE: list[int] = []  # allocated blocks after the first compile or the last thaw


def _settle() -> bool:
    """Freeze what the compile left (see the module's docstring); True when a full collection
    was due (the reference cycles kept meanwhile collected first)."""
    blocks = sys.getallocatedblocks()
    if not _REFERENCE:
        _REFERENCE.append(blocks)
    elif blocks > GROWTH * _REFERENCE[0] and blocks - _REFERENCE[0] > FLOOR:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _REFERENCE[0] = sys.getallocatedblocks()
        return True
    gc.freeze()
    return False


def _start(options: Any, agent_secrets: bool) -> None:
    """The worker's initializer: the server's Ctrl-C reaches the whole process group; the
    parent decides when the worker stops."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.disable()  # collected by _settle when due
    _WORKER = _Worker(options, agent_secrets)


def _compile(
    policy: PolicySet | PolicyDelta, now: datetime, jwks: Mapping[str, str], full: bool
) -> Delta:
    assert _WORKER is not None, "the compile worker was not initialized"
    if isinstance(policy, PolicyDelta):
        if _WORKER.policy is None:
            raise StaleBase(policy.base)
        policy = apply_policy_delta(_WORKER.policy, policy)
    answer = _WORKER.compile(policy, now, jwks, full)
    _WORKER.policy = policy
    _settle()
    return answer


# -- in the control plane's process -------------------------------------------------------------
class CompileProcess:
    """A :class:`meshward.xds.compiling.ConfigCompiler` whose compile runs in a worker process.

    ``options``/``agent_secrets``: as for :func:`meshward.xds.compile_adapter.compiler_for`;
    ``jwks``: the parent's JwksCache (its documents go with every compile)."""

    def __init__(self, options: Any, agent_secrets: bool, jwks: Any) -> None:
        self._options = options
        self._agent_secrets = agent_secrets
        self._jwks = jwks
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        # Mirrors of the worker's previous answer: its configs and its packed resources.
        self._mirror: dict[str, WorkloadConfig] = {}
        self._table: dict[Key, Resource] = {}
        self._accepted: tuple[PolicySet, datetime] | None = None  # the last one compiled whole
        self._worker_policy: PolicySet | None = None  # what the worker compiled last
        self.deltas = 0  # compiles sent as a PolicyDelta
        self.restarts = 0
        self.failures = 0
        self.last_error: str | None = None
        self.pid: int | None = None

    def _pool_now(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=(self._options, self._agent_secrets),
            )
        return self._pool

    def _ask(self, policy: PolicySet, now: datetime, full: bool) -> Delta:
        base = self._worker_policy
        sent = policy_delta(base, policy) if base is not None else None
        try:
            delta = self._submit(sent if sent is not None else policy, now, full)
        except StaleBase:
            sent = None
            delta = self._submit(policy, now, full)
        self.deltas += sent is not None
        self._worker_policy = policy
        return delta

    def _submit(self, policy: PolicySet | PolicyDelta, now: datetime, full: bool) -> Delta:
        self._worker_policy = None  # unknown until it answers
        future = self._pool_now().submit(_compile, policy, now, self._jwks.documents, full)
        if self.pid is None and self._pool is not None:
            self.pid = next(iter(self._pool._processes), None)
        delta: Delta = future.result()
        return delta

    def _restart(self, why: str) -> None:
        """The worker died: a new one starts empty, so the mirrors start empty too."""
        self.restarts += 1
        self.last_error = why
        log.error("the compile worker process died (%s); starting a new one", why)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self.pid = None
        self._mirror = {}
        self._table = {}
        self._worker_policy = None

    def __call__(
        self,
        policy: PolicySet,
        now: datetime,
        configs: Mapping[str, WorkloadConfig],
        *,
        full: bool = False,
        quiet: bool = False,
    ) -> Compiled:
        for attempt in (1, 2):
            try:
                delta = self._ask(policy, now, full)
                break
            except BrokenProcessPool as exc:
                self._restart(f"{type(exc).__name__}: {exc}")
                self._rebuild()
                if attempt == 2:
                    self.failures += 1
                    raise CompileFailed(
                        f"the compile worker process died twice compiling policy "
                        f"{policy.version[:12]}; keeping the configs in force"
                    ) from None
            except Exception as exc:  # the worker lives, the call failed (e.g. did not pickle)
                return self._here(policy, now, configs, quiet, f"{type(exc).__name__}: {exc}")
        self._accepted = (policy, now)
        return self._apply(policy, now, delta, configs, quiet=quiet)

    def _here(
        self,
        policy: PolicySet,
        now: datetime,
        configs: Mapping[str, WorkloadConfig],
        quiet: bool,
        why: str,
    ) -> Compiled:
        """The worker could not take this compile (it is alive, the call failed): compile it
        whole in this process rather than not at all, since a compile that never happens can
        keep an expired emergency allow in force. The worker's mirrors are untouched, so its
        next answer still applies to them."""
        from meshward.xds.compile_adapter import compiler_for
        from meshward.xds.compiling import mesh_compiler

        self.failures += 1
        self.last_error = why
        log.error("the compile worker process refused a compile (%s); compiling here", why)
        local = LocalCompile(
            mesh_compiler(
                compiler_for(self._options, agent_secrets=self._agent_secrets, jwks=self._jwks)
            )
        )
        return local(policy, now, configs, full=True, quiet=quiet)

    def _rebuild(self) -> None:
        """Give a new worker the state of the last policy set it compiled whole (its answer
        lands in the mirrors only; the configs in force are not touched)."""
        if self._accepted is None:
            return
        try:
            delta = self._ask(*self._accepted, False)
        except BrokenProcessPool as exc:
            self._restart(f"{type(exc).__name__}: {exc} (rebuilding its state)")
            return
        self._apply(*self._accepted, delta, self._mirror, quiet=True)

    def _apply(
        self,
        policy: PolicySet,
        now: datetime,
        delta: Delta,
        configs: Mapping[str, WorkloadConfig],
        *,
        quiet: bool,
    ) -> Compiled:
        table = self._table
        for key in delta.dropped:
            table.pop(key, None)
        for key, body in delta.bodies.items():
            table[key] = _resource(key, body)
        mirror = dict(self._mirror)
        for ref in delta.removed:
            mirror.pop(ref, None)
        rows_of: dict[int, tuple[tuple[Resource | None, ...], str | None]] = {}
        for ref, (runs, error) in delta.workloads.items():
            mirror[ref] = _config(runs, error, table, rows_of)
            if error is not None and not quiet:
                log.error("compiling %s failed; it keeps its previous config: %s", ref, error)
        if len(table) != delta.live:  # (never: the worker said what it dropped) rebuild it
            held = {
                r.key
                for config in mirror.values()
                for items in config.resources.values()
                for r in items
            }
            self._table = {key: table[key] for key in held}
        self._mirror = mirror
        changed = {
            ref
            for ref, config in mirror.items()
            if (old := configs.get(ref)) is not config
            and (old is None or old.error != config.error or not config.same_resources(old))
        }
        changed.update(ref for ref in configs if ref not in mirror)
        return Compiled(policy, now, None, dict(mirror), changed, {})

    def status(self) -> dict[str, Any]:
        return {
            "mode": "process",
            "pid": self.pid,
            "restarts": self.restarts,
            "failures": self.failures,
            "last_error": self.last_error,
            "resources": len(self._table),
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _config(
    runs: Fingerprint,
    error: str | None,
    table: Mapping[Key, Resource],
    rows_of: dict[int, tuple[tuple[Resource | None, ...], str | None]],
) -> WorkloadConfig:
    """A workload's config from its runs of keys: each key tuple looked up in ``table`` once
    per answer (a shared one for every workload holding a run of it; positions no workload
    holds are None and in no run), then sliced per run."""
    resources: dict[str, list[Resource]] = {}
    rows: list[tuple[Resource, ...]] = []
    for keys, start, stop in runs:
        hit = rows_of.get(id(keys))
        if hit is None:
            kinds = {key[0] for key in keys}
            found = tuple(table.get(key) for key in keys)
            hit = rows_of[id(keys)] = (found, kinds.pop() if len(kinds) == 1 else None)
        found, kind = hit
        held = cast(tuple[Resource, ...], found[start:stop])
        if None in held:
            raise KeyError(f"a resource the compile worker named was not sent: {keys[start:stop]}")
        if kind is not None:
            resources.setdefault(kind, []).extend(held)
        else:
            for resource in held:
                resources.setdefault(resource.type_url, []).append(resource)
        rows.append(cast(tuple[Resource, ...], found))
    return WorkloadConfig(resources, runs, error, rows=tuple(rows))


def _resource(key: Key, body: Body) -> Resource:
    type_url, name, version = key
    value, secrets, clusters, routes, endpoints = body
    return Resource(
        type_url=type_url,
        name=name,
        hash=version,
        body=any_pb2.Any(type_url=type_url, value=value),
        secrets=frozenset(secrets),
        clusters=frozenset(clusters),
        routes=frozenset(routes),
        endpoints=frozenset(endpoints),
    )
