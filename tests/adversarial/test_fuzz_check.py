"""Fuzzing Check over the wire (hypothesis): random and bit-flipped CheckRequest *bytes* sent to
the real gRPC service (start_service, grpcio), under three ways of writing "deny everything".

tests/unit/extauthz/test_fuzz.py fuzzes structured CheckRequests in process (the authorizer
and CheckService). This adds what only the wire shows: bytes that do not parse, fields with
types or sizes no Envoy sends, unknown fields, truncated messages. The service must answer every
call (a denial, or a gRPC error when the bytes are not a CheckRequest at all), never allow, never
hit its internal-error path (that path denies too, but means a bug), and keep serving.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.extauthz.client import build_check_request
from meshward.extauthz.server import ServeOptions, start_service
from meshward.testing.extauthz import HTTPBIN_YAML
from meshward.testing.jwt_issuer import LocalIssuer

CHECK = "/envoy.service.auth.v3.Authorization/Check"
WORKLOAD = HTTPBIN_YAML
DENY_ALL = {
    # An ALLOW policy with no rules: nothing can match it, so everything is denied.
    "allow-nothing": "spec: {}",
    # A DENY rule with no conditions matches every request.
    "deny-everything": "spec: {action: DENY, rules: [{}]}",
    # ALLOW a contradiction: a caller with any identity that has no identity.
    "allow-a-contradiction": (
        "spec:\n  rules:\n  - from: [{source: {principals: ['*'], notPrincipals: ['*']}}]\n"
        "    when: [{key: 'request.auth.claims[impossible]', values: [never]}]"
    ),
}


class Service:
    def __init__(self, running: Any) -> None:
        self.running = running
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.call = self.channel.unary_unary(
            CHECK,
            request_serializer=lambda raw: raw,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )

    def internal_errors(self) -> float:
        url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("meshward_extauthz_internal_errors_total "):
                    return float(line.split()[1])
        return 0.0


@pytest.fixture(scope="module")
def issuer() -> LocalIssuer:
    return LocalIssuer()


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory, issuer: LocalIssuer
) -> Iterator[dict[str, Service]]:
    started: dict[str, Service] = {}
    try:
        for name, spec in DENY_ALL.items():
            directory: Path = tmp_path_factory.mktemp(name)
            (directory / "policy.yaml").write_text(
                WORKLOAD
                + "---\n"
                + issuer.request_authentication_yaml("foo", "jwt", {"app": "httpbin"})
                + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                + f"metadata: {{name: {name}, namespace: foo}}\n{spec}\n"
            )
            # Plaintext, in process: the fuzz targets the authorizer behind the caller gate
            # (tests/unit/extauthz/test_callers.py covers the gate and mTLS).
            running = start_service(
                ServeOptions(
                    policy_paths=[directory], metrics_port=0, poll_interval=60, plaintext=True
                )
            )
            started[name] = Service(running)
        yield started
    finally:
        for service in started.values():
            service.channel.close()
            service.running.stop()


def seeds(issuer: LocalIssuer) -> list[bytes]:
    """Well-formed requests (what Envoy would send) to flip bits in."""
    token = issuer.token("alice", groups=["admin"], impossible="never")
    return [
        build_check_request(
            method=method,
            path=path,
            host="httpbin.foo",
            headers=headers,
            source_principal="spiffe://cluster.local/ns/nowhere/sa/nobody",
            destination_principal="spiffe://cluster.local/ns/foo/sa/httpbin",
            workload="foo/httpbin",
            destination_port=8000,
        ).SerializeToString()
        for method, path, headers in (
            ("GET", "/admin", {"authorization": f"Bearer {token}"}),
            ("POST", "/a/../b?x=1", {"x-team": "blue"}),
            ("GET", "/", {}),
        )
    ]


def answer(service: Service, raw: bytes) -> Any:
    """The CheckResponse, or None when the server refused the bytes as a gRPC error."""
    try:
        return service.call(raw, timeout=10)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), err
        return None


def assert_denied(response: Any) -> None:
    if response is None:
        return
    assert response.status.code != 0, response
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code in (401, 403)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), policy=st.sampled_from(sorted(DENY_ALL)))
def test_random_bytes_never_allow(services: dict[str, Service], raw: bytes, policy: str) -> None:
    assert_denied(answer(services[policy], raw))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), policy=st.sampled_from(sorted(DENY_ALL)))
def test_mutated_requests_never_allow(
    services: dict[str, Service], issuer: LocalIssuer, data: st.DataObject, policy: str
) -> None:
    raw = bytearray(data.draw(st.sampled_from(seeds(issuer))))
    for _ in range(data.draw(st.integers(1, 3))):  # few: most messages must still parse
        kind = data.draw(st.sampled_from(["flip", "flip", "flip", "cut", "insert", "append"]))
        if kind == "flip" and raw:
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << data.draw(st.integers(0, 6))  # keeps ASCII text valid UTF-8
        elif kind == "cut" and raw:
            at = data.draw(st.integers(0, len(raw) - 1))
            del raw[at : at + data.draw(st.integers(1, 16))]
        elif kind == "insert":
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:  # a protobuf field of any number and wire type
            field = data.draw(st.integers(1, 2**29 - 1))
            wire = data.draw(st.sampled_from([0, 1, 2, 5]))
            raw += _varint(field << 3 | wire) + data.draw(st.binary(max_size=12))
    assert_denied(answer(services[policy], bytes(raw)))


def test_the_services_survived_without_internal_errors(
    services: dict[str, Service], issuer: LocalIssuer
) -> None:
    """Runs after the fuzz: every service still answers a well-formed request (a denial), and
    none took its catch-all error path."""
    for name, service in services.items():
        for raw in seeds(issuer):
            assert_denied(answer(service, raw))
        assert service.internal_errors() == 0, name


def test_huge_messages_are_refused_or_denied(
    services: dict[str, Service], issuer: LocalIssuer
) -> None:
    request = external_auth_pb2.CheckRequest.FromString(seeds(issuer)[0])
    http = request.attributes.request.http
    http.path = "/" + "a" * 200_000
    for i in range(2000):
        http.headers[f"x-h{i}"] = "v" * 50
    http.body = "b" * 500_000
    for service in services.values():
        assert_denied(answer(service, request.SerializeToString()))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
