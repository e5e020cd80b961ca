"""The xDS conversation with one stream, sans-IO: requests in, pushes and events out.

One object per ADS stream (:class:`SotwProtocol` or :class:`DeltaProtocol`). The gRPC layer feeds
it every request (:meth:`receive`) and, whenever the node's snapshot may have changed,
asks what to send (:meth:`plan`). No sockets, no clocks of its own (``now`` is passed in), so
every rule below is unit-tested without a server:

- ACK/NACK per resource. An ACK applies the response; a NACK names the resources Envoy
  rejected (``Error adding/updating listener(s) <name>: ...``) and Envoy applied the rest: those
  are recorded as applied, the rejected ones as rejected-at-that-hash. A NACK naming none of
  them rejected the whole response. A rejected resource is never sent again with the same
  content; in SotW its last applied version is sent in its place, so the node keeps serving
  what it last accepted.
- Ordering. Pushes follow :data:`meshward.xds.typeurls.ORDER` (clusters, endpoints, secrets,
  listeners, routes); a cluster that is going away stays until no listener or route that Envoy
  has (or is being sent) routes to it. A resource that names a secret the node's snapshot does not hold is held
  back (never offered), and a listener naming a cluster of the snapshot that this stream has not
  been sent yet is held until it has. A held resource that Envoy already has stays at its
  previous version; the response's version then carries ``+partial`` and drift shows it.
- Secrets. A node's snapshot only holds its own secrets; requesting any other name gets nothing
  and a :class:`SecretDenied` event (logged once per name by the caller, as an audit line).
- SotW answers again whenever the requested names of a type change, even with no new version.
- Resync without churn. Versions are content digests (:mod:`meshward.xds.snapshot`), the same
  on every replica and after a restart. A SotW stream's first request for a type that reports
  (``version_info``) the very version the node should have, for names the snapshot holds, is
  not answered: the node is recorded as holding that version. A delta stream's first request
  lists what Envoy holds (``initial_resource_versions``: per-resource content hashes); only
  what differs is sent, and nothing at all when nothing differs.
- Delta "in sync". A delta response carries only changes, so its ``system_version_info`` is not
  the whole story: whenever nothing is left to send, nothing is in flight and nothing is held
  back, every subscribed resource Envoy holds is the desired one, and the type counts as ACKed
  at the desired version (e.g. after a NACKed change is reverted, or when only resources the
  node does not subscribe to changed).
- Delta "does not exist". A subscribed name the snapshot lacks is answered once in
  ``removed_resources`` (xDS "Knowing When a Requested Resource Does Not Exist"), so Envoy does
  not wait out its ``initial_fetch_timeout`` (15 s) for it; if it appears later it is sent.
  Names past :mod:`meshward.xds.limits`'s subscription limits are neither tracked nor answered.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import is_
from types import MappingProxyType

from meshward.xds import typeurls
from meshward.xds.limits import MAX_NAME_LENGTH, MAX_SUBSCRIBED_NAMES, admit_names
from meshward.xds.messages import Acked as Acked
from meshward.xds.messages import DeltaRequest as DeltaRequest
from meshward.xds.messages import Event as Event
from meshward.xds.messages import Ignored as Ignored
from meshward.xds.messages import Nack as Nack
from meshward.xds.messages import Nacked as Nacked
from meshward.xds.messages import Push as Push
from meshward.xds.messages import Request as Request
from meshward.xds.messages import SecretDenied as SecretDenied
from meshward.xds.redact import redact_error
from meshward.xds.resources import Resource, rejected_names
from meshward.xds.snapshot import Snapshot, TypeContent, TypeSnapshot

PARTIAL = "+partial"
MAX_OUTSTANDING = 16  # unanswered responses remembered per type
MAX_ABSENT_PER_PUSH = 1_024  # delta: names reported not to exist in one response


_NOTHING: Mapping[str, Resource] = MappingProxyType({})
#: (the snapshot's secrets, its clusters, the clusters sent to the stream): a dependency check's
#: inputs (see ``_Protocol._deps``)
_Deps = tuple[Mapping[str, Resource], Mapping[str, Resource], Mapping[str, Resource]]


# -- state ----------------------------------------------------------------------------------------
@dataclass
class Sent:
    nonce: str
    seq: int
    version: str
    resources: dict[str, Resource]
    removed: tuple[str, ...]
    at: float
    origin: float  # when the content it carries was asked for or changed (push latency)


@dataclass
class TypeState:
    type_url: str
    requested: bool = False
    requested_at: float = 0.0
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    # SotW: the last request's names, as sent (None: past the limits, not kept)
    requested_names: tuple[str, ...] | None = ()
    must_respond: bool = False
    latest_nonce: str = ""
    outstanding: dict[str, Sent] = field(default_factory=dict)
    sent: dict[str, Resource] = field(default_factory=dict)  # what Envoy has or is receiving
    sent_version: str = ""
    applied: dict[str, Resource] = field(default_factory=dict)  # what Envoy confirmed
    acked_version: str = ""
    acked_at: float = 0.0
    rejected: dict[str, str] = field(default_factory=dict)  # name -> content hash rejected
    verdicts: int = 0  # changes of ``rejected`` (a SotW plan input)
    last_nack: Nack | None = None
    nacks: int = 0
    pushes: int = 0
    plan_key: tuple[str, frozenset[str], frozenset[str]] | None = None  # SotW: last push inputs
    # SotW: the snapshot entries (and CDS state) the last plan read, when it held nothing back
    # and retained nothing: the same inputs again give the same key, so planning is skipped.
    plan_inputs: tuple[object, ...] | None = None
    denied: set[str] = field(default_factory=set)  # secret names already reported
    absent: set[str] = field(default_factory=set)  # delta: subscribed, told they do not exist
    limited: bool = False  # a subscription limit was reported (once per type and stream)
    # Delta: bumped by every request and push of this type (anything that changes what its
    # plan reads of this state), and the inputs of its last plan that sent nothing.
    epoch: int = 0
    quiet_inputs: tuple[object, ...] | None = None
    holding_removal: bool = False  # delta CDS: a removal waits for LDS/RDS to stop naming it
    # The stream's first request says what Envoy already holds (SotW: this version; delta: its
    # initial_resource_versions): if that is what it should hold, the first answer is skipped.
    resync: bool = False
    resync_version: str = ""  # SotW


class _Protocol:
    def __init__(self, *, nonce_prefix: str = "", max_names: int = MAX_SUBSCRIBED_NAMES) -> None:
        self.max_names = max_names  # per type: names subscribed (and, delta, held on reconnect)
        self.states: dict[str, TypeState] = {}
        self._seq = itertools.count(1)
        self._nonce_prefix = nonce_prefix
        self._ordered: tuple[str, ...] = ()  # the states' types in push order (see ``plan``)
        # Bumped when a plan changes what status reads of a type (its ACKed version and time:
        # a resync, a delta type found in sync). A plan that leaves it, and returns no event,
        # changed nothing the fleet counts read, so the server skips their recomputation.
        self.status_marks = 0

    def state(self, type_url: str) -> TypeState:
        st = self.states.get(type_url)
        if st is None:
            st = self.states[type_url] = TypeState(type_url)
            self._ordered = (
                *(t for t in typeurls.ORDER if t in self.states),
                *sorted(t for t in self.states if t not in typeurls.ORDER),
            )
        return st

    def _limit(self, st: TypeState, refused: int, what: str, events: list[Event]) -> None:
        """Report names past the subscription limits once per type and stream (a flood of
        requests must not become a flood of events)."""
        if refused and not st.limited:
            st.limited = True
            reason = (
                f"{refused} name(s) {what} past the limits (at most {self.max_names} per type, "
                f"each at most {MAX_NAME_LENGTH} characters): not tracked, not answered"
            )
            events.append(Ignored(st.type_url, reason, limit=True))

    def _new_nonce(self) -> tuple[str, int]:
        seq = next(self._seq)
        return f"{self._nonce_prefix}{seq}", seq

    def _take_sent(self, st: TypeState, nonce: str) -> Sent | None:
        sent = st.outstanding.pop(nonce, None)
        if sent is not None:
            # Envoy answers responses in order: anything older was processed before this one.
            for older in [n for n, s in st.outstanding.items() if s.seq < sent.seq]:
                del st.outstanding[older]
        return sent

    def _deps(self, snapshot: Snapshot) -> _Deps:
        """What the dependency check reads (:meth:`_deps_met`), looked up once per type's plan,
        not once per resource (a plan checks every resource it sends)."""
        cds = self.states.get(typeurls.CLUSTER)
        return (
            snapshot.resources(typeurls.SECRET),
            snapshot.resources(typeurls.CLUSTER),
            cds.sent if cds is not None else _NOTHING,
        )

    @staticmethod
    def _deps_met(resource: Resource, deps: _Deps) -> bool:
        """Whether ``resource`` may be sent: every secret it names is in the snapshot, and every
        cluster of the snapshot it names (not CDS's own) was sent to this stream."""
        if resource.secrets:
            secrets = deps[0]
            if any(name not in secrets for name in resource.secrets):
                return False
        if resource.clusters and resource.type_url != typeurls.CLUSTER:
            desired, sent = deps[1], deps[2]
            for name in resource.clusters:
                if name in desired and name not in sent:
                    return False
        return True

    def _referenced_clusters(self) -> set[str]:
        """Clusters named by listeners and routes Envoy has or is being sent: a cluster leaves
        only after nothing that routes to it remains (make before break, in reverse)."""
        names: set[str] = set()
        for type_url in (typeurls.LISTENER, typeurls.ROUTE):
            st = self.states.get(type_url)
            if st is None:
                continue
            for resource in (*st.sent.values(), *st.applied.values()):
                names |= resource.clusters
        return names

    def _deny_secrets(self, st: TypeState, snapshot: Snapshot) -> list[Event]:
        if st.type_url != typeurls.SECRET:
            return []
        own = snapshot.resources(typeurls.SECRET)
        new = sorted(name for name in st.names if name not in own and name not in st.denied)
        st.denied.update(new)
        return [SecretDenied(tuple(new))] if new else []

    def _ack(self, st: TypeState, sent: Sent, now: float, *, sotw: bool) -> Event:
        before, had = st.applied, len(st.rejected)
        if sotw:
            st.applied = dict(sent.resources)
        else:
            st.applied.update(sent.resources)
            for name in sent.removed:
                st.applied.pop(name, None)
        # A partial SotW response carries a rejected resource at its last applied version: its
        # ACK confirms the old content, not a fix, so the rejection (and NOT ENFORCED) stays.
        if st.rejected:  # (nothing to clear on every ACK of a node that never NACKed)
            carried = sotw and sent.version.endswith(PARTIAL)
            for name, resource in sent.resources.items():
                bad = st.rejected.get(name)
                if bad is None or bad == resource.hash:
                    continue
                old = before.get(name)
                if carried and old is not None and old.hash == resource.hash:
                    continue
                st.rejected.pop(name, None)
            # A rejected resource that is gone (SotW: not in the ACKed set; delta: removed) no
            # longer holds the node back: a later unrelated edit is enforced once ACKed.
            gone = [n for n in st.rejected if n not in sent.resources] if sotw else sent.removed
            for name in gone:
                st.rejected.pop(name, None)
        if len(st.rejected) != had:  # (an ACK only ever clears rejections)
            st.verdicts += 1
        st.acked_version = sent.version
        st.acked_at = now
        return Acked(st.type_url, sent.version, sent.nonce, max(0.0, now - sent.origin))

    def _nack(self, st: TypeState, sent: Sent, error: str, now: float, *, sotw: bool) -> Event:
        named = rejected_names(error, sent.resources)
        whole = not named
        if whole:
            # Nothing was applied: the rejected content is everything that would have changed.
            rejected = {n for n, r in sent.resources.items() if _hash(st.applied.get(n)) != r.hash}
            if not sotw:
                for name in sent.removed:  # the removals did not happen either
                    if name in st.applied:
                        st.sent[name] = st.applied[name]
                    st.absent.discard(name)  # (said again if still subscribed and absent)
        else:
            rejected = set(named)
            if sotw:
                for name in [n for n in st.applied if n not in sent.resources]:
                    del st.applied[name]
            else:
                for name in sent.removed:
                    st.applied.pop(name, None)
            for name, resource in sent.resources.items():
                if name not in rejected:
                    st.applied[name] = resource
        for name in rejected:
            st.rejected[name] = sent.resources[name].hash
            if not sotw:  # delta: Envoy still has the applied version
                previous = st.applied.get(name)
                if previous is None:
                    st.sent.pop(name, None)
                else:
                    st.sent[name] = previous
        nack = Nack(
            type_url=st.type_url,
            version=sent.version,
            nonce=sent.nonce,
            resources=tuple(sorted(rejected)),
            error=redact_error(st.type_url, error, sent.resources),
            at=now,
            whole_response=whole,
        )
        st.last_nack = nack
        st.nacks += 1
        st.verdicts += 1
        return Nacked(nack)

    def _record_push(
        self,
        st: TypeState,
        snapshot: Snapshot,
        version: str,
        content: dict[str, Resource],
        removed: tuple[str, ...],
        now: float,
        whole: TypeContent | None = None,
    ) -> Push:
        nonce, seq = self._new_nonce()
        origin = max(snapshot.changed_at(st.type_url), st.requested_at)
        st.outstanding[nonce] = Sent(nonce, seq, version, content, removed, now, origin)
        while len(st.outstanding) > MAX_OUTSTANDING:  # a client that never answers
            del st.outstanding[next(iter(st.outstanding))]
        st.latest_nonce = nonce
        st.epoch += 1
        st.sent_version = version
        st.must_respond = False
        st.pushes += 1
        return Push(st.type_url, version, nonce, tuple(content.values()), removed, whole)

    def plan(self, snapshot: Snapshot, now: float) -> tuple[list[Push], list[Event]]:
        """What to send now for ``snapshot``, in push order; also secret-denial events."""
        pushes: list[Push] = []
        events: list[Event] = []
        for type_url in self._ordered:  # kept by ``state`` (a plan runs after every request)
            st = self.states[type_url]
            if not st.requested:
                continue
            if type_url == typeurls.SECRET:
                events.extend(self._deny_secrets(st, snapshot))
            push = self._plan_type(st, snapshot, now)
            if push is not None:
                pushes.append(push)
        return pushes, events

    def _plan_type(self, st: TypeState, snapshot: Snapshot, now: float) -> Push | None:
        raise NotImplementedError


def _hash(resource: Resource | None) -> str | None:
    return resource.hash if resource is not None else None


def _whole(
    entry: TypeSnapshot | None, content: dict[str, Resource], partial: bool
) -> TypeContent | None:
    """The entry's shared content if ``content`` is all of it (same names, same objects, same
    order): a plan takes each desired resource as it is unless partial, and both are in name
    order, so equal sizes mean equal contents."""
    if entry is None or entry.content is None or partial:
        return None
    if len(content) != len(entry.resources):
        return None
    return entry.content


class SotwProtocol(_Protocol):
    """State-of-the-world ADS: every response carries the full set for its type."""

    def receive(self, request: Request, now: float) -> list[Event]:
        st = self.state(request.type_url)
        events: list[Event] = []
        if (
            request.response_nonce
            and request.response_nonce == st.latest_nonce
            and (request.response_nonce not in st.outstanding)
        ):
            pass  # already ACKed: Envoy changes its subscription (e.g. new SDS names)
        elif request.response_nonce:
            sent = self._take_sent(st, request.response_nonce)
            if sent is None:
                if st.requested:
                    events.append(Ignored(st.type_url, "unknown nonce"))
                    return events
                self._first_request(st, request)  # a nonce from an earlier stream
            else:
                if request.error_detail is not None:
                    events.append(self._nack(st, sent, request.error_detail, now, sotw=True))
                else:
                    events.append(self._ack(st, sent, now, sotw=True))
                if request.response_nonce != st.latest_nonce:
                    return events  # a newer response is in flight; its ACK will follow
        elif not st.requested:
            self._first_request(st, request)
        else:
            st.must_respond = True
        names = tuple(request.resource_names)
        wildcard = st.type_url in typeurls.WILDCARD_TYPES and (not names or "*" in names)
        if st.requested and names == st.requested_names:
            explicit = st.names  # the same subscription as last time (every ACK): no new set
        else:
            # Bounded as delta's subscriptions are: a request naming 1,000,000 resources must
            # not become a set sorted on every plan (nor be kept whole for the comparison).
            admitted, refused = admit_names(names, (), self.max_names)
            explicit = set(admitted)
            st.requested_names = names if not refused else None
            self._limit(st, refused, "subscribed", events)
        if not st.requested or wildcard != st.wildcard or explicit != st.names:
            st.must_respond = True
        if not st.requested:
            st.requested_at = now
        st.requested = True
        st.wildcard, st.names = wildcard, explicit
        st.denied &= explicit
        return events

    @staticmethod
    def _first_request(st: TypeState, request: Request) -> None:
        st.must_respond = True
        if request.version_info:
            # What Envoy kept from a previous stream (or another control plane replica).
            if not st.acked_version:
                st.acked_version = request.version_info
            st.resync = True
            st.resync_version = request.version_info

    def _inputs(self, st: TypeState, snapshot: Snapshot) -> tuple[object, ...]:
        """What a SotW plan of ``st`` reads besides its names: its entry, the entries its
        dependency checks read (secrets, clusters), the clusters this stream was sent (a new
        dict on every CDS push) and its rejections. Entries are shared objects, replaced
        whenever they change."""
        cds = self.states.get(typeurls.CLUSTER)
        return (
            snapshot.types.get(st.type_url),
            snapshot.types.get(typeurls.SECRET),
            snapshot.types.get(typeurls.CLUSTER),
            cds.sent if cds is not None else None,
            st.verdicts,
        )

    def _plan_type(self, st: TypeState, snapshot: Snapshot, now: float) -> Push | None:
        inputs = self._inputs(st, snapshot)
        last = st.plan_inputs
        if (
            not st.must_respond
            and not st.resync
            and last is not None
            and inputs[-1] == last[-1]
            and all(map(is_, inputs[:-1], last[:-1]))  # (same length: same ``_inputs``)
        ):
            # Same entries, same CDS state: the key below would be the last one (nothing was
            # held, retained or rejected, and only these inputs can change that), so no push.
            return None
        st.plan_inputs = None
        desired = snapshot.resources(st.type_url)
        base = snapshot.type_version(st.type_url)
        names = sorted(desired) if st.wildcard else sorted(st.names)
        if st.resync:
            st.resync = False
            if st.resync_version == base and all(name in desired for name in names):
                # A reconnecting node that holds exactly this version (a content digest, and
                # never a partial one): answering would only make it re-apply what it has.
                # Nothing is held back either: it has every cluster its listeners name.
                st.sent = {name: desired[name] for name in names}
                st.applied = dict(st.sent)
                st.acked_version = st.sent_version = base
                self.status_marks += 1
                st.acked_at = now
                st.plan_key = (base, frozenset(), frozenset())
                st.must_respond = False
                st.plan_inputs = self._inputs(st, snapshot)
                return None
        content: dict[str, Resource] = {}
        held: set[str] = set()
        partial = False
        deps = self._deps(snapshot)
        for name in names:
            resource = desired.get(name)
            if resource is None:
                continue
            if not self._deps_met(resource, deps):
                held.add(name)
            elif st.rejected.get(name) != resource.hash:
                content[name] = resource
                continue
            # Held back or known to be rejected: keep what Envoy has, if anything.
            partial = True
            fallback = st.applied.get(name) or st.sent.get(name)
            usable = fallback is not None and fallback.body is not None
            if usable and fallback is not None and fallback.hash != st.rejected.get(name):
                content[name] = fallback
        retained: set[str] = set()
        if st.type_url == typeurls.CLUSTER and st.sent:
            referenced = self._referenced_clusters()
            for name, resource in st.sent.items():
                if name not in content and name in referenced and resource.body is not None:
                    content[name] = resource  # removed only once no listener routes to it
                    retained.add(name)
                    partial = True
        key = (base, frozenset(held), frozenset(retained))
        # Nothing held, retained or rejected, and nothing Envoy was sent outside the content (a
        # cluster that could be retained once a listener names it again).
        quiet = not held and not retained and not partial and st.sent.keys() <= content.keys()
        if not st.must_respond and key == st.plan_key:
            if quiet:
                st.plan_inputs = inputs
            return None
        st.plan_key = key
        st.sent = content
        push = self._record_push(
            st, snapshot, base + (PARTIAL if partial else ""), content, (), now,
            _whole(snapshot.types.get(st.type_url), content, partial),
        )  # fmt: skip
        if quiet:
            st.plan_inputs = self._inputs(st, snapshot)  # this push may have replaced cds.sent
        return push


class DeltaProtocol(_Protocol):
    """Incremental ADS: only changed resources and removed names travel."""

    def receive(self, request: DeltaRequest, now: float) -> list[Event]:
        st = self.state(request.type_url)
        st.epoch += 1
        events: list[Event] = []
        if request.response_nonce:
            sent = self._take_sent(st, request.response_nonce)
            if sent is None:
                events.append(Ignored(st.type_url, "unknown nonce"))
            elif request.error_detail is not None:
                events.append(self._nack(st, sent, request.error_detail, now, sotw=False))
            else:
                events.append(self._ack(st, sent, now, sotw=False))
        if not st.requested:
            st.requested = True
            st.requested_at = now
            st.must_respond = True
            st.resync = bool(request.initial_versions)
            held, refused = admit_names(request.initial_versions, (), self.max_names)
            for name in held:
                stub = Resource.stub(st.type_url, name, request.initial_versions[name])
                st.sent[name] = st.applied[name] = stub
            self._limit(st, refused, "held", events)
            if st.type_url in typeurls.WILDCARD_TYPES and not request.subscribe:
                st.wildcard = True  # legacy wildcard: the first request names nothing
        for name in request.subscribe:
            if name == "*":
                st.wildcard = True
            elif name in st.names:
                # Subscribed again: Envoy dropped it meanwhile (an unsubscribe folded into this
                # subscribe), and every name subscribed to must be answered (discovery.proto).
                st.must_respond = True
                st.absent.discard(name)
                if not st.wildcard:
                    st.sent.pop(name, None)
                    st.applied.pop(name, None)
        if request.subscribe:
            new, refused = admit_names(request.subscribe, st.names, self.max_names)
            st.names.update(new)
            st.must_respond = st.must_respond or bool(new)
            self._limit(st, refused, "subscribed", events)
        for name in request.unsubscribe:
            if name == "*":
                st.wildcard = False
            else:
                st.names.discard(name)
                st.denied.discard(name)
                st.absent.discard(name)
            if not st.wildcard:  # Envoy drops what it unsubscribed from
                st.sent.pop(name, None)
                st.applied.pop(name, None)
        return events

    def _inputs(self, st: TypeState, snapshot: Snapshot) -> tuple[object, ...]:
        """What a delta plan of ``st`` reads: its entry and the entries its dependency checks
        read (shared objects, replaced whenever they change), and the epochs of its own state
        and of the types it waits for; every request or push of a type moves its epoch. Any
        type but CDS waits for CDS (a listener or route for the clusters it names to be sent);
        CDS waits for LDS and RDS only while it holds a removal back (a cluster leaves once no
        listener or route names it), so the ACK of a route push re-plans RDS alone, not every
        type of the stream (at 5,005 nodes the fan-out's ACKs were a fifth of the loop's time,
        most of it planning types the ACK could not change)."""
        if st.type_url != typeurls.CLUSTER:
            waits: tuple[str, ...] = (typeurls.CLUSTER,)
        elif st.holding_removal:
            waits = (typeurls.LISTENER, typeurls.ROUTE)
        else:
            waits = ()
        epochs = tuple(
            state.epoch if (state := self.states.get(t)) is not None else -1 for t in waits
        )
        return (
            snapshot.types.get(st.type_url),
            snapshot.types.get(typeurls.SECRET),
            snapshot.types.get(typeurls.CLUSTER),
            st.epoch,
            *epochs,
        )

    def _plan_type(self, st: TypeState, snapshot: Snapshot, now: float) -> Push | None:
        inputs = self._inputs(st, snapshot)
        quiet = st.quiet_inputs
        if (
            quiet is not None
            and all(map(is_, inputs[:3], quiet[:3]))  # entries
            and inputs[3:] == quiet[3:]  # epochs
        ):
            # The very inputs of the last plan, which sent nothing: it would send nothing again
            # (every ACK of a fan-out used to re-plan every type of the stream).
            return None
        st.quiet_inputs = None
        push = self._plan_delta(st, snapshot, now)
        if push is None:
            st.quiet_inputs = inputs
        return push

    @staticmethod
    def _forget_rejections(st: TypeState, desired: Mapping[str, Resource]) -> None:
        """Rejected content no longer desired: the change was taken back. Envoy already holds
        what is desired (the content it confirmed), or nothing of it is desired any more, so no
        response carries the revert, and without one nothing would clear the rejection: the
        node would stay NOT ENFORCED, and the same content put back once the node can take it
        would be held back as rejected forever. (SotW clears it on the revert's ACK.)"""
        for name, bad in list(st.rejected.items()):
            resource = desired.get(name)
            applied = st.applied.get(name)
            if resource is None or (
                resource.hash != bad and applied is not None and applied.hash == resource.hash
            ):
                del st.rejected[name]
                st.verdicts += 1

    def _plan_delta(self, st: TypeState, snapshot: Snapshot, now: float) -> Push | None:
        desired = snapshot.resources(st.type_url)
        base = snapshot.type_version(st.type_url)
        candidates = set(desired) | st.names | set(st.sent) if st.wildcard else set(st.names)
        updates: dict[str, Resource] = {}
        removed: list[str] = []
        partial = held = False
        referenced = self._referenced_clusters() if st.type_url == typeurls.CLUSTER else set()
        if st.rejected:
            self._forget_rejections(st, desired)
        absent = MAX_ABSENT_PER_PUSH  # (the rest in the next responses, one per request)
        sent, rejected, deps = st.sent, st.rejected, self._deps(snapshot)
        for name in sorted(candidates):
            resource = desired.get(name)
            have = sent.get(name)
            if have is resource:  # (the most common case: sent, unchanged; or neither)
                if have is not None:
                    continue
            elif resource is not None and have is not None and have.hash == resource.hash:
                if have.body is None:  # a stub from initial_resource_versions: it is this one
                    sent[name] = resource
                    if st.applied.get(name) is have:
                        st.applied[name] = resource
                continue
            if resource is None:
                if have is not None and name in referenced:
                    partial = held = True  # removed only once no listener routes to it
                elif have is not None:
                    removed.append(name)
                elif name in st.names and name not in st.absent and absent > 0:
                    removed.append(name)  # subscribed, does not exist: say so, once
                    absent -= 1
                continue
            if (rejected and rejected.get(name) == resource.hash) or not self._deps_met(
                resource, deps
            ):
                partial = True
                continue
            updates[name] = resource
        st.holding_removal = held
        resync, st.resync = st.resync, False
        if not updates and not removed:
            if not partial and not st.outstanding:
                # Nothing to send, nothing in flight, nothing held back: Envoy holds every
                # subscribed resource at its desired content.
                if st.acked_version != base:
                    st.acked_version = base
                    st.acked_at = now
                    self.status_marks += 1
                if resync:
                    st.must_respond = False  # a reconnect that already has it all
            if not st.must_respond:
                return None
        for name, resource in updates.items():
            st.sent[name] = resource
        for name in removed:
            st.sent.pop(name, None)
        if removed or st.absent:  # still subscribed: told it does not exist; sent: exists
            st.absent.update(name for name in removed if name in st.names)
            st.absent.difference_update(updates)
        version = base + (PARTIAL if partial else "")
        whole = _whole(snapshot.types.get(st.type_url), updates, partial) if not removed else None
        return self._record_push(st, snapshot, version, updates, tuple(removed), now, whole)
