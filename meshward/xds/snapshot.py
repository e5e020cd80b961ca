"""What one node should have: resources per type URL, each type versioned by its content.

A type's version is a digest of its resources (name and content hash, sorted by name), nothing
else: no policy version, no certificate generation, no clock. So

- a type whose content did not change keeps its version (a policy change that does not touch a
  node's listeners pushes no listeners to it, and "desired" never moves away from "ACKed" for a
  node that has nothing new to apply: no false drift);
- every replica, and a restarted control plane, computes the same version for the same content
  (compile output is byte-identical for the same input), so a reconnecting Envoy that reports
  the version it holds is recognised as in sync and sent nothing (see
  :mod:`meshward.xds.protocol`);
- new content always gets a new version, whatever made it change (a policy edit, an expires-at
  instant, a renewed SVID or trust bundle).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from meshward.xds import typeurls
from meshward.xds.resources import Resource

_EMPTY: Mapping[str, Resource] = MappingProxyType({})
MAX_REPORTED = 5  # missing references named in an InconsistentSnapshot message (bounded)
VERSION_LENGTH = 16  # hex characters of a content version


def content_version(fingerprint: Mapping[str, str]) -> str:
    """The version of a set of resources given as ``{name: content hash}`` (order-free)."""
    text = "\n".join(f"{name} {digest}" for name, digest in sorted(fingerprint.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:VERSION_LENGTH]


@dataclass(frozen=True, eq=False)
class TypeContent:
    """One type's resources as a node gets them, shared by every node that gets the same
    resources (the replicas of a workload; under `meshward agent` every node's ``ROOTCA``):
    its version, the names its resources reference, and the encoded ``resources`` entries of a
    whole response are computed once for all of them, not once per node."""

    type_url: str
    version: str
    resources: Mapping[str, Resource]
    secrets: frozenset[str]  # every SDS name its resources reference (consistency check)
    routes: frozenset[str]
    endpoints: frozenset[str]

    @classmethod
    def build(cls, type_url: str, by_name: Mapping[str, Resource]) -> TypeContent:
        ordered = dict(sorted(by_name.items()))
        fingerprint = {n: r.hash for n, r in ordered.items()}
        return cls(
            type_url,
            content_version(fingerprint),
            MappingProxyType(ordered),
            frozenset().union(*(r.secrets for r in ordered.values())),
            frozenset().union(*(r.routes for r in ordered.values())),
            frozenset().union(*(r.endpoints for r in ordered.values())),
        )

    @cached_property
    def names(self) -> frozenset[str]:
        """Its resources' names, for the consistency check: ``refs <= names`` walks only the
        references (a set difference against a dict's keys copied both sides, for every type
        of every node of a fan-out: a third of the fan-out's own time at 5,005 nodes)."""
        return frozenset(self.resources)

    @cached_property
    def sotw_body(self) -> bytes:
        """Every resource as an encoded DiscoveryResponse ``resources`` entry, in name order:
        the body of a SotW response carrying exactly this content (see
        :func:`meshward.xds.resources.encode_response`)."""
        return b"".join(r.sotw_entry for r in self.resources.values())

    @cached_property
    def delta_body(self) -> bytes:
        """The same for a DeltaDiscoveryResponse carrying every resource (a first answer)."""
        return b"".join(r.delta_entry for r in self.resources.values())


MAX_CONTENTS = 100_000  # distinct contents shared at once (beyond: built per node, not shared)


class ContentCache:
    """Interns :class:`TypeContent` by the exact resources a node gets (the same Resource
    objects, which the compiler shares between replicas and between compiles). Weak: an entry
    lives only while some node's snapshot holds it, so the cache never outgrows the snapshots;
    ``limit`` bounds it besides (a content not interned is still correct, just not shared)."""

    def __init__(self, limit: int = MAX_CONTENTS) -> None:
        self.limit = limit
        self._contents: weakref.WeakValueDictionary[tuple[Any, ...], TypeContent] = (
            weakref.WeakValueDictionary()
        )
        self.hits = 0
        self.misses = 0

    def get(self, type_url: str, resources: Iterable[Resource]) -> TypeContent:
        listed = tuple(resources)
        key = (type_url, *listed)
        found = self._contents.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        content = TypeContent.build(type_url, _by_name(type_url, listed))
        if len(self._contents) < self.limit:
            self._contents[key] = content
        return content

    def __len__(self) -> int:
        return len(self._contents)


def _by_name(type_url: str, resources: Iterable[Resource]) -> dict[str, Resource]:
    by_name: dict[str, Resource] = {}
    for resource in resources:
        if resource.type_url != type_url:
            raise ValueError(f"{resource.name}: {resource.type_url} listed under {type_url}")
        if resource.name in by_name:
            raise ValueError(f"two {typeurls.short(type_url)} resources named {resource.name!r}")
        by_name[resource.name] = resource
    return by_name


@dataclass(frozen=True)
class TypeSnapshot:
    version: str
    resources: Mapping[str, Resource]
    changed_at: float  # monotonic time the content last changed (drift is measured from here)
    # The shared content these came from (None: built by hand, e.g. in tests); its encoded
    # bodies are what a response carrying all of ``resources`` sends.
    content: TypeContent | None = field(default=None, compare=False, repr=False)

    def fingerprint(self) -> dict[str, str]:
        return {name: resource.hash for name, resource in self.resources.items()}


@dataclass(frozen=True)
class Snapshot:
    """``version``: a digest of the type versions (one value per node config, for status)."""

    version: str
    types: Mapping[str, TypeSnapshot] = field(default_factory=dict)

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        entry = self.types.get(type_url)
        return entry.resources if entry else _EMPTY

    def type_version(self, type_url: str) -> str:
        entry = self.types.get(type_url)
        return entry.version if entry else ""

    def changed_at(self, type_url: str) -> float:
        entry = self.types.get(type_url)
        return entry.changed_at if entry else 0.0

    def changed_types(self, previous: Snapshot | None) -> tuple[str, ...]:
        """Types whose content differs from ``previous`` (all present types if there is none)."""
        return tuple(
            type_url
            for type_url in typeurls.ORDER
            if (previous is None and type_url in self.types)
            or (
                previous is not None
                and previous.types.get(type_url) is not self.types.get(type_url)
            )
        )


class InconsistentSnapshot(ValueError):
    """A snapshot names a resource it does not hold. Serving it would leave Envoy warming a
    listener for its ``initial_fetch_timeout`` and then going live without it (no cert: 503s),
    so it is refused where it is built; the node keeps its last good snapshot."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        shown = "; ".join(missing[:MAX_REPORTED])
        more = f" (and {len(missing) - MAX_REPORTED} more)" if len(missing) > MAX_REPORTED else ""
        super().__init__(f"inconsistent snapshot: {shown}{more}")


def inconsistencies(types_: Mapping[str, Mapping[str, Resource]]) -> list[str]:
    """References that do not resolve inside the snapshot, as go-control-plane's
    ``Snapshot.Consistent()`` checks them: every SDS secret any resource names, every RDS
    route configuration a listener names and every EDS load assignment a cluster names must be
    in the snapshot. Cluster names are not
    checked: listeners also route to clusters of the static bootstrap (ext_authz, OTLP), which
    no snapshot holds; the protocol already orders the snapshot's own clusters first."""
    secrets = types_.get(typeurls.SECRET, _EMPTY)
    routes = types_.get(typeurls.ROUTE, _EMPTY)
    endpoints = types_.get(typeurls.ENDPOINT, _EMPTY)
    missing: list[str] = []
    for type_url in typeurls.ORDER:
        for name, resource in types_.get(type_url, _EMPTY).items():
            kind = typeurls.short(type_url)
            missing.extend(
                f"{kind} {name!r} names secret {ref!r}, not in the snapshot"
                for ref in sorted(resource.secrets - secrets.keys())
            )
            missing.extend(
                f"{kind} {name!r} names route configuration {ref!r}, not in the snapshot"
                for ref in sorted(resource.routes - routes.keys())
            )
            missing.extend(
                f"{kind} {name!r} names load assignment {ref!r}, not in the snapshot"
                for ref in sorted(resource.endpoints - endpoints.keys())
            )
    return missing


def build_snapshot(
    previous: Snapshot | None,
    resources: Mapping[str, Iterable[Resource]],
    now: float,
    *,
    check: bool = True,
    contents: ContentCache | None = None,
) -> Snapshot:
    """The next snapshot of a node; types whose content is unchanged reuse the previous entry
    (same object, same version, same ``changed_at``). Types absent from ``resources`` are
    present and empty, so a node subscribing to them gets a versioned (empty) answer.
    ``contents``: where identical type contents are shared between nodes (the control plane's
    cache; without one each call builds its own).

    Raises InconsistentSnapshot when a reference does not resolve (see :func:`inconsistencies`).
    ``check=False`` is for tests of the protocol's own defences against such snapshots."""
    entries: dict[str, TypeSnapshot] = {}
    for type_url in typeurls.ORDER:
        listed = resources.get(type_url, ())
        content = (
            contents.get(type_url, listed)
            if contents is not None
            else TypeContent.build(type_url, _by_name(type_url, listed))
        )
        old = previous.types.get(type_url) if previous else None
        if old is not None and (
            old.content is content
            or (old.version == content.version and old.fingerprint() == _fingerprint(content))
        ):
            entries[type_url] = old
            continue
        entries[type_url] = TypeSnapshot(content.version, content.resources, now, content)
    if check and not _resolves(entries):
        missing = inconsistencies({t: e.resources for t, e in entries.items()})
        if missing:
            raise InconsistentSnapshot(missing)
    node_version = content_version({t: e.version for t, e in entries.items()})
    return Snapshot(version=node_version, types=MappingProxyType(entries))


def _fingerprint(content: TypeContent) -> dict[str, str]:
    return {name: resource.hash for name, resource in content.resources.items()}


def _resolves(entries: Mapping[str, TypeSnapshot]) -> bool:
    """Whether every reference resolves, from each content's precomputed reference sets (a few
    set differences per node); False: look closer (:func:`inconsistencies` says what)."""
    contents = [entry.content for entry in entries.values()]
    if any(content is None for content in contents):
        return False
    secrets, routes, endpoints = (
        content.names if (content := entries[t].content) is not None else frozenset()
        for t in (typeurls.SECRET, typeurls.ROUTE, typeurls.ENDPOINT)
    )
    return all(
        content is not None
        and content.secrets <= secrets
        and content.routes <= routes
        and content.endpoints <= endpoints
        for content in contents
    )
