"""Per-node work shared between nodes: type contents interned by the control plane's cache
(versions, reference sets and encoded response bodies computed once for every node getting
them), and a SotW plan skipped when its inputs are the very objects of the last plan. Each is
checked against the unshared path: a node gets exactly the bytes a fresh encode gives."""

from __future__ import annotations

import gc
import random

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from meshward.testing.xds_resources import cluster, listener, secret
from meshward.xds import typeurls
from meshward.xds.cache import SnapshotCache
from meshward.xds.limits import IdentityIndex, make_room
from meshward.xds.protocol import DeltaProtocol, DeltaRequest, Push, Request, SotwProtocol
from meshward.xds.resources import Resource, encode_response
from meshward.xds.server import AdsServer
from meshward.xds.snapshot import ContentCache, InconsistentSnapshot, Snapshot, build_snapshot

C, L, S = typeurls.CLUSTER, typeurls.LISTENER, typeurls.SECRET
CLUSTERS = [cluster(f"c{i}", 8000 + i) for i in range(4)]
CLUSTERS_V2 = [cluster(f"c{i}", 9000 + i) for i in range(4)]
LISTENERS = [listener(f"l{i}", f"c{i}", port=15000 + i) for i in range(3)]
LISTENERS_V2 = [listener(f"l{i}", f"c{i}", port=15000 + i, tag="2") for i in range(3)]
SECRETS = [secret("default"), secret("ROOTCA")]


def resources(rng: random.Random) -> dict[str, list[Resource]]:
    """A random node config over a small universe (so contents repeat and change back)."""
    clusters = [rng.choice((a, b)) for a, b in zip(CLUSTERS, CLUSTERS_V2, strict=True)]
    clusters = [c for c in clusters if rng.random() < 0.8]
    listeners = [rng.choice((a, b)) for a, b in zip(LISTENERS, LISTENERS_V2, strict=True)]
    listeners = [x for x in listeners if rng.random() < 0.8]
    secrets = SECRETS if rng.random() < 0.9 else SECRETS[1:]
    return {C: clusters, L: listeners, S: secrets}


def test_replicas_share_one_content_per_type_and_the_same_snapshot_versions() -> None:
    cache = ContentCache()
    config = {C: list(CLUSTERS), L: list(LISTENERS), S: list(SECRETS)}
    a = build_snapshot(None, config, 1.0, contents=cache)
    b = build_snapshot(None, {t: list(items) for t, items in config.items()}, 2.0, contents=cache)
    fresh = build_snapshot(None, config, 3.0)
    for type_url in typeurls.ORDER:
        assert a.types[type_url].content is b.types[type_url].content is not None
        assert a.type_version(type_url) == fresh.type_version(type_url)
        assert list(a.resources(type_url)) == list(fresh.resources(type_url))
    assert a.changed_at(C) == 1.0 and b.changed_at(C) == 2.0  # per node, not shared
    assert a.version == b.version == fresh.version
    assert cache.hits == len(typeurls.ORDER) and cache.misses == len(typeurls.ORDER)
    # The next snapshot of a node with the same content keeps its entries (no push, no drift).
    again = build_snapshot(a, config, 9.0, contents=cache)
    assert all(again.types[t] is a.types[t] for t in typeurls.ORDER)
    assert not again.changed_types(a)


def test_unshared_and_shared_contents_give_the_same_entries_as_the_previous_snapshot() -> None:
    """An entry built without the cache is reused by a snapshot built with it (and back)."""
    config = {C: list(CLUSTERS), L: list(LISTENERS), S: list(SECRETS)}
    plain = build_snapshot(None, config, 1.0)
    shared = build_snapshot(plain, config, 2.0, contents=ContentCache())
    assert all(shared.types[t] is plain.types[t] for t in typeurls.ORDER)


def test_the_consistency_check_is_the_same_with_shared_contents() -> None:
    rng = random.Random(7)
    cache = ContentCache()
    for _ in range(300):
        config = resources(rng)
        try:
            build_snapshot(None, config, 0.0)
            expected = None
        except InconsistentSnapshot as exc:
            expected = exc.missing
        try:
            build_snapshot(None, config, 0.0, contents=cache)
            got = None
        except InconsistentSnapshot as exc:
            got = exc.missing
        assert got == expected


def test_content_cache_is_bounded_and_lets_go_of_unused_contents() -> None:
    cache = ContentCache(limit=50)
    kept = [cache.get(C, [cluster(f"flood-{i}", i)]) for i in range(200)]
    assert len(cache) == 50  # the rest built, correct, not interned
    assert all(k.version and list(k.resources) == [f"flood-{i}"] for i, k in enumerate(kept))
    del kept
    gc.collect()
    assert len(cache) == 0  # no snapshot holds them: gone
    # Flood it through snapshots: only the contents of live snapshots stay.
    snapshots: list[Snapshot] = []
    for i in range(500):
        config = {C: [cluster(f"n{i}", i)], L: [], S: []}
        snapshots = [build_snapshot(None, config, 0.0, contents=cache)]
    gc.collect()
    assert len(cache) <= len(typeurls.ORDER) * len(snapshots)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_a_whole_content_push_is_exactly_the_bytes_of_a_fresh_encode(mode: str) -> None:
    cache = ContentCache()
    config = {C: list(CLUSTERS), L: list(LISTENERS), S: list(SECRETS)}
    server = AdsServer.__new__(AdsServer)  # _encode reads nothing from the server
    for type_url in (C, L, S):
        snapshot = build_snapshot(None, config, 0.0, contents=cache)
        content = snapshot.types[type_url].content
        assert content is not None
        items = tuple(snapshot.resources(type_url).values())
        shared = server._encode(mode, Push(type_url, "v1", "3", items, (), content))
        plain = server._encode(mode, Push(type_url, "v1", "3", items, ()))
        assert shared == plain
        body = content.delta_body if mode == "delta" else content.sotw_body
        assert body is (content.delta_body if mode == "delta" else content.sotw_body)  # once
        head = discovery_pb2.DiscoveryResponse(version_info="v1", type_url=type_url, nonce="3")
        if mode == "sotw":
            head.control_plane.identifier = "meshward"
            assert shared == encode_response(head, items, delta=False)


def test_protocol_marks_whole_pushes_only_when_they_carry_the_whole_content() -> None:
    cache = ContentCache()
    s = build_snapshot(
        None, {C: list(CLUSTERS), L: list(LISTENERS), S: list(SECRETS)}, 0.0, contents=cache
    )
    p = SotwProtocol()
    p.receive(Request(C), 0)
    p.receive(Request(S, "", ("ROOTCA",)), 0)  # one of two: not the whole content
    pushes, _ = p.plan(s, 0)
    by_type = {x.type_url: x for x in pushes}
    assert by_type[C].whole is s.types[C].content
    assert by_type[S].whole is None and [r.name for r in by_type[S].resources] == ["ROOTCA"]


class _NeverSkip(SotwProtocol):
    """The protocol with the skip disabled: inputs never the same objects."""

    def _inputs(self, st: object, snapshot: Snapshot) -> tuple[object, ...]:
        return (object(),)


def _view(pushes: list[Push]) -> list[tuple[str, str, str, tuple[tuple[str, str], ...]]]:
    return [
        (x.type_url, x.version, x.nonce, tuple((r.name, r.hash) for r in x.resources))
        for x in pushes
    ]


@pytest.mark.parametrize("seed", range(40))
def test_skipping_a_plan_never_changes_what_is_pushed(seed: int) -> None:
    """Random conversations (snapshot changes, ACKs, NACKs naming a resource or none, stale
    ACKs, subscription changes): the protocol that skips plans whose inputs are unchanged
    pushes exactly what the one that always plans pushes, and reports the same events."""
    rng = random.Random(seed)
    fast, slow = SotwProtocol(), _NeverSkip()
    cache = ContentCache()
    snapshot: Snapshot | None = None
    outstanding: list[Push] = []
    for t in (C, L):
        for p in (fast, slow):
            p.receive(Request(t), 0)
    for p in (fast, slow):
        p.receive(Request(S, "", ("default", "ROOTCA")), 0)
    for step in range(60):
        now = float(step)
        action = rng.random()
        if snapshot is None or action < 0.3:
            # Unchecked: a listener whose cluster or secret is missing is held back.
            snapshot = build_snapshot(snapshot, resources(rng), now, check=False, contents=cache)
        elif action < 0.75 and outstanding:
            push = outstanding.pop(rng.randrange(len(outstanding)))
            names = ("default", "ROOTCA") if push.type_url == S else ()
            error = None
            if rng.random() < 0.25:
                named = rng.choice([*(r.name for r in push.resources), "nothing"])
                error = f"Error adding/updating listener(s) {named}: bad"
            request = Request(push.type_url, push.version, names, push.nonce, error)
            assert fast.receive(request, now) == slow.receive(request, now)
        elif action < 0.85:
            names = ("ROOTCA",) if rng.random() < 0.5 else ("default", "ROOTCA")
            request = Request(S, "", names, fast.states[S].latest_nonce)
            assert fast.receive(request, now) == slow.receive(request, now)
        a, events_a = fast.plan(snapshot, now)
        b, events_b = slow.plan(snapshot, now)
        assert _view(a) == _view(b) and events_a == events_b
        outstanding.extend(a)


class _NeverSkipDelta(DeltaProtocol):
    """The delta protocol without its plan skip: every plan sees new inputs."""

    def _inputs(self, st: object, snapshot: Snapshot) -> tuple[object, ...]:
        return (object(), object(), object())


@pytest.mark.parametrize("seed", range(40))
def test_skipping_a_delta_plan_never_changes_what_is_pushed(seed: int) -> None:
    """The same for delta streams: random snapshot changes, ACKs, NACKs naming a resource or
    none, subscriptions and unsubscriptions; the protocol that skips plans whose inputs are
    unchanged pushes (updates and removals) exactly what the one that always plans pushes."""
    rng = random.Random(seed)
    fast, slow = DeltaProtocol(), _NeverSkipDelta()
    cache = ContentCache()
    snapshot: Snapshot | None = None
    outstanding: list[Push] = []
    could_skip = 0  # plans whose type had the inputs of a quiet plan on record
    for t in (C, L):
        for p in (fast, slow):
            p.receive(DeltaRequest(t), 0)
    for p in (fast, slow):
        p.receive(DeltaRequest(S, subscribe=("default", "ROOTCA")), 0)
    for step in range(80):
        now = float(step)
        action = rng.random()
        if snapshot is None or action < 0.25:
            snapshot = build_snapshot(snapshot, resources(rng), now, check=False, contents=cache)
        elif action < 0.7 and outstanding:
            push = outstanding.pop(rng.randrange(len(outstanding)))
            error = None
            if rng.random() < 0.25:
                named = rng.choice([*(r.name for r in push.resources), "nothing"])
                error = f"Error adding/updating listener(s) {named}: bad"
            request = DeltaRequest(push.type_url, response_nonce=push.nonce, error_detail=error)
            assert fast.receive(request, now) == slow.receive(request, now)
        elif action < 0.85:
            name = rng.choice(["default", "ROOTCA"])
            change = {"subscribe": (name,)} if rng.random() < 0.5 else {"unsubscribe": (name,)}
            request = DeltaRequest(S, **change)  # type: ignore[arg-type]
            assert fast.receive(request, now) == slow.receive(request, now)
        planned = sum(1 for st in fast.states.values() if st.quiet_inputs is not None)
        a, events_a = fast.plan(snapshot, now)
        b, events_b = slow.plan(snapshot, now)
        could_skip += planned
        view_a = [(*v, x.removed) for v, x in zip(_view(a), a, strict=True)]
        view_b = [(*v, x.removed) for v, x in zip(_view(b), b, strict=True)]
        assert view_a == view_b and events_a == events_b
        outstanding.extend(a)
    assert could_skip > 0  # the skip was exercised


def test_identity_index_finds_one_identitys_nodes_and_forgets_them() -> None:
    class Node:
        def __init__(self, identity: str, connected: bool, at: float | None) -> None:
            self.identity, self.connected, self.disconnected_at = identity, connected, at

    nodes = {f"a/{i}": Node("A", i != 0, 5.0 - i if i == 0 else None) for i in range(3)}
    nodes |= {f"b/{i}": Node("B", False, 1.0) for i in range(1000)}
    index = IdentityIndex()
    for key, node in nodes.items():
        index.add(node.identity, key)
    assert sorted(index.nodes(nodes, "A")) == ["a/0", "a/1", "a/2"]
    assert make_room(index.nodes(nodes, "A"), "A", 3) == make_room(nodes, "A", 3) == ("a/0", True)
    for i in range(1000):
        index.discard(f"b/{i}")
    index.discard("never-added")
    assert index.nodes(nodes, "B") == {} and len(index) == 3
    assert index._keys.keys() == {"A"}  # nothing left behind for a forgotten identity


def test_snapshot_cache_build_shares_contents_between_its_nodes() -> None:
    cache = SnapshotCache()
    config = {C: list(CLUSTERS), L: list(LISTENERS), S: list(SECRETS)}
    for i in range(10):
        cache.set(f"ns/w/{i}", cache.build(f"ns/w/{i}", config, 0.0))
    first = cache.get("ns/w/0")
    assert first is not None
    assert all(
        (s := cache.get(f"ns/w/{i}")) is not None and s.types[L].content is first.types[L].content
        for i in range(10)
    )
    assert len(cache.contents) == len(typeurls.ORDER)


def test_the_heap_is_frozen_while_the_control_plane_runs_and_given_back_after() -> None:
    from meshward.xds import heap

    gc.unfreeze()
    kept = [[i] for i in range(1000)]  # long-lived containers, as a compiled mesh's objects
    frozen = heap.freeze()
    try:
        assert frozen >= len(kept) and gc.get_freeze_count() == frozen
        scanned = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(k) in scanned for k in kept)
    finally:
        heap.unfreeze()
    assert gc.get_freeze_count() == 0
    assert all(id(k) in {id(o) for o in gc.get_objects()} for k in kept[:3])
