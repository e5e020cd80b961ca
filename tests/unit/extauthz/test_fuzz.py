"""Hostile CheckRequests (hypothesis): the service always answers, never raises, and a deny-all
policy never lets anything through, whatever the attributes, headers or tokens look like."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshward.extauthz.authorizer import Authorizer
from meshward.extauthz.service import CheckService
from meshward.policy import parse
from meshward.testing.jwt_issuer import LocalIssuer, unsigned_token

WORKLOAD = "foo/httpbin"
DENY_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec: {}
"""
MIXED = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/web/*"], notNamespaces: ["x"]}}]
    to: [{operation: {paths: ["/admin*", "/api/{*}/items"], methods: ["GET"], hosts: ["*.example"]}}]
    when:
    - {key: "request.auth.claims[groups]", values: ["admin"]}
    - {key: "request.headers[x-team]", notValues: ["blue"]}
    - {key: "source.ip", values: ["10.0.0.0/8"]}
  - to: [{operation: {paths: ["/public*"], ports: ["8000"]}}]
"""

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
paths = st.one_of(
    st.sampled_from(
        [
            "/",
            "/admin",
            "/public/x",
            "/a/../admin",
            "//admin",
            "/%2e%2e/admin",
            "/x%2Fy",
            "/p?q=1#f",
            "",
        ]
    ),
    text,
    st.text(alphabet="/.%2Fa?&=#", max_size=60),
)


@st.composite
def tokens(draw: Any, issuer: LocalIssuer) -> str:
    kind = draw(
        st.sampled_from(["valid", "expired", "none", "junk", "segments", "big", "wrongaud"])
    )
    if kind == "valid":
        return issuer.token(
            draw(text), groups=draw(st.lists(st.sampled_from(["admin", "dev", ""]), max_size=2))
        )
    if kind == "expired":
        return issuer.token(exp=1)
    if kind == "none":
        return unsigned_token({"iss": issuer.issuer, "sub": "x", "groups": ["admin"]})
    if kind == "segments":
        return ".".join(draw(st.lists(st.text(alphabet="abcXYZ-_=", max_size=12), max_size=5)))
    if kind == "big":
        return "a." * 6000
    if kind == "wrongaud":
        return issuer.token(aud=draw(text))
    return draw(text)


def mostly(value: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``value`` most of the time, ``other`` sometimes. Hypothesis favours the first choice of
    a sampled_from, so the request usually gets deep enough to be evaluated."""
    return st.sampled_from([0, 0, 0, 1]).flatmap(lambda i: st.just(value) if i == 0 else other)


@st.composite
def check_requests(draw: Any, issuer: LocalIssuer) -> Any:
    attrs = attribute_context_pb2.AttributeContext()
    if draw(st.booleans()):
        attrs.source.principal = draw(
            st.one_of(text, st.just("spiffe://cluster.local/ns/web/sa/frontend"))
        )
    if draw(st.booleans()):
        attrs.source.address.socket_address.address = draw(
            st.one_of(text, st.sampled_from(["10.1.2.3", "::1", "1.2.3"]))
        )
    if draw(st.booleans()):
        attrs.destination.principal = draw(
            st.one_of(text, st.just("spiffe://cluster.local/ns/foo/sa/httpbin"))
        )
    attrs.destination.address.socket_address.port_value = draw(st.integers(0, 65535))
    workload = draw(mostly(WORKLOAD, st.one_of(st.none(), text)))
    if workload is not None:
        attrs.context_extensions["workload"] = workload
    if draw(st.booleans()):
        attrs.context_extensions["port"] = draw(
            st.one_of(st.sampled_from(["8000", "²", "٣", "99999999999999999999", "-1"]), text)
        )
    if draw(st.booleans()):
        attrs.tls_session.sni = draw(text)
    if draw(mostly(True, st.just(False))):  # sometimes no HTTP attributes at all
        http = attrs.request.http
        http.method = draw(mostly("GET", st.one_of(st.just("POST"), text)))
        http.path = draw(
            mostly("/admin", st.one_of(st.sampled_from(["/public/x", "/api/v1/items"]), paths))
        )
        http.host = draw(st.one_of(st.just("a.example"), text))
        headers = draw(st.dictionaries(text, text, max_size=6))
        if draw(st.integers(0, 2)) > 0:
            headers["authorization"] = "Bearer " + draw(tokens(issuer))
        if draw(st.booleans()):
            headers[draw(st.sampled_from(["X-Team", "x-team", "Authorization"]))] = draw(text)
        if draw(st.booleans()):
            for key, value in headers.items():
                entry = http.header_map.headers.add()
                entry.key = key
                entry.raw_value = value.encode()
        else:
            for key, value in headers.items():
                http.headers[key] = value
    return external_auth_pb2.CheckRequest(attributes=attrs)


@pytest.fixture(scope="module")
def fuzz_issuer() -> LocalIssuer:
    return LocalIssuer()


def _service(issuer: LocalIssuer, doc: str) -> tuple[CheckService, Authorizer]:
    text_ = (
        "apiVersion: meshward.dev/v1\nkind: Workload\n"
        "metadata: {name: httpbin, namespace: foo, labels: {app: httpbin}}\n"
        "spec: {ports: [{name: http, port: 8000}]}\n---\n"
        + issuer.request_authentication_yaml("foo", "jwt", {"app": "httpbin"})
        + "---\n"
        + doc
    )
    authorizer = Authorizer(parse({"fuzz.yaml": text_}))
    return CheckService(authorizer), authorizer


@pytest.fixture(scope="module")
def deny_all(fuzz_issuer: LocalIssuer) -> tuple[CheckService, Authorizer]:
    return _service(fuzz_issuer, DENY_ALL)


@pytest.fixture(scope="module")
def mixed(fuzz_issuer: LocalIssuer) -> tuple[CheckService, Authorizer]:
    return _service(fuzz_issuer, MIXED)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_deny_all_never_allows_and_nothing_raises(
    data: st.DataObject, deny_all: tuple[CheckService, Authorizer], fuzz_issuer: LocalIssuer
) -> None:
    service, _ = deny_all
    request = data.draw(check_requests(fuzz_issuer))
    response = service.check(request, [("traceparent", data.draw(text))])
    assert isinstance(response, external_auth_pb2.CheckResponse)
    assert response.status.code != 0
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code in (401, 403)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_request_gets_a_well_formed_answer_without_internal_errors(
    data: st.DataObject, mixed: tuple[CheckService, Authorizer], fuzz_issuer: LocalIssuer
) -> None:
    service, authorizer = mixed
    request = data.draw(check_requests(fuzz_issuer))
    # authorizer.check raises on a bug, where the service would mask it as a denial.
    result = authorizer.check(request, "")
    event(f"{result.http_status} {result.reason[:24]}")
    response = service.check(request)
    kind = response.WhichOneof("http_response")
    if response.status.code == 0:
        assert kind == "ok_response" and result.allowed
    else:
        assert kind == "denied_response" and not result.allowed
        assert response.denied_response.body.startswith(
            ('{"error":"access denied","code":', '{"error":"unauthenticated","code":')
        )
