"""Per-identity limits on ADS nodes, and the garbage collection of nodes that went away.

Any workload credential can open ADS streams, and a node id's instance part is free text: without
limits one certificate could create unlimited nodes (each with a signed SVID, a snapshot and a
row in ``/status``), unlimited streams, and unlimited CA work. So, per certificate identity
(a SPIFFE ID):

- ``max_instances``: node ids known at once (connected, or disconnected and not yet collected).
  A new instance beyond it takes the place of the identity's longest-disconnected node (a
  restarted replica with a new pod name must not wait for garbage collection); when every
  instance is connected, it is refused.
- ``max_streams``: concurrent ADS streams (one per Envoy normally; a reconnect may overlap).
- ``svid_rate`` / ``svid_burst``: SVIDs signed for new or reconnecting nodes (a token bucket;
  renewals the control plane schedules itself do not count). A refused node retries, as Envoy
  does with backoff.
- ``node_gc_after``: a node with no stream for this long is forgotten (status, snapshot, SVID).

Per ADS stream and resource type (SotW: the names of a request, repeated whole in every ACK;
delta: subscriptions accumulated request after request, and the names reported held on
reconnect): at most :data:`MAX_SUBSCRIBED_NAMES` names, each at most
:data:`MAX_NAME_LENGTH` characters (SPIFFE's own limit on an ID, so every real name fits). The
names past them are not tracked, not answered, and reported once (see :func:`admit_names`).

Refusals answer RESOURCE_EXHAUSTED, count in ``meshward_xds_rejected_streams{reason}`` and are
logged once per identity and reason per :data:`REFUSAL_LOG_INTERVAL`, with the number suppressed,
so a flood cannot flood the log. Everything here is pure (``now`` is an argument) and bounded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

#: Refusal reasons that mean "a limit was hit" (RESOURCE_EXHAUSTED, not PERMISSION_DENIED).
INSTANCE_LIMIT = "instance-limit"
STREAM_LIMIT = "stream-limit"
SVID_RATE_LIMIT = "svid-rate-limit"
LIMIT_REASONS = frozenset({INSTANCE_LIMIT, STREAM_LIMIT, SVID_RATE_LIMIT})
#: Names past a stream's subscription limits: logged (rate-limited), the stream goes on.
SUBSCRIPTION_LIMIT = "subscription-limit"

MAX_SUBSCRIBED_NAMES = 16_384  # per stream and type: ~16x the clusters of a 1,000-service mesh
MAX_NAME_LENGTH = 2_048  # characters of one resource name
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines for one (identity, reason)
MAX_TRACKED = 4096  # identities with a token bucket / refusal-log entry, at most


@dataclass(frozen=True)
class NodeLimits:
    """The limits (see the module docstring); ``meshward xds serve`` flags set them."""

    max_instances: int = 100
    max_streams: int = 200
    svid_rate: float = 1.0  # per second, per identity
    svid_burst: int = 20
    node_gc_after: float = 600.0  # seconds
    stream_queue: int = 64  # requests read ahead per stream before the reader waits
    write_timeout: float = 60.0  # a push a node does not read for this long closes its stream

    def __post_init__(self) -> None:
        for name in ("max_instances", "max_streams", "svid_burst", "stream_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("svid_rate", "node_gc_after", "write_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; pure (the caller passes ``now``)."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity, self.rate = capacity, rate
        self.tokens, self.updated = float(capacity), now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class SvidRateLimiter:
    """One token bucket per identity. Bounded: a full bucket is the same as no bucket, so full
    ones are dropped first; past :data:`MAX_TRACKED` the least recently used goes."""

    def __init__(self, limits: NodeLimits, *, max_tracked: int = MAX_TRACKED) -> None:
        self.limits = limits
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, identity: str, now: float) -> bool:
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= self.max_tracked:
                self._prune(now)
            bucket = TokenBucket(self.limits.svid_burst, self.limits.svid_rate, now)
            self._buckets[identity] = bucket
        self._buckets.move_to_end(identity)
        return bucket.take(now)

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_tracked:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class RefusalLog:
    """Log a refusal the first time per (identity, reason), then at most once per ``interval``
    with the count suppressed in between. Bounded to ``max_tracked`` keys (oldest dropped)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = REFUSAL_LOG_INTERVAL,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.logger, self.interval, self.max_tracked = logger, interval, max_tracked
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # [at, suppressed]

    def refused(self, who: str | None, reason: str, message: str, now: float, **extra: Any) -> bool:
        """Log (or count silently) a refusal of ``who`` (an identity); True when logged."""
        key = (who or "-", reason)
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        suppressed = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_tracked:
            self._seen.popitem(last=False)
        more = f" ({suppressed} more like it since the last report)" if suppressed else ""
        self.logger.warning(
            "%s%s", message, more, extra={**extra, "reason": reason, "suppressed": suppressed}
        )
        return True


class _Node(Protocol):
    identity: str
    connected: bool
    disconnected_at: float | None


_N = TypeVar("_N", bound=_Node)


class IdentityIndex:
    """Node keys by identity, so the instance limit reads one identity's nodes: a scan of
    every node per connecting node made a fleet's cold start O(N^2)."""

    def __init__(self) -> None:
        self._keys: dict[str, set[str]] = {}
        self._identity: dict[str, str] = {}

    def add(self, identity: str, key: str) -> None:
        self.discard(key)
        self._keys.setdefault(identity, set()).add(key)
        self._identity[key] = identity

    def discard(self, key: str) -> None:
        identity = self._identity.pop(key, None)
        keys = self._keys.get(identity) if identity is not None else None
        if keys is not None and identity is not None:
            keys.discard(key)
            if not keys:
                del self._keys[identity]

    def nodes(self, nodes: Mapping[str, _N], identity: str) -> dict[str, _N]:
        """``identity``'s entries of ``nodes``."""
        return {key: nodes[key] for key in self._keys.get(identity, ()) if key in nodes}

    def make_room(
        self, nodes: Mapping[str, _N], identity: str, limit: int
    ) -> tuple[str | None, bool]:
        """:func:`make_room` over ``identity``'s nodes only."""
        return make_room(self.nodes(nodes, identity), identity, limit)

    def __len__(self) -> int:
        return len(self._identity)


def make_room(nodes: Mapping[str, _Node], identity: str, limit: int) -> tuple[str | None, bool]:
    """Room for one more instance of ``identity``: (node key to forget first or None, ok).
    Not ok when ``limit`` instances are known and every one of them is connected."""
    mine = [(key, node) for key, node in nodes.items() if node.identity == identity]
    if len(mine) < limit:
        return None, True
    idle = [(node.disconnected_at or 0.0, key) for key, node in mine if not node.connected]
    if not idle:
        return None, False
    return min(idle)[1], True


def expired(nodes: Mapping[str, _Node], now: float, after: float) -> Iterator[str]:
    """Keys of nodes disconnected for at least ``after`` seconds."""
    for key, node in nodes.items():
        since = node.disconnected_at
        if not node.connected and since is not None and now - since >= after:
            yield key


def next_expiry(nodes: Iterable[_Node], now: float, after: float) -> float | None:
    """Seconds until the next disconnected node is due for collection (None: none waits)."""
    due = [
        node.disconnected_at + after - now
        for node in nodes
        if not node.connected and node.disconnected_at is not None
    ]
    return max(0.0, min(due)) if due else None


def admit_names(
    names: Iterable[str], tracked: Collection[str], limit: int = MAX_SUBSCRIBED_NAMES
) -> tuple[list[str], int]:
    """The new names of ``names`` a stream may add to the ``tracked`` ones (in order, without
    duplicates or the wildcard ``*``), and how many it may not: past ``limit`` names in all, or longer than
    :data:`MAX_NAME_LENGTH`. A client naming 100,000 bogus resources must cost the server
    neither unbounded state nor an unbounded answer (each tracked name that does not exist is
    answered, by name)."""
    admitted: list[str] = []
    seen: set[str] = set()
    refused = 0
    room = limit - len(tracked)
    for name in names:
        if name in tracked or name in seen or name == "*":
            continue
        if len(name) > MAX_NAME_LENGTH or len(admitted) >= room:
            refused += 1
            continue
        seen.add(name)
        admitted.append(name)
    return admitted, refused
