"""The flow collector on a real control plane (real mTLS, SVIDs from its CA): a node reports
only its own workload's flows; garbage, floods and foreign reports are refused or dropped,
counted, and never stop the collector."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.certs.client_tls import client_ssl_context
from meshward.compile import CompileOptions
from meshward.flows.service import flows_for
from meshward.policy import load
from meshward.testing import als
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.service import XdsServiceThread

POLICY = """
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, rootNamespace: meshward-system}
""" + "".join(
    f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: shop}}
spec:
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
"""
    for name in ("frontend", "orders")
)
FRONTEND_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
ORDERS_ID = "spiffe://cluster.local/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsServiceThread]:
    base = tmp_path_factory.mktemp("collector")
    (base / "mesh.yaml").write_text(POLICY)
    policy = load([base / "mesh.yaml"])
    ca = CertificateAuthority.ephemeral(policy.mesh.trust_domain)
    with XdsServiceThread(
        None, ca, compiler_for(CompileOptions()), policy_paths=[base / "mesh.yaml"],
        flows=flows_for(str(base / "flows.db")),
    ) as xds:  # fmt: skip
        xds.ca = ca  # type: ignore[attr-defined]
        yield xds


def context_for(plane: XdsServiceThread, spiffe_id: str) -> Any:
    ca = plane.ca  # type: ignore[attr-defined]
    svid = ca.issue(spiffe_id)
    return client_ssl_context(
        svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem
    )


def send(
    plane: XdsServiceThread, spiffe_id: str, messages: list[Any], raw: bool = False
) -> tuple[str, str]:
    return asyncio.run(
        als.send("127.0.0.1", plane.port, context_for(plane, spiffe_id), messages, raw=raw)
    )


def collector(plane: XdsServiceThread) -> Any:
    assert plane.service is not None
    return plane.service.flows.collector


def flush(plane: XdsServiceThread) -> tuple[int, int]:
    assert plane.service is not None
    store = plane.service.flows.store
    store.flush()
    counts: tuple[int, int] = store.row_counts()
    return counts


def test_own_flows_are_stored(plane: XdsServiceThread) -> None:
    entry = als.http_entry("shop/orders", path="/orders/42", principal=FRONTEND_ID)
    assert send(plane, ORDERS_ID, [als.message("shop/orders", [entry])])[0] == "OK"
    flows, _ = flush(plane)
    assert flows >= 1


def test_node_claiming_another_identity_is_refused(plane: XdsServiceThread) -> None:
    before = collector(plane).refused["identity-mismatch"]
    entry = als.http_entry("shop/orders")
    status, text = send(plane, FRONTEND_ID, [als.message("shop/orders", [entry])])
    assert status == "PERMISSION_DENIED" and "may not act as node shop/orders" in text
    assert collector(plane).refused["identity-mismatch"] == before + 1


def test_entries_for_another_workload_are_refused(plane: XdsServiceThread) -> None:
    before = collector(plane).refused["other-workload"]
    entry = als.http_entry("shop/orders")  # frontend's node reporting orders' traffic
    status, _ = send(plane, FRONTEND_ID, [als.message("shop/frontend", [entry])])
    assert status == "PERMISSION_DENIED"
    assert collector(plane).refused["other-workload"] == before + 1


def test_garbage_is_refused_and_the_collector_keeps_serving(plane: XdsServiceThread) -> None:
    status, _ = send(plane, ORDERS_ID, [als.Garbage(b"\xff\x00garbage" * 50)], raw=True)
    assert status != "OK"
    bad_id = send(plane, ORDERS_ID, [als.message("../../etc", [als.http_entry("x")])])
    assert bad_id[0] == "PERMISSION_DENIED"
    no_id = send(plane, ORDERS_ID, [als.message(None, [als.http_entry("shop/orders")])])
    assert no_id[0] == "PERMISSION_DENIED"
    untagged = als.http_entry("shop/orders")
    untagged.common_properties.custom_tags.clear()
    before = collector(plane).dropped["untagged"]
    assert send(plane, ORDERS_ID, [als.message("shop/orders", [untagged])])[0] == "OK"
    assert collector(plane).dropped["untagged"] == before + 1
    test_own_flows_are_stored(plane)  # still serving


def test_a_flood_of_distinct_paths_and_callers_stays_bounded(plane: XdsServiceThread) -> None:
    assert plane.service is not None
    store = plane.service.flows.store
    limits = store.limits

    def word(i: int) -> str:  # distinct paths that are not ids (ids fold to {*} anyway)
        return "".join(chr(ord("a") + int(d)) for d in str(i))

    entries = [
        als.http_entry("shop/orders", path=f"/{word(i)}/x", principal=f"spiffe://evil/ns/n{i}/sa/s")
        for i in range(3000)
    ]
    messages = [als.message("shop/orders", entries[:1000])] + [
        als.message(None, entries[i : i + 1000]) for i in (1000, 2000)
    ]
    assert send(plane, ORDERS_ID, messages)[0] == "OK"
    flows, _ = flush(plane)
    # Unknown callers fold into one source; distinct paths fold into {other} past max_paths.
    assert flows <= limits.max_paths + 5
    assert store.counters.folded_paths >= 3000 - limits.max_paths


def test_a_flooding_stream_is_rate_limited_and_counted(plane: XdsServiceThread) -> None:
    from meshward.flows.collector import CollectorLimits

    c = collector(plane)
    saved = c.limits
    c.limits = CollectorLimits(rate=1.0, burst=100.0, max_entries=150)
    try:
        before_rate, before_big = c.dropped["rate"], c.dropped["oversized-message"]
        entries = [als.http_entry("shop/orders", path="/flood") for _ in range(200)]
        messages = [als.message("shop/orders", entries)] + [als.message(None, entries)] * 2
        assert send(plane, ORDERS_ID, messages)[0] == "OK"
        assert c.dropped["oversized-message"] - before_big == 3 * 50  # cut to max_entries
        # 450 admitted by size, at most the burst (plus what the rate refills) by rate
        assert c.dropped["rate"] - before_rate >= 450 - 100 - 5
    finally:
        c.limits = saved


def test_streams_per_identity_are_bounded(plane: XdsServiceThread) -> None:
    from envoy.service.accesslog.v3 import als_pb2
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    from meshward.flows.collector import CollectorLimits

    c = collector(plane)
    saved = c.limits
    c.limits = CollectorLimits(max_streams_per_identity=1)
    before = c.refused["identity-stream-limit"]

    async def scenario() -> str:
        context = context_for(plane, ORDERS_ID)
        first = Channel("127.0.0.1", plane.port, ssl=context)
        kinds: Any = (Cardinality.STREAM_UNARY, als_pb2.StreamAccessLogsMessage,
                      als_pb2.StreamAccessLogsResponse)  # fmt: skip
        try:
            async with first.request(als.METHOD, *kinds) as open_stream:
                await open_stream.send_message(als.message("shop/orders", []))
                for _ in range(100):  # the first stream is being served
                    if c.streams >= 1:
                        break
                    await asyncio.sleep(0.05)
                second = als.send(
                    "127.0.0.1", plane.port, context, [als.message("shop/orders", [])]
                )
                status, _ = await asyncio.wait_for(second, 10)
                await open_stream.end()
                await asyncio.wait_for(open_stream.recv_message(), 10)
                return status
        finally:
            first.close()

    try:
        assert asyncio.run(scenario()) == "RESOURCE_EXHAUSTED"
        assert c.refused["identity-stream-limit"] == before + 1
    finally:
        c.limits = saved
