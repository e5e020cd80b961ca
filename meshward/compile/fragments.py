"""Shared outbound fragments: what a caller gets for a peer, built once per peer.

Every caller that may reach a peer port gets the same cluster, endpoints and route for it, and
an outbound listener that differs between callers only in the caller's own parts of the
connection manager (or TCP proxy): its tracing service name, and outside xDS mode its access
log (in xDS mode the log reads the caller from the node's metadata). So:

- per peer port (once, whoever calls it): the cluster, endpoints and route are compiled to
  protos, and the listener's peer fields (name, stat prefix, RDS name or inline route, TCP
  cluster) are serialized;
- per caller (once): its connection-manager and TCP-proxy fields are serialized;
- per (caller, peer port) pair: the listener is assembled from those serialized fields (a few
  byte joins and one parse), and the cluster, endpoints and route are the shared protos
  themselves, not copies. A namespace-wide ALLOW over N services thus costs O(N) compiles plus
  N^2 cheap joins, where it cost N^2 compiles; callers whose parts are the same bytes (xDS mode
  without tracing) share the assembled listener itself, so it is packed once per peer port.

The shared protos must be treated as read-only by every consumer (the control plane packs them
once and never mutates them). Assembly relies on the deterministic encoding writing fields in
field-number order, which is what protobuf's deterministic serialization does; the tests
compare the assembled listener with the one compiled from scratch.

A :class:`FragmentCache` is an explicit value (no module global): compile_mesh makes one per
call; the incremental compiler (meshward.compile.incremental) keeps one across policy edits,
since fragments depend only on the peer, its mTLS mode, the trust domain and the options.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from meshward.compile import listeners
from meshward.compile import protos as _protos
from meshward.compile.options import CompileOptions, Endpoint
from meshward.policy.model import MtlsMode, Workload, WorkloadPort

# The fields of the outbound connection manager / TCP proxy that name the peer; every other
# field is the caller's (access log, tracing) or the same for everyone.
_PEER_FIELDS = frozenset({"stat_prefix", "rds", "route_config", "cluster"})
Fields = tuple[tuple[int, bytes], ...]
#: (peer, its port, the peer's mTLS mode on it, trust domain): what a peer fragment is built from
PeerKey = tuple[Workload, WorkloadPort, MtlsMode, str]
#: Shared listeners kept at most (when every caller's part differs, as with tracing on, there is
#: one per caller and peer port; past this they are assembled on every compile instead).
MAX_SHARED_LISTENERS = 1 << 18


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_SMALL = tuple(bytes((i,)) for i in range(0x80))


def _delimited(number: int, payload: bytes) -> bytes:
    """One length-delimited field (string, bytes, message) in the wire format."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def split_fields(message: Any, keep: frozenset[str] | None = None) -> Fields:
    """``(field number, encoding)`` of each set field of ``message`` (only ``keep`` if given),
    in field-number order: joined, they are the message's deterministic encoding."""
    out: list[tuple[int, bytes]] = []
    for descriptor, _ in message.ListFields():
        if keep is not None and descriptor.name not in keep:
            continue
        single = type(message)()
        single.CopyFrom(message)
        for other, _ in single.ListFields():
            if other.name != descriptor.name:
                single.ClearField(other.name)
        out.append((descriptor.number, single.SerializeToString(deterministic=True)))
    return tuple(sorted(out))


def _join(*parts: Fields) -> bytes:
    return b"".join(data for _, data in sorted(item for part in parts for item in part))


@dataclass(frozen=True)
class PeerFragment:
    """One peer port as every caller sees it (the protos are shared: read-only)."""

    cluster: Any  # envoy.config.cluster.v3.Cluster
    endpoints: tuple[Any, ...]  # ClusterLoadAssignment (xDS mode)
    route: Any | None  # RouteConfiguration (HTTP ports, xDS mode)
    http: bool
    tls: bool  # the cluster speaks mTLS (references the caller's SDS secrets)
    head: bytes  # the Listener's fields before its address (its name)
    tail: bytes  # the Listener's fields after its filter chains (traffic direction)
    filter_name: bytes  # Filter.name, encoded
    type_url: bytes  # the inner config's Any.type_url, encoded
    inner: Fields  # the connection manager's / TCP proxy's peer fields
    inner_joined: bytes
    low: int  # the lowest and highest field numbers in ``inner``
    high: int


@dataclass(frozen=True)
class CallerPart:
    """A caller's own fields of its outbound connection managers (or TCP proxies), split
    around the peer's fields when every one sorts before or after them."""

    fields: Fields
    before: bytes  # fields numbered below ``split``
    after: bytes
    split: int  # peer fields must number in (below_max, split]
    below_max: int


def _caller_part(fields: Fields, fragment: PeerFragment) -> CallerPart:
    below = tuple(f for f in fields if f[0] < fragment.low)
    above = tuple(f for f in fields if f[0] >= fragment.low)
    return CallerPart(
        fields=fields,
        before=_join(below),
        after=_join(above),
        split=above[0][0] if above else 1 << 30,
        below_max=below[-1][0] if below else 0,
    )


@dataclass
class FragmentCache:
    """Peer fragments and callers' parts for one set of options; bounded by the registry (the
    incremental compiler drops entries of workloads that left it)."""

    options: CompileOptions
    peers: dict[PeerKey, PeerFragment] = field(default_factory=dict)
    callers: dict[tuple[str, bool], CallerPart] = field(default_factory=dict)
    addresses: dict[Endpoint, bytes] = field(default_factory=dict)
    # Assembled listeners by (peer port, the caller's part, bind): callers whose parts are the
    # same bytes (xDS mode without tracing: the access logs name the caller through the node's
    # metadata) share one listener proto, so it is packed once, not once per caller.
    shared: dict[tuple[PeerKey, Fields, Endpoint], Any] = field(default_factory=dict)
    # One tuple object per distinct caller part: callers with the same part bytes share it,
    # so its identity keys per-peer results (meshward.compile.workload.PeerPort).
    interned: dict[Fields, Fields] = field(default_factory=dict)

    def part_id(self, caller: str, http: bool) -> int:
        """The identity of ``caller``'s part (after its first :meth:`outbound`): equal for
        callers whose parts are the same bytes, stable while the cache holds the part."""
        return id(self.callers[(caller, http)].fields)

    def outbound(
        self,
        workload: Workload,
        peer: Workload,
        port: WorkloadPort,
        *,
        bind: Endpoint,
        peer_mode: MtlsMode,
        trust_domain: str,
    ) -> tuple[Any, PeerFragment]:
        """(``workload``'s outbound listener for ``peer``'s ``port``, the shared fragment)."""
        key: PeerKey = (peer, port, peer_mode, trust_domain)
        fragment = self.peers.get(key)
        http = listeners.is_http(port)
        caller_key = (workload.ref, http)
        caller = self.callers.get(caller_key)
        if fragment is None or caller is None:
            built = listeners.outbound(
                workload,
                peer,
                port,
                bind=bind,
                peer_mode=peer_mode,
                options=self.options,
                trust_domain=trust_domain,
            )
            message = _protos.listener(built.listener)
            inner = _protos.unpack(message.filter_chains[0].filters[0].typed_config)
            if fragment is None:
                fragment = self._fragment(built, message, inner, http)
                self.peers[key] = fragment
            if caller is None:
                fields = tuple(
                    item
                    for item in split_fields(inner)
                    if inner.DESCRIPTOR.fields_by_number[item[0]].name not in _PEER_FIELDS
                )
                caller = _caller_part(self.interned.setdefault(fields, fields), fragment)
                self.callers[caller_key] = caller
        shared_key = (key, caller.fields, bind)
        listener = self.shared.get(shared_key)
        if listener is None:
            listener = self._listener(fragment, caller, bind)
            if len(self.shared) < MAX_SHARED_LISTENERS:
                self.shared[shared_key] = listener
        return listener, fragment

    def _fragment(
        self, built: listeners.Built, message: Any, inner: Any, http: bool
    ) -> PeerFragment:
        typed = message.filter_chains[0].filters[0]
        own = split_fields(message, frozenset({"name", "traffic_direction"}))
        peer_fields = split_fields(inner, _PEER_FIELDS)
        return PeerFragment(
            cluster=_protos.cluster(built.clusters[0]),
            endpoints=tuple(_protos.endpoint(e) for e in built.endpoints),
            route=_protos.route(built.route) if built.route is not None else None,
            http=http,
            tls="transport_socket" in built.clusters[0],
            head=_join(tuple(f for f in own if f[0] < _ADDRESS)),
            tail=_join(tuple(f for f in own if f[0] > _FILTER_CHAINS)),
            filter_name=_delimited(1, typed.name.encode()),
            type_url=_delimited(1, typed.typed_config.type_url.encode()),
            inner=peer_fields,
            inner_joined=_join(peer_fields),
            low=peer_fields[0][0] if peer_fields else 1 << 30,
            high=peer_fields[-1][0] if peer_fields else 0,
        )

    def _address(self, bind: Endpoint) -> bytes:
        encoded = self.addresses.get(bind)
        if encoded is None:
            message = _protos.listener({"address": listeners.socket_address(bind)})
            encoded = split_fields(message)[0][1]
            if len(self.addresses) < 65536:
                self.addresses[bind] = encoded
        return encoded

    def _listener(self, fragment: PeerFragment, caller: CallerPart, bind: Endpoint) -> Any:
        if caller.below_max < fragment.low and fragment.high < caller.split:
            inner = caller.before + fragment.inner_joined + caller.after
        else:  # the peer's fields interleave with the caller's: merge by number
            inner = _join(fragment.inner, caller.fields)
        filter_ = fragment.filter_name + _delimited(4, fragment.type_url + _delimited(2, inner))
        data = (
            fragment.head
            + self._address(bind)
            + _delimited(_FILTER_CHAINS, _delimited(_FILTERS, filter_))
            + fragment.tail
        )
        return _LISTENER.FromString(data)

    def retain(self, live: Callable[[PeerKey], bool], callers: Collection[str]) -> None:
        """Keep only the fragments of ``live`` peer ports and the parts of ``callers`` (the
        incremental compiler passes the current registry: the cache stays bounded by it)."""
        self.peers = {k: v for k, v in self.peers.items() if live(k)}
        self.callers = {k: v for k, v in self.callers.items() if k[0] in callers}
        parts = {part.fields for part in self.callers.values()}
        self.interned = {f: f for f in self.interned if f in parts}
        self.shared = {k: v for k, v in self.shared.items() if k[0] in self.peers and k[1] in parts}


_LISTENER = type(_protos.listener({}))
_ADDRESS = _LISTENER.DESCRIPTOR.fields_by_name["address"].number
_FILTER_CHAINS = _LISTENER.DESCRIPTOR.fields_by_name["filter_chains"].number
_FILTERS = (
    _LISTENER.DESCRIPTOR.fields_by_name["filter_chains"]
    .message_type.fields_by_name["filters"]
    .number
)
