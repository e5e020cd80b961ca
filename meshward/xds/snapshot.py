"""What one node should have: resources per type URL, each type with its own version.

Version = ``<policy-set version, 12 hex>.<certificate generation>`` (``+<content digest>`` when
the content changed without either changing, e.g. at an expires-at instant), assigned per type and kept
*sticky*: a type whose content did not change keeps the version it had, so a policy change that
does not touch a node's listeners does not push listeners to it, and "desired" never moves away
from "ACKed" for a node that has nothing new to apply (no false drift).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshward.xds import types
from meshward.xds.resources import Resource

_EMPTY: Mapping[str, Resource] = MappingProxyType({})


def _digest(fingerprint: Mapping[str, str]) -> str:
    text = "\n".join(f"{name} {digest}" for name, digest in sorted(fingerprint.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def snapshot_version(policy_version: str, cert_generation: int) -> str:
    return f"{policy_version[:12]}.{cert_generation}"


@dataclass(frozen=True)
class TypeSnapshot:
    version: str
    resources: Mapping[str, Resource]
    changed_at: float  # monotonic time the content last changed (drift is measured from here)

    def fingerprint(self) -> dict[str, str]:
        return {name: resource.hash for name, resource in self.resources.items()}


@dataclass(frozen=True)
class Snapshot:
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
            for type_url in types.ORDER
            if (previous is None and type_url in self.types)
            or (
                previous is not None
                and previous.types.get(type_url) is not self.types.get(type_url)
            )
        )


def build_snapshot(
    previous: Snapshot | None,
    resources: Mapping[str, Iterable[Resource]],
    version: str,
    now: float,
) -> Snapshot:
    """The next snapshot of a node; types whose content is unchanged reuse the previous entry
    (same object, same version). Types absent from ``resources`` are present and empty, so
    a node subscribing to them gets a versioned (empty) answer."""
    entries: dict[str, TypeSnapshot] = {}
    for type_url in types.ORDER:
        by_name: dict[str, Resource] = {}
        for resource in resources.get(type_url, ()):
            if resource.type_url != type_url:
                raise ValueError(f"{resource.name}: {resource.type_url} listed under {type_url}")
            if resource.name in by_name:
                raise ValueError(f"two {types.short(type_url)} resources named {resource.name!r}")
            by_name[resource.name] = resource
        old = previous.types.get(type_url) if previous else None
        fingerprint = {n: r.hash for n, r in by_name.items()}
        if old is not None and old.fingerprint() == fingerprint:
            entries[type_url] = old
            continue
        type_version = version
        if old is not None and old.version.split("+", 1)[0] == version:
            # New content under the same policy version and certificate generation (an
            # expires-at instant passed, or the compiler's inputs changed): the version must
            # still change, and stays deterministic for the same content.
            type_version = f"{version}+{_digest(fingerprint)}"
        entries[type_url] = TypeSnapshot(
            type_version, MappingProxyType(dict(sorted(by_name.items()))), now
        )
    return Snapshot(version=version, types=MappingProxyType(entries))
