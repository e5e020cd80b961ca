"""Resource indexing, content-digest snapshot versions, NACK name parsing and redaction."""

from __future__ import annotations

import pytest

from meshward.testing.xds_resources import cluster, listener, secret
from meshward.xds import typeurls
from meshward.xds.redact import redact_error
from meshward.xds.resources import rejected_names
from meshward.xds.snapshot import build_snapshot, content_version

PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----"


def test_dependencies_are_found_inside_typed_configs() -> None:
    resource = listener("inbound", "orders")
    assert resource.secrets == {"default", "ROOTCA"}
    assert resource.clusters == {"orders"}
    assert listener("plain", secrets=False).secrets == frozenset()


def test_hash_is_deterministic_and_content_based() -> None:
    assert cluster("a").hash == cluster("a").hash
    assert cluster("a").hash != cluster("a", port=1).hash


def test_snapshot_versions_are_content_digests_per_type() -> None:
    s1 = build_snapshot(None, {typeurls.CLUSTER: [cluster("a")]}, 1.0)
    s2 = build_snapshot(s1, {typeurls.CLUSTER: [cluster("a")], typeurls.SECRET: [secret("x")]}, 2.0)
    assert s2.type_version(typeurls.CLUSTER) == s1.type_version(typeurls.CLUSTER)
    assert s2.changed_at(typeurls.CLUSTER) == 1.0
    assert s2.type_version(typeurls.SECRET) != s1.type_version(typeurls.SECRET)
    assert s2.changed_types(s1) == (typeurls.SECRET,)
    assert s2.version != s1.version  # the node's config digest moves with any type
    assert s1.type_version(typeurls.LISTENER) == content_version({})  # present, empty
    assert len(s1.type_version(typeurls.CLUSTER)) == 16


def test_the_same_content_gets_the_same_version_on_any_replica() -> None:
    """A restarted control plane (no previous snapshot, another clock, resources listed in
    another order) versions the same content exactly as the one that ran for a while."""
    content = {
        typeurls.CLUSTER: [cluster("a"), cluster("b")],
        typeurls.LISTENER: [listener("in", secrets=False)],
    }
    long_running = build_snapshot(None, {typeurls.CLUSTER: [cluster("a")]}, 1.0)
    long_running = build_snapshot(long_running, {typeurls.CLUSTER: [cluster("a", port=9)]}, 2.0)
    long_running = build_snapshot(long_running, content, 3.0)
    restarted = build_snapshot(
        None,
        {
            typeurls.LISTENER: [listener("in", secrets=False)],
            typeurls.CLUSTER: [cluster("b"), cluster("a")],
        },
        99.0,
    )
    for type_url in typeurls.ORDER:
        assert restarted.type_version(type_url) == long_running.type_version(type_url)
    assert restarted.version == long_running.version


def test_rejected_names_from_envoy_messages() -> None:
    lds = (
        "Error adding/updating listener(s) inbound: Didn't find a registered implementation\n"
        "outbound-orders: something else\n"
    )
    assert rejected_names(lds, ["inbound", "outbound-orders", "outbound"]) == {
        "inbound",
        "outbound-orders",
    }
    cds = "Error adding/updating cluster(s) a: bad, b.x: duplicate cluster b.x found"
    assert rejected_names(cds, ["a", "b.x", "c"]) == {"a", "b.x"}
    assert rejected_names("Proto constraint validation failed", ["a"]) == frozenset()


def test_secret_nack_is_never_shown_verbatim() -> None:
    error = f'Proto constraint validation failed: name: "default" tls_certificate {{ private_key {{ inline_bytes: "{PEM}" }} }}'
    shown = redact_error(typeurls.SECRET, error, ["default"])
    assert "PRIVATE KEY" not in shown and "MIGHAg" not in shown
    assert "default" in shown and "sha256" in shown


def test_other_nacks_are_scrubbed_of_key_material() -> None:
    error = f"Error adding/updating listener(s) a: bad {PEM} and inline_string: 'secret' end"
    shown = redact_error(typeurls.LISTENER, error)
    assert "MIGHAg" not in shown and "'secret'" not in shown
    assert shown.startswith("Error adding/updating listener(s) a: bad")


def test_new_content_always_gets_a_new_version_and_old_content_its_old_one() -> None:
    s1 = build_snapshot(None, {typeurls.CLUSTER: [cluster("a")]}, 1.0)
    s2 = build_snapshot(s1, {typeurls.CLUSTER: [cluster("a", port=2)]}, 2.0)
    s3 = build_snapshot(s2, {typeurls.CLUSTER: [cluster("a", port=3)]}, 3.0)
    versions = [s.type_version(typeurls.CLUSTER) for s in (s1, s2, s3)]
    assert len(set(versions)) == 3
    back = build_snapshot(s3, {typeurls.CLUSTER: [cluster("a")]}, 4.0)  # a change reverted
    assert back.type_version(typeurls.CLUSTER) == versions[0]
    assert back.changed_at(typeurls.CLUSTER) == 4.0
    renamed = build_snapshot(None, {typeurls.CLUSTER: [cluster("b")]}, 1.0)
    assert renamed.type_version(typeurls.CLUSTER) != versions[0]


def test_snapshot_consistency_is_checked_when_built() -> None:
    """As go-control-plane's Consistent(): every secret and RDS name a resource references is
    in the snapshot, or building it fails naming each dangling reference (bounded message)."""
    from meshward.xds.snapshot import MAX_REPORTED, InconsistentSnapshot, inconsistencies

    ok = {
        typeurls.LISTENER: [listener("in")],
        typeurls.SECRET: [secret("default"), secret("ROOTCA")],
    }
    assert build_snapshot(None, ok, 1.0).resources(typeurls.LISTENER)
    with pytest.raises(InconsistentSnapshot) as caught:
        build_snapshot(None, {typeurls.LISTENER: [listener("in")], typeurls.SECRET: []}, 1.0)
    assert caught.value.missing == [
        "LDS 'in' names secret 'ROOTCA', not in the snapshot",
        "LDS 'in' names secret 'default', not in the snapshot",
    ]
    many = {typeurls.LISTENER: [listener(f"l{i}", port=i + 1) for i in range(10)]}
    with pytest.raises(InconsistentSnapshot, match=r"\(and 15 more\)"):
        build_snapshot(None, many, 1.0)
    assert (
        len(inconsistencies({typeurls.LISTENER: {r.name: r for r in many[typeurls.LISTENER]}}))
        == 20
    )
    assert MAX_REPORTED == 5
    # no secrets referenced: consistent without any
    plain = [listener("in", secrets=False)]
    assert build_snapshot(None, {typeurls.LISTENER: plain}, 1.0).resources(typeurls.LISTENER)


def test_snapshot_consistency_covers_rds_and_eds_names() -> None:
    """A listener's RDS name needs its RouteConfiguration, an EDS cluster its load assignment."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    from meshward.xds.resources import make_resource
    from meshward.xds.snapshot import InconsistentSnapshot

    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="in")
    hcm.rds.route_config_name = "in-routes"
    hcm.rds.config_source.ads.SetInParent()
    message = listener_pb2.Listener(name="in")
    message.filter_chains.add().filters.add(name="hcm").typed_config.Pack(hcm)
    rds_listener = make_resource(message)
    eds = cluster_pb2.Cluster(name="out", type=cluster_pb2.Cluster.EDS)
    eds.eds_cluster_config.service_name = "out-eds"
    eds.eds_cluster_config.eds_config.ads.SetInParent()
    eds_cluster = make_resource(eds)
    routes = make_resource(route_pb2.RouteConfiguration(name="in-routes"))
    assignment = make_resource(endpoint_pb2.ClusterLoadAssignment(cluster_name="out-eds"))
    assert (rds_listener.routes, eds_cluster.endpoints) == ({"in-routes"}, {"out-eds"})

    whole = {
        typeurls.LISTENER: [rds_listener],
        typeurls.ROUTE: [routes],
        typeurls.CLUSTER: [eds_cluster],
        typeurls.ENDPOINT: [assignment],
    }
    assert build_snapshot(None, whole, 1.0).resources(typeurls.ENDPOINT)
    with pytest.raises(InconsistentSnapshot, match="route configuration 'in-routes'"):
        build_snapshot(None, {**whole, typeurls.ROUTE: []}, 1.0)
    with pytest.raises(InconsistentSnapshot, match="load assignment 'out-eds'"):
        build_snapshot(None, {**whole, typeurls.ENDPOINT: []}, 1.0)


def test_dependencies_inside_an_any_seen_before_come_from_the_memo() -> None:
    from meshward.xds import resources

    resources._IN_ANY = resources.AnyMemo()
    first = listener("inbound", "orders")
    held = len(resources._IN_ANY)
    assert held > 0
    again = listener("inbound", "orders")  # the same typed configs: found in the memo
    assert len(resources._IN_ANY) == held
    assert (again.secrets, again.clusters) == (first.secrets, first.clusters)
    other = listener("inbound", "payments")  # another cluster inside the same kind of Any
    assert other.clusters == {"payments"} and len(resources._IN_ANY) > held


def test_a_resource_key_is_made_once() -> None:
    resource = cluster("a")
    assert resource.key == (resource.type_url, resource.name, resource.hash)
    assert resource.key is resource.key  # one tuple, shared by every workload holding it
