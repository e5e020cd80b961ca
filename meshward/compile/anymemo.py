"""What a walk found inside one packed ``Any``, by its type URL and exact bytes.

The walks over compiled resources (the Envoy-limits regexes, meshward.compile.message_regexes;
the control plane's dependency scan, meshward.xds.resources) unpack every ``Any`` and walk
what is inside. Most of a workload's route is such ``Any`` values, RBAC engines that an edit
elsewhere leaves byte-identical: a mesh-wide DENY changes one engine per route and the others
come out as the same bytes (meshward.compile.fastparse reuses them). Keyed by the exact bytes,
an ``Any`` seen before is not unpacked nor walked again, and the answer cannot differ from a
walk (the walk is a function of the bytes and the type).

Bounded by the bytes of the keys it holds: when they exceed ``limit`` it starts over empty.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")

#: The most key bytes one memo holds before it starts over.
LIMIT = 32 * 1024 * 1024


class AnyMemo(Generic[T]):
    """(type URL, packed value) -> what a walk of that ``Any`` found."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.held = 0  # bytes of the keys held
        self.resets = 0
        self._found: dict[tuple[str, bytes], T] = {}

    def __len__(self) -> int:
        return len(self._found)

    def get(self, type_url: str, value: bytes) -> T | None:
        return self._found.get((type_url, value))

    def put(self, type_url: str, value: bytes, found: T) -> T:
        size = len(type_url) + len(value)
        if size > self.limit:
            return found  # larger than the whole memo: never held
        if self.held + size > self.limit:
            self._found.clear()
            self.held = 0
            self.resets += 1
        if (type_url, value) not in self._found:
            self.held += size
        self._found[(type_url, value)] = found
        return found
