"""ALS entries -> flow records (pure): who called whom, and who decided, from what Envoy logs."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from meshward.compile.names import DRY_RUN_DENY_PREFIX
from meshward.flows import records
from meshward.flows.paths import template
from meshward.testing.als import http_entry

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
KNOWN = {FRONTEND: "shop/frontend"}


def resolve(spiffe_id: str) -> str | None:
    return KNOWN.get(spiffe_id)


def test_an_allowed_request_names_caller_callee_and_template() -> None:
    entry = http_entry("shop/orders", path="/orders/42?x=1", principal=FRONTEND)
    entry.request.request_id = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
    r = records.from_http(entry, node_workload="shop/orders", resolve=resolve)
    assert (r.source, r.destination, r.port, r.method, r.path) == (
        "shop/frontend", "shop/orders", 8080, "GET", "/orders/{*}",
    )  # fmt: skip
    assert r.decision == records.ALLOW and r.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_traceparent_wins_over_the_request_id() -> None:
    entry = http_entry("shop/orders", principal=FRONTEND)
    entry.request.request_id = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
    entry.request.request_headers["traceparent"] = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    r = records.from_http(entry, node_workload="shop/orders", resolve=resolve)
    assert r.trace_id == "ab" * 16


def test_rbac_denial_names_the_rule_and_dry_run_verdicts() -> None:
    details = "rbac_access_denied_matched_policy[ns[shop]-policy[deny-scraper]-rule[1]]"
    entry = http_entry("shop/orders", status=403, details=details, principal="spiffe://x/y")
    meta = struct_pb2.Struct()
    meta.update({DRY_RUN_DENY_PREFIX + "shadow_engine_result": "denied",
                 DRY_RUN_DENY_PREFIX + "shadow_effective_policy_id":
                 "ns[shop]-policy[would-deny]-rule[0]"})  # fmt: skip
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.rbac"].CopyFrom(meta)
    r = records.from_http(entry, node_workload="shop/orders", resolve=resolve)
    assert r.decision == records.DENY and r.policy == "shop/deny-scraper#1"
    assert r.dry_run == "shop/would-deny"
    assert r.source == records.UNKNOWN  # an identity naming no workload folds to one source


def test_ext_authz_and_jwt_denials_say_who_decided() -> None:
    ext = http_entry("shop/orders", status=403, details="ext_authz_denied", principal=FRONTEND)
    assert records.from_http(ext, node_workload="shop/orders", resolve=resolve).reason
    jwt = http_entry("shop/orders", status=401, details="jwt_authn_access_denied{Jwt_is_expired}")
    r = records.from_http(jwt, node_workload="shop/orders", resolve=resolve)
    assert r.decision == records.DENY and r.reason.startswith("jwt_authn")
    assert r.source == records.PLAINTEXT


def test_a_report_about_another_workload_is_refused() -> None:
    with pytest.raises(records.ForeignWorkload):
        records.from_http(http_entry("shop/payments"), node_workload="shop/orders", resolve=resolve)
    untagged = http_entry("shop/orders")
    untagged.common_properties.custom_tags.clear()
    with pytest.raises(records.RecordError):
        records.from_http(untagged, node_workload="shop/orders", resolve=resolve)


def _tcp(kind: str, direction: str = "inbound") -> accesslog_pb2.TCPAccessLogEntry:
    entry = accesslog_pb2.TCPAccessLogEntry()
    entry.common_properties.custom_tags.update(
        {"workload": "shop/orders", "direction": direction, "port": "8080", "kind": kind}
    )
    return entry


def test_connection_refusals_from_the_listener_log() -> None:
    entry = _tcp("connection")
    entry.common_properties.downstream_transport_failure_reason = (
        "TLS_error:|268435646:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE"
    )
    r = records.from_tcp(entry, node_workload="shop/orders", resolve=resolve)
    assert r is not None and r.decision == records.DENY and r.reason.startswith("mTLS:")
    assert r.source == records.PLAINTEXT and r.kind == "connection"
    quiet = _tcp("connection")  # a connection that was not refused: nothing to record
    assert records.from_tcp(quiet, node_workload="shop/orders", resolve=resolve) is None


def test_outbound_failures_are_the_callers_side() -> None:
    entry = _tcp("tcp", direction="outbound")
    entry.common_properties.custom_tags["port"] = "0"
    entry.common_properties.upstream_cluster = "outbound|8080||payments.shop"
    entry.common_properties.response_flags.no_route_found = True
    r = records.from_tcp(entry, node_workload="shop/orders", resolve=resolve)
    assert r is not None and (r.source, r.destination, r.port) == (
        "shop/orders",
        "shop/payments",
        8080,
    )
    assert r.decision == records.DENY and r.reason.startswith("no route")


def test_hostile_fields_are_cut() -> None:
    entry = http_entry("shop/orders", path="/" + "a" * 20000, details="x" * 5000)
    r = records.from_http(entry, node_workload="shop/orders", resolve=resolve)
    assert len(r.path) <= records.MAX_FIELD and len(r.reason) <= records.MAX_FIELD


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/orders/42", "/orders/{*}"),
        ("/orders/42/items/7?x=1", "/orders/{*}/items/{*}"),
        ("/u/3f2a9c1e-1111-2222-3333-444455556666", "/u/{*}"),
        ("/api/v1/users", "/api/v1/users"),
        ("/a/b/c/d/e/f/g/h/i/j", "/a/b/c/d/e/f/g/h/{**}"),
        ("/x/" + "a" * 40, "/x/{*}"),
        ("", ""),
    ],
)
def test_path_templates(path: str, want: str) -> None:
    assert template(path) == want


def test_a_network_rbac_denial_names_the_rule() -> None:
    entry = _tcp("tcp")
    entry.common_properties.connection_termination_details = (
        "rbac_access_denied_matched_policy[ns[shop]-policy[db-deny]-rule[2]]"
    )
    entry.common_properties.tls_properties.peer_certificate_properties.subject_alt_name.add(
        uri=FRONTEND
    )
    r = records.from_tcp(entry, node_workload="shop/orders", resolve=resolve)
    assert r is not None and r.decision == records.DENY and r.policy == "shop/db-deny#2"
    assert r.source == "shop/frontend" and r.kind == "tcp"


def test_an_outbound_entry_without_a_workload_tag_is_the_reporting_nodes() -> None:
    """Outbound listeners are the same for every caller (no workload tag): the node that opened
    the ALS stream is the caller; an inbound entry must still name its workload."""
    entry = _tcp("tcp", direction="outbound")
    del entry.common_properties.custom_tags["workload"]
    entry.common_properties.custom_tags["port"] = "0"
    entry.common_properties.upstream_cluster = "outbound|8080||payments.shop"
    entry.common_properties.response_flags.upstream_connection_failure = True
    r = records.from_tcp(entry, node_workload="shop/frontend", resolve=resolve)
    assert r is not None and (r.source, r.destination) == ("shop/frontend", "shop/payments")
    inbound = _tcp("tcp")
    del inbound.common_properties.custom_tags["workload"]
    with pytest.raises(records.RecordError):
        records.from_tcp(inbound, node_workload="shop/orders", resolve=resolve)
