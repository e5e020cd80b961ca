"""Delta ADS re-plans only the types an answer can change: a route ACK re-plans RDS alone, and
plans skipped for unchanged inputs equal plans never skipped (random sequences of snapshots,
ACKs, NACKs and subscription changes)."""

from __future__ import annotations

from typing import Any

from meshward.testing.xds_resources import cluster, listener, secret
from meshward.xds import typeurls
from meshward.xds.protocol import DeltaProtocol, DeltaRequest
from meshward.xds.resources import Resource, make_resource
from meshward.xds.snapshot import Snapshot, build_snapshot
from tests.unit.xds.test_protocol import C, L, S, names

R = typeurls.ROUTE


def route(name: str, cluster_name: str, tag: str = "") -> Resource:
    from envoy.config.route.v3 import route_pb2
    from google.protobuf import json_format

    vhost = {"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": f"/{tag}"}, "route": {"cluster": cluster_name}}]}  # fmt: skip
    return make_resource(
        json_format.ParseDict(
            {"name": name, "virtual_hosts": [vhost]}, route_pb2.RouteConfiguration()
        )
    )


class Counting(DeltaProtocol):
    """Counts the delta plans actually worked out, by type."""

    def __init__(self) -> None:
        super().__init__()
        self.planned: list[str] = []

    def _plan_delta(self, st: Any, snapshot: Snapshot, now: float) -> Any:
        self.planned.append(st.type_url)
        return super()._plan_delta(st, snapshot, now)


def rsnap(previous: Snapshot | None, clusters: list[str], listeners: list[tuple[str, str]],
          routes: list[tuple[str, str, str]]) -> Snapshot:  # fmt: skip
    return build_snapshot(
        previous,
        {
            C: [cluster(n) for n in clusters],
            L: [listener(n, c, port=15000 + i) for i, (n, c) in enumerate(listeners)],
            R: [route(n, c, tag) for n, c, tag in routes],
            S: [secret("default"), secret("ROOTCA")],
        },
        0.0,
        check=False,
    )


def test_delta_ack_of_a_route_push_re_plans_the_routes_alone() -> None:
    p = Counting()
    for t, sub in ((C, ()), (S, ("default", "ROOTCA")), (L, ()), (R, ("in",))):
        p.receive(DeltaRequest(t, subscribe=sub), 0)
    s1 = rsnap(None, ["app"], [("in", "app")], [("in", "app", "")])
    for push in p.plan(s1, 0)[0]:
        p.receive(DeltaRequest(push.type_url, response_nonce=push.nonce), 0)
    p.plan(s1, 0)
    s2 = rsnap(s1, ["app"], [("in", "app")], [("in", "app", "v2")])  # a mesh-wide route edit
    [push], _ = p.plan(s2, 1)
    assert push.type_url == R
    p.planned.clear()
    p.receive(DeltaRequest(R, response_nonce=push.nonce), 2)
    assert p.plan(s2, 2) == ([], [])
    assert p.planned == [R]  # CDS, LDS, SDS: nothing they read moved
    assert p.states[R].acked_version == s2.type_version(R)  # the ACK still counts in sync


class Unskipped(DeltaProtocol):
    """Plans every type on every call (the definition the skipping must equal)."""

    def _plan_type(self, st: Any, snapshot: Snapshot, now: float) -> Any:
        return self._plan_delta(st, snapshot, now)


def test_delta_plans_skipped_for_unchanged_inputs_equal_plans_never_skipped() -> None:
    import random

    clusters = ["a", "b", "c"]
    for seed in range(60):
        rng = random.Random(seed)
        pair = (DeltaProtocol(), Unskipped())
        for p in pair:
            for t, sub in ((C, ()), (S, ("default", "ROOTCA")), (L, ()), (R, ("ra",))):
                p.receive(DeltaRequest(t, subscribe=sub), 0)
        snapshot: Snapshot | None = None
        sent: list[Any] = [[], []]
        for step in range(40):
            op = rng.choice(["snap", "ack", "ack", "nack", "sub", "plan"])
            if op == "snap" or snapshot is None:
                have = sorted(rng.sample(clusters, rng.randint(1, 3)))
                snapshot = rsnap(
                    snapshot, have,
                    [(f"l{c}", rng.choice(have)) for c in rng.sample(have, rng.randint(0, len(have)))],
                    [(f"r{c}", rng.choice(have), rng.choice(["", "x"])) for c in clusters],
                )  # fmt: skip
            elif op in ("ack", "nack"):
                index = rng.randrange(8)
                for p, pushes in zip(pair, sent, strict=True):
                    if index < len(pushes):
                        push = pushes[index]
                        error = "Error adding/updating: bad" if op == "nack" else None
                        p.receive(DeltaRequest(push.type_url, response_nonce=push.nonce,
                                               error_detail=error), step)  # fmt: skip
            elif op == "sub":
                name, subscribe = f"r{rng.choice(clusters)}", rng.random() < 0.5
                for p in pair:
                    if subscribe:
                        p.receive(DeltaRequest(R, subscribe=(name,)), step)
                    else:
                        p.receive(DeltaRequest(R, unsubscribe=(name,)), step)
            results = [p.plan(snapshot, step) for p in pair]
            summary = [
                [(x.type_url, x.version, names(x.resources), x.removed) for x in pushes]
                for pushes, _ in results
            ]
            assert summary[0] == summary[1], (seed, step)
            for k, (pushes, _) in enumerate(results):
                sent[k] = pushes + sent[k][:6]
            for t in (C, L, R):
                assert pair[0].states[t].acked_version == pair[1].states[t].acked_version
