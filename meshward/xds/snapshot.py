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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshward.xds import typeurls
from meshward.xds.resources import Resource

_EMPTY: Mapping[str, Resource] = MappingProxyType({})
MAX_REPORTED = 5  # missing references named in an InconsistentSnapshot message (bounded)
VERSION_LENGTH = 16  # hex characters of a content version


def content_version(fingerprint: Mapping[str, str]) -> str:
    """The version of a set of resources given as ``{name: content hash}`` (order-free)."""
    text = "\n".join(f"{name} {digest}" for name, digest in sorted(fingerprint.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:VERSION_LENGTH]


@dataclass(frozen=True)
class TypeSnapshot:
    version: str
    resources: Mapping[str, Resource]
    changed_at: float  # monotonic time the content last changed (drift is measured from here)

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
) -> Snapshot:
    """The next snapshot of a node; types whose content is unchanged reuse the previous entry
    (same object, same version, same ``changed_at``). Types absent from ``resources`` are
    present and empty, so a node subscribing to them gets a versioned (empty) answer.

    Raises InconsistentSnapshot when a reference does not resolve (see :func:`inconsistencies`).
    ``check=False`` is for tests of the protocol's own defences against such snapshots."""
    entries: dict[str, TypeSnapshot] = {}
    for type_url in typeurls.ORDER:
        by_name: dict[str, Resource] = {}
        for resource in resources.get(type_url, ()):
            if resource.type_url != type_url:
                raise ValueError(f"{resource.name}: {resource.type_url} listed under {type_url}")
            if resource.name in by_name:
                raise ValueError(f"two {typeurls.short(type_url)} resources named {resource.name!r}")
            by_name[resource.name] = resource
        old = previous.types.get(type_url) if previous else None
        fingerprint = {n: r.hash for n, r in by_name.items()}
        if old is not None and old.fingerprint() == fingerprint:
            entries[type_url] = old
            continue
        entries[type_url] = TypeSnapshot(
            content_version(fingerprint), MappingProxyType(dict(sorted(by_name.items()))), now
        )
    if check:
        missing = inconsistencies({t: e.resources for t, e in entries.items()})
        if missing:
            raise InconsistentSnapshot(missing)
    node_version = content_version({t: e.version for t, e in entries.items()})
    return Snapshot(version=node_version, types=MappingProxyType(entries))
