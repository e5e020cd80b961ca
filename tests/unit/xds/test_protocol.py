"""The sans-IO ADS protocol: ordering, ACK/NACK per resource, SDS name changes, secret denial,
resync without churn after a reconnect, delta in-sync tracking."""

from __future__ import annotations

from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import json_format

from meshward.testing.xds_resources import cluster, listener, secret
from meshward.xds import typeurls
from meshward.xds.enforcement import not_enforced
from meshward.xds.limits import MAX_NAME_LENGTH, MAX_SUBSCRIBED_NAMES, admit_names
from meshward.xds.protocol import (
    MAX_ABSENT_PER_PUSH,
    PARTIAL,
    Acked,
    DeltaProtocol,
    DeltaRequest,
    Ignored,
    Nacked,
    Push,
    Request,
    SecretDenied,
    SotwProtocol,
)
from meshward.xds.resources import Resource, make_resource
from meshward.xds.snapshot import Snapshot, build_snapshot
from meshward.xds.status import stream_types, type_status

C, L, S = typeurls.CLUSTER, typeurls.LISTENER, typeurls.SECRET


def snap(
    previous: Snapshot | None,
    *,
    clusters: list[Resource] | None = None,
    listeners: list[Resource] | None = None,
    secrets: list[Resource] | None = None,
    now: float = 0.0,
) -> Snapshot:
    return build_snapshot(
        previous,
        {
            C: clusters if clusters is not None else [cluster("app")],
            L: listeners if listeners is not None else [listener("inbound")],
            S: secrets if secrets is not None else [secret("default"), secret("ROOTCA")],
        },
        now,
        check=False,  # some tests feed the protocol snapshots the control plane would refuse
    )


def delta_in_sync(s: Snapshot) -> DeltaProtocol:
    """A delta stream that subscribed to CDS, its SDS names and LDS, and ACKed ``s``."""
    p = DeltaProtocol()
    for t, sub in ((C, ()), (S, ("default", "ROOTCA")), (L, ())):
        p.receive(DeltaRequest(t, subscribe=sub), 0)
    for push in p.plan(s, 0)[0]:
        p.receive(DeltaRequest(push.type_url, response_nonce=push.nonce), 0)
    return p


def names(push_resources: tuple[Resource, ...]) -> list[str]:
    return [r.name for r in push_resources]


def sotw_connect(p: SotwProtocol, s: Snapshot) -> None:
    """Envoy's start-up conversation: CDS, SDS for the cluster's secrets, LDS; all ACKed."""
    p.receive(Request(C), 0)
    pushes, _ = p.plan(s, 0)
    assert [x.type_url for x in pushes] == [C]
    p.receive(Request(C, pushes[0].version, (), pushes[0].nonce), 0)
    p.receive(Request(S, "", ("default", "ROOTCA")), 0)
    p.receive(Request(L), 0)
    pushes, _ = p.plan(s, 0)
    assert [x.type_url for x in pushes] == [S, L]
    for push in pushes:
        requested = ("default", "ROOTCA") if push.type_url == S else ()
        p.receive(Request(push.type_url, push.version, requested, push.nonce), 0)


def test_sotw_initial_sequence_and_ack() -> None:
    p = SotwProtocol()
    s = snap(None)
    sotw_connect(p, s)
    for t in (C, S, L):
        assert p.states[t].acked_version == s.type_version(t)
        assert p.states[t].applied.keys() == s.resources(t).keys()
    assert p.plan(s, 1) == ([], [])  # nothing new: nothing sent


def test_sotw_pushes_only_changed_types_in_order() -> None:
    p = SotwProtocol()
    s1 = snap(None)
    sotw_connect(p, s1)
    s2 = snap(
        s1,
        clusters=[cluster("app"), cluster("orders")],
        listeners=[listener("inbound", tag="x")],
    )
    assert s2.type_version(S) == s1.type_version(S)  # same content, same version
    pushes, _ = p.plan(s2, 1)
    assert [(x.type_url, x.version) for x in pushes] == [
        (C, s2.type_version(C)),
        (L, s2.type_version(L)),
    ]
    assert names(pushes[0].resources) == ["app", "orders"]


def test_listener_held_until_its_cluster_was_sent() -> None:
    p = SotwProtocol()
    s = snap(None)
    p.receive(Request(L), 0)  # a client that asks for listeners before clusters
    p.receive(Request(S, "", ("default", "ROOTCA")), 0)
    pushes, _ = p.plan(s, 0)
    lds = next(x for x in pushes if x.type_url == L)
    assert lds.resources == () and lds.version == s.type_version(L) + PARTIAL
    p.receive(Request(C), 0)
    pushes, _ = p.plan(s, 1)
    assert [x.type_url for x in pushes] == [C, L]  # cluster first, then the released listener
    assert names(pushes[1].resources) == ["inbound"] and pushes[1].version == s.type_version(L)


def test_listener_never_sent_when_its_secret_is_not_offered() -> None:
    p = SotwProtocol()
    s = snap(None, secrets=[secret("ROOTCA")])  # no SVID ("default") yet
    p.receive(Request(C), 0)
    p.receive(Request(L), 0)
    pushes, _ = p.plan(s, 0)
    lds = next(x for x in pushes if x.type_url == L)
    assert lds.resources == ()
    s2 = snap(s)  # the SVID arrives
    pushes, _ = p.plan(s2, 1)
    assert [names(x.resources) for x in pushes if x.type_url == L] == [["inbound"]]


def test_sotw_nack_applies_the_valid_resources_and_keeps_the_rejected_one_old() -> None:
    p = SotwProtocol()
    good_a, good_b = listener("a", port=1), listener("b", port=2)
    s1 = snap(None, listeners=[good_a, good_b])
    sotw_connect(p, s1)
    bad_a, new_b = listener("a", port=1, tag="bad"), listener("b", port=2, tag="new")
    s2 = snap(s1, listeners=[bad_a, new_b])
    [push], _ = p.plan(s2, 1)
    error = "Error adding/updating listener(s) a: Didn't find a registered implementation\n"
    [event] = p.receive(Request(L, s1.type_version(L), (), push.nonce, error), 2)
    assert isinstance(event, Nacked)
    assert event.nack.resources == ("a",) and not event.nack.whole_response
    st = p.states[L]
    assert st.applied["a"] is good_a and st.applied["b"] is new_b  # b applied despite the NACK
    assert st.acked_version == s1.type_version(L)
    assert p.plan(s2, 3) == ([], [])  # never resend what Envoy just rejected
    # A later change elsewhere: the rejected listener goes out at its last applied version.
    s3 = snap(s2, listeners=[bad_a, listener("b", port=2, tag="newer")])
    [push], _ = p.plan(s3, 4)
    assert push.version == s3.type_version(L) + PARTIAL
    assert {r.name: r for r in push.resources}["a"] is good_a
    # Its ACK confirms the old "a", not a fix: the node still does not enforce the desired
    # config (NOT ENFORCED in status), and the bad content is not sent again.
    [event] = p.receive(Request(L, push.version, (), push.nonce), 4)
    assert isinstance(event, Acked) and p.states[L].rejected == {"a": bad_a.hash}
    status = type_status(p.states[L], s3, 4, 10.0)
    assert not status.in_sync and status.rejected == ("a",)
    assert not_enforced([status]) is not None
    assert p.plan(s3, 4) == ([], [])
    # Fixing the resource clears it.
    s4 = snap(
        s3,
        listeners=[listener("a", port=1, tag="fixed"), listener("b", port=2, tag="newer")],
    )
    [push], _ = p.plan(s4, 5)
    assert push.version == s4.type_version(L)
    [event] = p.receive(Request(L, push.version, (), push.nonce), 6)
    assert isinstance(event, Acked) and not p.states[L].rejected


def test_a_rejected_resource_that_is_removed_stops_counting() -> None:
    """Removing the resource Envoy rejected (instead of fixing it) clears the rejection once
    the node ACKs the set without it: the node is enforcing again (not stuck NOT ENFORCED)."""
    p = SotwProtocol()
    s1 = snap(None, listeners=[listener("a", port=1), listener("b", port=2)])
    sotw_connect(p, s1)
    s2 = snap(s1, listeners=[listener("a", port=1, tag="bad"), listener("b", port=2)])
    [push], _ = p.plan(s2, 1)
    error = "Error adding/updating listener(s) a: Didn't find a registered implementation\n"
    p.receive(Request(L, s1.type_version(L), (), push.nonce, error), 2)
    assert p.states[L].rejected
    s3 = snap(s2, listeners=[listener("b", port=2, tag="unrelated edit")])
    [push], _ = p.plan(s3, 3)
    assert names(push.resources) == ["b"]
    [event] = p.receive(Request(L, push.version, (), push.nonce), 4)
    assert isinstance(event, Acked) and not p.states[L].rejected
    assert type_status(p.states[L], s3, 5, 10.0).in_sync


def test_sotw_nack_naming_nothing_rejects_the_whole_response() -> None:
    p = SotwProtocol()
    s1 = snap(None)
    sotw_connect(p, s1)
    s2 = snap(s1, clusters=[cluster("app", port=9), cluster("new")])
    [push], _ = p.plan(s2, 1)
    nack = Request(C, s1.type_version(C), (), push.nonce, "Proto constraint validation failed")
    [event] = p.receive(nack, 2)
    assert isinstance(event, Nacked) and event.nack.whole_response
    assert event.nack.resources == ("app", "new")
    assert p.states[C].applied["app"].hash == cluster("app").hash


def test_sotw_sds_answers_again_when_requested_names_change() -> None:
    p = SotwProtocol()
    s = snap(None)
    p.receive(Request(S, "", ("ROOTCA",)), 0)
    [push], _ = p.plan(s, 0)
    assert names(push.resources) == ["ROOTCA"]
    p.receive(Request(S, push.version, ("ROOTCA",), push.nonce), 0)
    assert p.plan(s, 0) == ([], [])
    p.receive(Request(S, push.version, ("ROOTCA", "default"), push.nonce), 0)
    [push2], _ = p.plan(s, 0)
    assert push2.version == push.version  # same version, answered again
    assert names(push2.resources) == ["ROOTCA", "default"]


def test_other_secrets_get_nothing_and_one_audit_event() -> None:
    p = SotwProtocol()
    s = snap(None)
    evil = "spiffe://cluster.local/ns/shop/sa/payments"
    p.receive(Request(S, "", ("default", evil)), 0)
    [push], events = p.plan(s, 0)
    assert names(push.resources) == ["default"]
    assert events == [SecretDenied((evil,))]
    p.receive(Request(S, push.version, ("default", evil), push.nonce), 0)
    assert p.plan(s, 1) == ([], [])  # reported once


def test_stale_nonce_is_tracked_but_not_answered() -> None:
    p = SotwProtocol()
    s1 = snap(None)
    sotw_connect(p, s1)
    s2 = snap(s1, clusters=[cluster("app"), cluster("x")])
    [first], _ = p.plan(s2, 1)
    s3 = snap(s2, clusters=[cluster("app"), cluster("y")])
    [_second], _ = p.plan(s3, 1)
    events = p.receive(Request(C, first.version, (), first.nonce), 2)
    assert isinstance(events[0], Acked) and p.states[C].acked_version == s2.type_version(C)
    assert p.plan(s3, 2) == ([], [])
    events = p.receive(Request(C, "v9", (), "nonsense"), 2)
    assert isinstance(events[0], Ignored)


def test_delta_sends_only_changes_and_removals() -> None:
    p = DeltaProtocol()
    s1 = snap(None, clusters=[cluster("a"), cluster("b")])
    p.receive(DeltaRequest(C), 0)
    [push], _ = p.plan(s1, 0)
    assert names(push.resources) == ["a", "b"] and push.removed == ()
    p.receive(DeltaRequest(C, response_nonce=push.nonce), 0)
    s2 = snap(s1, clusters=[cluster("a", port=1), cluster("c")])
    [push], _ = p.plan(s2, 1)
    assert names(push.resources) == ["a", "c"] and push.removed == ("b",)
    [event] = p.receive(DeltaRequest(C, response_nonce=push.nonce), 2)
    assert isinstance(event, Acked) and sorted(p.states[C].applied) == ["a", "c"]


def test_delta_reconnect_with_initial_versions_sends_nothing_known() -> None:
    s = snap(None, clusters=[cluster("a"), cluster("b")])
    p = DeltaProtocol()
    known = {"a": cluster("a").hash, "b": "stale"}
    p.receive(DeltaRequest(C, initial_versions=known), 0)
    [push], _ = p.plan(s, 0)
    assert names(push.resources) == ["b"]


def test_delta_nack_reverts_and_is_not_resent() -> None:
    p = DeltaProtocol()
    s1 = snap(
        None,
        listeners=[listener("a", port=1), listener("b", port=2)],
        secrets=[secret("default"), secret("ROOTCA")],
    )
    p.receive(DeltaRequest(C), 0)
    p.receive(DeltaRequest(L), 0)
    pushes, _ = p.plan(s1, 0)
    for push in pushes:
        p.receive(DeltaRequest(push.type_url, response_nonce=push.nonce), 0)
    s2 = snap(s1, listeners=[listener("a", port=1, tag="bad"), listener("b", port=2, tag="ok")])
    [push], _ = p.plan(s2, 1)
    [event] = p.receive(
        DeltaRequest(
            L, response_nonce=push.nonce, error_detail="Error adding/updating listener(s) a: nope"
        ),
        2,
    )
    assert isinstance(event, Nacked) and event.nack.resources == ("a",)
    assert p.states[L].applied["b"].hash == listener("b", port=2, tag="ok").hash
    assert p.plan(s2, 3) == ([], [])


def test_delta_secret_subscription_filters_foreign_names() -> None:
    p = DeltaProtocol()
    s = snap(None)
    p.receive(DeltaRequest(S, subscribe=("default", "ns/other/default")), 0)
    [push], events = p.plan(s, 0)
    assert names(push.resources) == ["default"]
    assert events == [SecretDenied(("ns/other/default",))]


def test_a_cluster_leaves_only_after_the_listener_routing_to_it() -> None:
    for protocol in (SotwProtocol(), DeltaProtocol()):
        delta = isinstance(protocol, DeltaProtocol)

        def ack(push: Any, protocol: Any = protocol, delta: bool = delta) -> None:
            if delta:
                protocol.receive(DeltaRequest(push.type_url, response_nonce=push.nonce), 0)
            else:
                wanted = ("default", "ROOTCA") if push.type_url == S else ()
                protocol.receive(Request(push.type_url, push.version, wanted, push.nonce), 0)

        for type_url in (C, L, S):
            if delta:
                protocol.receive(
                    DeltaRequest(
                        type_url, subscribe=("default", "ROOTCA") if type_url == S else ()
                    ),
                    0,
                )
            else:
                protocol.receive(
                    Request(type_url, "", ("default", "ROOTCA") if type_url == S else ()), 0
                )
        s1 = snap(None, clusters=[cluster("app"), cluster("old")],
                  listeners=[listener("in", "app"), listener("out", "old", port=2)])  # fmt: skip
        pushes, _ = protocol.plan(s1, 0)
        for push in pushes:
            ack(push)
        s2 = snap(s1, clusters=[cluster("app")], listeners=[listener("in", "app")])
        pushes, _ = protocol.plan(s2, 1)
        by_type = {p.type_url: p for p in pushes}
        if delta:
            assert C not in by_type  # "old" is not removed yet
            assert by_type[L].removed == ("out",)
        else:
            assert names(by_type[C].resources) == ["app", "old"]
            assert by_type[C].version == s2.type_version(C) + PARTIAL
            assert names(by_type[L].resources) == ["in"]
        for push in pushes:
            ack(push)  # Envoy dropped the listener that routed to "old"
        [again], _ = protocol.plan(s2, 2)
        assert again.type_url == C and again.version == s2.type_version(C)
        if delta:
            assert again.removed == ("old",)
        else:
            assert names(again.resources) == ["app"]


# -- resync after a reconnect (another stream, a restarted control plane, another replica) ---------
def test_sotw_reconnect_holding_the_desired_versions_is_sent_nothing_but_what_changed() -> None:
    """A new stream whose first requests report the very versions the snapshot has: no
    answer for those types, the node is recorded as holding them (in sync, nothing pushed);
    SDS, whose content changed meanwhile (a new SVID), is the only push."""
    s1 = snap(None)
    sotw_connect(SotwProtocol(), s1)
    renewed = [secret("default", "renewed"), secret("ROOTCA")]
    restarted = snap(None, secrets=renewed)
    p = SotwProtocol()
    p.receive(Request(C, s1.type_version(C)), 0)
    p.receive(Request(S, s1.type_version(S), ("default", "ROOTCA")), 0)
    p.receive(Request(L, s1.type_version(L)), 0)
    pushes, _ = p.plan(restarted, 0)
    assert [x.type_url for x in pushes] == [S]
    for t in (C, L):
        st = p.states[t]
        assert st.pushes == 0 and st.acked_version == restarted.type_version(t)
        assert st.applied.keys() == restarted.resources(t).keys()
        assert type_status(st, restarted, 100.0, 1.0).in_sync
    assert not type_status(p.states[S], restarted, 100.0, 1.0).in_sync  # until it ACKs
    p.receive(Request(S, pushes[0].version, ("default", "ROOTCA"), pushes[0].nonce), 1)
    assert type_status(p.states[S], restarted, 100.0, 1.0).in_sync
    assert p.plan(restarted, 2) == ([], [])
    # The skipped types are tracked as sent: a later change is pushed as usual.
    s2 = snap(restarted, clusters=[cluster("app"), cluster("more")], secrets=[*renewed])
    [push], _ = p.plan(s2, 3)
    assert push.type_url == C and names(push.resources) == ["app", "more"]


def test_sotw_reconnect_with_a_nonce_of_the_earlier_stream_is_recognised_too() -> None:
    s = snap(None)
    p = SotwProtocol()
    p.receive(Request(C, s.type_version(C), (), response_nonce="17"), 0)
    assert p.plan(s, 0) == ([], [])
    assert p.states[C].acked_version == s.type_version(C)


def test_sotw_reconnect_is_answered_unless_it_holds_the_whole_desired_version() -> None:
    s = snap(None)
    cases = {
        "older version": Request(C, "0123456789abcdef"),
        "partial version": Request(C, s.type_version(C) + PARTIAL),
        "fresh Envoy": Request(C),
    }
    for case, request in cases.items():
        p = SotwProtocol()
        p.receive(request, 0)
        pushes, _ = p.plan(s, 0)
        assert [(x.type_url, names(x.resources)) for x in pushes] == [(C, ["app"])], case
    # A requested name the snapshot lacks: answered (with what there is), not assumed held.
    p = SotwProtocol()
    p.receive(Request(S, s.type_version(S), ("default", "ROOTCA", "other")), 0)
    [push], _ = p.plan(s, 0)
    assert names(push.resources) == ["ROOTCA", "default"]
    # Holding the desired listeners, it holds the clusters they name: even if it asks for
    # listeners first, nothing is held back (a partial SotW answer would remove listeners).
    p = SotwProtocol()
    p.receive(Request(L, s.type_version(L)), 0)
    assert p.plan(s, 0) == ([], [])
    p.receive(Request(C, s.type_version(C)), 0)
    assert p.plan(s, 0) == ([], [])
    assert p.states[L].acked_version == s.type_version(L)


def test_delta_reconnect_holding_everything_is_sent_nothing_and_in_sync() -> None:
    s = snap(None, clusters=[cluster("a"), cluster("b")])
    p = DeltaProtocol()
    have = {name: r.hash for name, r in s.resources(C).items()}
    p.receive(DeltaRequest(C, initial_versions=have), 0)
    assert p.plan(s, 0) == ([], [])
    st = p.states[C]
    assert st.pushes == 0 and st.acked_version == s.type_version(C)
    assert type_status(st, s, 100.0, 1.0).in_sync
    assert all(r.body is not None for r in st.sent.values())  # stubs replaced by the real ones
    # Holding one more than desired: only the removal travels.
    p = DeltaProtocol()
    p.receive(DeltaRequest(C, initial_versions={**have, "gone": "0" * 16}), 0)
    [push], _ = p.plan(s, 0)
    assert push.resources == () and push.removed == ("gone",)


def test_delta_node_back_in_sync_when_a_nacked_change_is_reverted() -> None:
    """Delta: a new listener is NACKed (drift), the SVID renews meanwhile, then the change is
    reverted: nothing is left to send, and the node is in sync again without a push."""
    s1 = snap(None, listeners=[listener("a", port=1)])
    p = delta_in_sync(s1)
    s2 = snap(s1, listeners=[listener("a", port=1), listener("new", port=2)])
    [push], _ = p.plan(s2, 1)
    nack = "Error adding/updating listener(s) new: cannot bind: address already in use"
    p.receive(DeltaRequest(L, response_nonce=push.nonce, error_detail=nack), 2)
    assert not type_status(p.states[L], s2, 20.0, 5.0).in_sync
    assert type_status(p.states[L], s2, 20.0, 5.0).drift
    s3 = snap(s2, listeners=[listener("a", port=1), listener("new", port=2)],
              secrets=[secret("default", "renewed"), secret("ROOTCA")])  # fmt: skip
    [sds], _ = p.plan(s3, 3)
    p.receive(DeltaRequest(S, response_nonce=sds.nonce), 3)
    reverted = snap(s3, listeners=[listener("a", port=1)],
                    secrets=[secret("default", "renewed"), secret("ROOTCA")])  # fmt: skip
    assert reverted.type_version(L) == s1.type_version(L)
    assert p.plan(reverted, 4) == ([], [])
    for t in (C, S, L):
        assert type_status(p.states[t], reverted, 30.0, 5.0).in_sync, t
    # the rejected listener is no longer desired: no longer counted as rejected either
    assert p.states[L].rejected == {}
    assert not_enforced(stream_types(p.states, reverted, 30.0, 5.0)) is None


def test_delta_change_to_a_resource_the_node_does_not_subscribe_to_is_no_drift() -> None:
    s1 = snap(None, secrets=[secret("default"), secret("ROOTCA"), secret("spare")])
    p = DeltaProtocol()
    p.receive(DeltaRequest(S, subscribe=("default", "ROOTCA")), 0)
    [push], _ = p.plan(s1, 0)
    p.receive(DeltaRequest(S, response_nonce=push.nonce), 0)
    s2 = snap(s1, secrets=[secret("default"), secret("ROOTCA"), secret("spare", "y")])
    assert s2.type_version(S) != s1.type_version(S)
    assert p.plan(s2, 1) == ([], [])
    assert type_status(p.states[S], s2, 10.0, 1.0).in_sync


def test_delta_partial_push_is_never_counted_in_sync() -> None:
    s = snap(None, secrets=[secret("ROOTCA")])  # no SVID yet: the listener is held back
    p = DeltaProtocol()
    p.receive(DeltaRequest(L), 0)
    [push], _ = p.plan(s, 0)
    assert push.resources == () and push.version == s.type_version(L) + PARTIAL
    p.receive(DeltaRequest(L, response_nonce=push.nonce), 1)
    assert p.plan(s, 2) == ([], [])
    assert not type_status(p.states[L], s, 10.0, 1.0).in_sync


def test_delta_rejection_is_forgotten_when_the_change_is_taken_back_then_resent() -> None:
    """Runbook 3 in delta: a changed listener is NACKed (the node keeps the old one); the change
    is taken back (nothing to send: the node holds what is desired) and must no longer count as
    rejected; once the node can take it, the same change put back is sent again, not held back
    as rejected forever."""
    s1 = snap(None, listeners=[listener("a", port=1)])
    p = delta_in_sync(s1)
    changed = [listener("a", port=1, tag="deny")]
    s2 = snap(s1, listeners=changed)
    [push], _ = p.plan(s2, 1)
    error = "Error adding/updating listener(s) a: regex program too large"
    p.receive(DeltaRequest(L, response_nonce=push.nonce, error_detail=error), 2)
    assert not_enforced(stream_types(p.states, s2, 3.0, 10.0)) is not None
    assert p.plan(s2, 3) == ([], [])  # the same content is not resent while it is rejected
    reverted = snap(s2, listeners=[listener("a", port=1)])
    assert p.plan(reverted, 4) == ([], [])  # the node holds it already
    assert p.states[L].rejected == {}
    assert not_enforced(stream_types(p.states, reverted, 5.0, 10.0)) is None
    assert all(s.in_sync for s in stream_types(p.states, reverted, 5.0, 10.0))
    again = snap(reverted, listeners=changed)
    [push], _ = p.plan(again, 6)
    assert push.type_url == L and names(push.resources) == ["a"]
    p.receive(DeltaRequest(L, response_nonce=push.nonce), 7)
    assert all(s.in_sync for s in stream_types(p.states, again, 8.0, 10.0))


# -- delta: subscribed names that do not exist ----------------------------------------------------
E = typeurls.ENDPOINT


def endpoints(name: str, port: int = 8080) -> Resource:
    return make_resource(
        json_format.ParseDict(
            {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
            endpoint_pb2.ClusterLoadAssignment(),
        )
    )  # fmt: skip


def eds(previous: Snapshot | None, *loads: Resource) -> Snapshot:
    return build_snapshot(previous, {E: list(loads)}, 0.0, check=False)


def ack(p: DeltaProtocol, push: Push, now: float = 0.0) -> None:
    [event] = p.receive(DeltaRequest(push.type_url, response_nonce=push.nonce), now)
    assert isinstance(event, Acked)


def test_delta_subscribed_name_that_does_not_exist_is_answered_removed_once() -> None:
    """Envoy waits out initial_fetch_timeout for a subscribed name no response mentions; the
    server says it does not exist (removed_resources), once, and sends it when it appears."""
    s1 = eds(None, endpoints("a"))
    p = DeltaProtocol()
    p.receive(DeltaRequest(E, subscribe=("a", "ghost")), 0)
    [push], _ = p.plan(s1, 0)
    assert names(push.resources) == ["a"] and push.removed == ("ghost",)
    ack(p, push)
    assert p.plan(s1, 1) == ([], [])  # said once, not in every response
    assert type_status(p.states[E], s1, 10.0, 1.0).in_sync
    s2 = eds(s1, endpoints("a"), endpoints("ghost"))  # it springs into existence: sent
    [push], _ = p.plan(s2, 2)
    assert names(push.resources) == ["ghost"] and push.removed == ()
    ack(p, push)
    s3 = eds(s2, endpoints("a"))  # a resource the node holds disappears: removed, once
    [push], _ = p.plan(s3, 3)
    assert push.resources == () and push.removed == ("ghost",)
    ack(p, push)
    assert p.plan(s3, 4) == ([], [])
    # Unsubscribed and subscribed again: answered again (as every subscribed name must be).
    p.receive(DeltaRequest(E, unsubscribe=("ghost",)), 5)
    assert p.plan(s3, 5) == ([], [])
    p.receive(DeltaRequest(E, subscribe=("ghost",)), 6)
    [push], _ = p.plan(s3, 6)
    assert push.resources == () and push.removed == ("ghost",)


def test_delta_names_on_wildcard_streams_and_foreign_secrets_are_answered_too() -> None:
    s = snap(None, clusters=[cluster("a")])
    p = DeltaProtocol()
    p.receive(DeltaRequest(C), 0)  # legacy wildcard: names nothing, so nothing is absent
    [push], _ = p.plan(s, 0)
    assert names(push.resources) == ["a"] and push.removed == ()
    ack(p, push)
    p.receive(DeltaRequest(C, subscribe=("*", "on-demand")), 1)  # wildcard plus a name
    [push], _ = p.plan(s, 1)
    assert push.resources == () and push.removed == ("on-demand",)
    p = DeltaProtocol()  # a secret that is not the node's own: audited, and does not exist
    p.receive(DeltaRequest(S, subscribe=("default", "ns/other/default")), 0)
    [push], events = p.plan(s, 0)
    assert names(push.resources) == ["default"] and push.removed == ("ns/other/default",)
    assert events == [SecretDenied(("ns/other/default",))]


def test_delta_subscribing_again_to_a_name_it_holds_resends_it() -> None:
    """discovery.proto: answer every name in resource_names_subscribe, even one the server
    thinks the client has (it dropped it and its unsubscribe folded into this subscribe)."""
    s = eds(None, endpoints("a"))
    p = DeltaProtocol()
    p.receive(DeltaRequest(E, subscribe=("a",)), 0)
    [push], _ = p.plan(s, 0)
    ack(p, push)
    p.receive(DeltaRequest(E, subscribe=("a",)), 1)
    [push], _ = p.plan(s, 1)
    assert names(push.resources) == ["a"]


def test_delta_whole_nack_reports_the_absent_names_again() -> None:
    s = eds(None, endpoints("a"))
    p = DeltaProtocol()
    p.receive(DeltaRequest(E, subscribe=("a", "ghost")), 0)
    [push], _ = p.plan(s, 0)
    p.receive(DeltaRequest(E, response_nonce=push.nonce, error_detail="malformed"), 1)
    [push], _ = p.plan(s, 1)
    assert push.removed == ("ghost",)


def test_delta_flood_of_bogus_names_is_bounded_in_state_and_response_size() -> None:
    """100,000 bogus names (then 100,000 more, then one too long to be any resource's): at most
    ``max_names`` tracked per type, reported once, and the does-not-exist answers paced at
    MAX_ABSENT_PER_PUSH names per response, one response per ACK."""
    s = eds(None, endpoints("real"))
    p = DeltaProtocol()
    bogus = tuple(f"bogus-{i}" for i in range(100_000))
    [event] = p.receive(DeltaRequest(E, subscribe=("real", *bogus)), 0)
    st = p.states[E]
    assert len(st.names) == MAX_SUBSCRIBED_NAMES and "real" in st.names
    assert isinstance(event, Ignored) and "not tracked" in event.reason
    assert p.receive(DeltaRequest(E, subscribe=tuple(f"more-{i}" for i in range(100_000))), 0) == []
    assert p.receive(DeltaRequest(E, subscribe=("x" * (MAX_NAME_LENGTH + 1),)), 0) == []
    assert len(st.names) == MAX_SUBSCRIBED_NAMES  # (each report once per type and stream)
    reported: list[str] = []
    for round_ in range(1, 100):
        pushes, _ = p.plan(s, round_)
        if not pushes:
            break
        [push] = pushes
        assert len(push.removed) <= MAX_ABSENT_PER_PUSH
        reported.extend(push.removed)
        ack(p, push, round_)
    assert round_ == -(-(MAX_SUBSCRIBED_NAMES - 1) // MAX_ABSENT_PER_PUSH) + 1
    assert sorted(reported) == sorted(st.names - {"real"}) and st.absent == set(reported)


def test_sotw_flood_of_bogus_names_is_bounded_and_reported_once() -> None:
    """SotW's names come whole in every request (every ACK repeats them): at most
    ``max_names`` tracked per type, past them reported once per type and stream, the over-long
    name refused, and the flood's tuple not kept; a later request within the limits (even an
    empty one) is taken as it is."""
    s = eds(None, endpoints("real"))
    p = SotwProtocol(max_names=100)
    flood = ("real", *(f"bogus-{i}" for i in range(100_000)), "x" * (MAX_NAME_LENGTH + 1))
    [event] = p.receive(Request(E, "", flood), 0)
    st = p.states[E]
    assert isinstance(event, Ignored) and event.limit and "99902 name(s)" in event.reason
    assert len(st.names) == 100 and "real" in st.names and st.requested_names is None
    [push], _ = p.plan(s, 0)
    assert names(push.resources) == ["real"]  # SotW answers only what exists
    [acked] = p.receive(Request(E, push.version, flood, push.nonce), 0)  # no second report
    assert isinstance(acked, Acked)
    assert len(st.names) == 100
    assert p.receive(Request(E, push.version, (), push.nonce), 0) == []  # nothing subscribed
    assert st.names == set() and st.requested_names == ()
    [push], _ = p.plan(s, 1)
    assert push.resources == ()
    assert SotwProtocol().max_names == MAX_SUBSCRIBED_NAMES


def test_delta_reconnect_claiming_100000_resources_is_bounded_too() -> None:
    s = snap(None, clusters=[cluster("a")])
    p = DeltaProtocol()
    held = {f"held-{i}": "0" * 16 for i in range(100_000)}
    [event] = p.receive(DeltaRequest(C, initial_versions=held), 0)
    assert isinstance(event, Ignored)
    assert len(p.states[C].sent) == len(p.states[C].applied) == MAX_SUBSCRIBED_NAMES
    [push], _ = p.plan(s, 0)  # held and gone: removed (as many as it may hold, no more)
    assert names(push.resources) == ["a"] and len(push.removed) == MAX_SUBSCRIBED_NAMES


def test_admit_names_keeps_order_drops_duplicates_the_wildcard_and_what_is_past_the_limits() -> (
    None
):
    names_, refused = admit_names(["b", "a", "b", "*", "y" * (MAX_NAME_LENGTH + 1), "c"], {"a"}, 2)
    assert names_ == ["b"] and refused == 2
