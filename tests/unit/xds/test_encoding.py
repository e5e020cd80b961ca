"""Encode once, fan out bytes: a resource is encoded on its first push and the same bytes go to
every node; the assembled responses decode exactly as the messages built field by field."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from meshward.testing.xds_resources import cluster, listener
from meshward.xds import typeurls
from meshward.xds.protocol import Push
from meshward.xds.resources import Resource, encode_response
from meshward.xds.server import AdsServer


def resources() -> list[Resource]:
    return [cluster("outbound|8080||orders.shop"), cluster("outbound|9090||payments.shop", 9090)]


def test_sotw_response_decodes_as_the_message_built_field_by_field() -> None:
    items = resources()
    head = discovery_pb2.DiscoveryResponse(version_info="v1", type_url=typeurls.CLUSTER, nonce="7")
    expected = discovery_pb2.DiscoveryResponse()
    expected.CopyFrom(head)
    expected.resources.extend(r.body for r in items)
    decoded = discovery_pb2.DiscoveryResponse.FromString(encode_response(head, items, delta=False))
    assert decoded == expected
    assert [r.value for r in decoded.resources] == [r.body.value for r in items]


def test_delta_response_decodes_as_the_message_built_field_by_field() -> None:
    items = resources()
    head = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info="v2", type_url=typeurls.CLUSTER, nonce="8", removed_resources=["gone"]
    )
    expected = discovery_pb2.DeltaDiscoveryResponse()
    expected.CopyFrom(head)
    expected.resources.extend(
        discovery_pb2.Resource(name=r.name, version=r.hash, resource=r.body) for r in items
    )
    decoded = discovery_pb2.DeltaDiscoveryResponse.FromString(
        encode_response(head, items, delta=True)
    )
    assert decoded == expected


def test_a_resource_is_encoded_once_for_every_node() -> None:
    shared = listener("outbound|8080||orders.shop", "outbound|8080||orders.shop")
    first = shared.sotw_entry
    assert shared.sotw_entry is first  # cached: no re-encoding for the next node
    assert shared.delta_entry is shared.delta_entry
    server = AdsServer.__new__(AdsServer)  # _encode reads nothing from the server
    for mode in ("sotw", "delta"):
        a = server._encode(mode, Push(typeurls.LISTENER, "v1", "1", (shared,), ()))
        b = server._encode(mode, Push(typeurls.LISTENER, "v1", "2", (shared,), ()))
        entry = shared.sotw_entry if mode == "sotw" else shared.delta_entry
        assert entry in a and entry in b
