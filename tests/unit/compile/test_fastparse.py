"""The fast dict -> proto path gives the bytes ``json_format.ParseDict`` (+ re-packing) gives,
for every resource the compiler emits, and falls back to it for anything else."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from meshward.compile import CompileOptions, Endpoint, Mode, compile_mesh, fastparse, protos
from meshward.policy import load
from meshward.testing import topology

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NOW = datetime(2030, 1, 1, tzinfo=UTC)
FAST = fastparse.parse  # the unpatched function


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[dict[str, Any], Any]]]:
    """Every (dict, message type) the compiler hands to protos, and whether the fast path took
    it (a copy of the dict, before either path reads it)."""
    seen: list[tuple[dict[str, Any], Any]] = []
    original = fastparse.parse

    def spy(data: dict[str, Any], message: Any, reuse: Any = None) -> Any:
        seen.append((copy.deepcopy(data), type(message)))
        return original(data, message, reuse)

    monkeypatch.setattr(fastparse, "parse", spy)
    yield seen


def _same_bytes(seen: list[tuple[dict[str, Any], Any]]) -> int:
    fast = 0
    for data, cls in seen:
        slow = protos.slow_parse(copy.deepcopy(data), cls())
        try:
            quick = FAST(copy.deepcopy(data), cls())
        except fastparse.Unsupported:
            continue
        fast += 1
        assert quick.SerializeToString() == slow.SerializeToString(), cls.DESCRIPTOR.full_name
        assert quick.SerializeToString(deterministic=True) == slow.SerializeToString(
            deterministic=True
        )
    return fast


def test_examples_every_feature_same_bytes(recorded: list[tuple[dict[str, Any], Any]]) -> None:
    options = CompileOptions(
        mode=Mode.XDS,
        extauthz=Endpoint("127.0.0.1", 9191),
        otlp=Endpoint("127.0.0.1", 4317),
        flow_log_cluster="meshward-xds",
        access_log_path="/dev/stdout",
    )
    compile_mesh(load([EXAMPLES]), options, now=NOW)
    compile_mesh(load([EXAMPLES]), CompileOptions(mode=Mode.STATIC), now=NOW)
    assert len(recorded) > 20
    assert _same_bytes(recorded) == len(recorded)  # and none needed the general path


def test_fleet_and_worst_case_same_bytes(recorded: list[tuple[dict[str, Any], Any]]) -> None:
    compile_mesh(topology.fleet(40), CompileOptions(mode=Mode.XDS), now=NOW)
    compile_mesh(topology.worst_case(20), CompileOptions(mode=Mode.XDS), now=NOW)
    assert len(recorded) > 100
    assert _same_bytes(recorded) == len(recorded)


def test_well_known_types_and_enums() -> None:
    data = {
        "name": "c",
        "type": "STATIC",
        "connectTimeout": "1.500s",
        "perConnectionBufferLimitBytes": 32768,
        "metadata": {"filterMetadata": {"m": {"a": [1, "x", None, True, {"b": 2.5}]}}},
        "typedExtensionProtocolOptions": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"http2ProtocolOptions": {}},
            }
        },
    }
    quick = fastparse.parse(copy.deepcopy(data), cluster_pb2.Cluster())
    slow = protos.slow_parse(copy.deepcopy(data), cluster_pb2.Cluster())
    assert quick.SerializeToString() == slow.SerializeToString()
    assert quick.connect_timeout.nanos == 500_000_000
    assert quick.per_connection_buffer_limit_bytes.value == 32768


@pytest.mark.parametrize(
    "data",
    [
        {"name": "l", "nope": 1},  # unknown field
        {"name": 7},  # wrong type
        {"name": "l", "trafficDirection": "SIDEWAYS"},  # unknown enum value
        {"name": "l", "trafficDirection": 1},  # enum by number: ParseDict's business
        {"name": None},  # null
        {"name": "l", "listenerFilters": {"not": "a list"}},
    ],
)
def test_anything_else_is_left_to_parsedict(data: dict[str, Any]) -> None:
    with pytest.raises(fastparse.Unsupported):
        fastparse.parse(copy.deepcopy(data), listener_pb2.Listener())
    try:
        expected: Any = protos.slow_parse(copy.deepcopy(data), listener_pb2.Listener())
    except json_format.ParseError as exc:
        with pytest.raises(json_format.ParseError, match=str(exc)[:30]):
            protos.listener(copy.deepcopy(data))
    else:
        assert protos.listener(data).SerializeToString() == expected.SerializeToString()


def _rbac_route(deny_paths: tuple[str, ...]) -> dict[str, Any]:
    """A route with an ALLOW and a DENY engine, as the compiler emits them."""

    def engine(action: str | None, policy: dict[str, Any]) -> dict[str, Any]:
        rules: dict[str, Any] = {"policies": {"p": policy}}
        if action is not None:
            rules["action"] = action
        return {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
            "rbac": {"rules": rules},
        }

    allow = {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://td/ns/a/sa/b"}}}],
    }
    deny = {
        "permissions": [{"url_path": {"path": {"prefix": p}}} for p in deny_paths],
        "principals": [{"any": True}],
    }
    return {
        "name": "inbound|8080|x",
        "virtual_hosts": [
            {
                "name": "inbound",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}],
                "typed_per_filter_config": {
                    "meshward.rbac.allow": engine(None, allow),
                    "meshward.rbac.deny": engine("DENY", deny),
                },
            }
        ],
    }


def test_reused_any_values_give_the_bytes_of_a_fresh_parse() -> None:
    first, anys = protos.parse_reusing("route", _rbac_route(("/admin",)), {})
    assert sum(len(v) for v in anys.values()) == 2  # both engines recorded (with their bytes)
    edited = _rbac_route(("/admin", "/debug"))
    again, anys2 = protos.parse_reusing("route", copy.deepcopy(edited), anys)
    fresh = protos.slow_parse(copy.deepcopy(edited), route_pb2.RouteConfiguration())
    assert again.SerializeToString(deterministic=True) == fresh.SerializeToString(
        deterministic=True
    )
    assert again.SerializeToString() != first.SerializeToString()
    # the unchanged ALLOW engine's bytes were taken from ``anys``, not parsed again: poison them
    # and the poisoned bytes come out (the changed DENY engine is parsed)
    allow_url = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
    poisoned = {allow_url: [(data, b"poison") for data, _ in anys2[allow_url]]}
    odd, _ = protos.parse_reusing("route", _rbac_route(("/admin", "/x")), poisoned)
    per_filter = odd.virtual_hosts[0].typed_per_filter_config
    assert per_filter["meshward.rbac.allow"].value == b"poison"
    assert per_filter["meshward.rbac.deny"].value != b"poison"


def test_the_general_path_records_no_any_values() -> None:
    message, anys = protos.parse_reusing("listener", {"name": "l", "trafficDirection": 1}, {})
    assert anys == {} and message.traffic_direction == 1


def test_the_any_values_kept_for_the_next_parse_are_bounded() -> None:
    per_route = {
        f"f{i}": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
            "rbac": {"rules": {"policies": {f"p{i}": {"permissions": [{"any": True}]}}}},
        }
        for i in range(fastparse.REUSE_PER_TYPE * 3)
    }
    data = {
        "name": "r",
        "virtual_hosts": [{"name": "v", "domains": ["*"], "typed_per_filter_config": per_route}],
    }
    first, anys = protos.parse_reusing("route", copy.deepcopy(data), {})
    assert [len(v) for v in anys.values()] == [fastparse.REUSE_PER_TYPE]
    again, _ = protos.parse_reusing("route", copy.deepcopy(data), anys)  # the rest parsed
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
