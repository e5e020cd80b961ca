from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshward.certs.spiffe import (
    InvalidSpiffeId,
    SpiffeId,
    parse_spiffe_id,
    spiffe_id,
    validate_trust_domain,
)
from meshward.errors import UserError


def test_parses_istio_shape() -> None:
    sid = parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/frontend", "cluster.local")
    assert sid == SpiffeId("cluster.local", "shop", "frontend")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert sid.principal == "cluster.local/ns/shop/sa/frontend"


def test_invalid_spiffe_id_is_a_user_error() -> None:
    assert issubclass(InvalidSpiffeId, UserError)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("https://cluster.local/ns/a/sa/b", "scheme 'https'"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "must be lowercase"),
        ("cluster.local/ns/a/sa/b", "not a SPIFFE ID"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "use 'cluster.local'"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
        ("spiffe://cluster.local/ns/a", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/sa/b/ns/a", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/ns/a/sa/b/", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local", "no path"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/../sa/b", "'.' or '..'"),
        ("spiffe://cluster.local/ns/a/sa/b c", "whitespace"),
        ("spiffe://cluster.local/ns/a%2Fb/sa/c", "percent-encoded"),
        ("spiffe://cluster.local:443/ns/a/sa/b", "port"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "user info"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://clu$ter/ns/a/sa/b", "lowercase letters, digits"),
        ("spiffe://cluster.local/ns/a*/sa/b", "may contain only"),
        ("", "empty"),
        ("spiffe://cluster.local/ns/a/sa/" + "b" * 2100, "limit is 2048"),
    ],
)
def test_rejects_with_a_reason(value: str, fragment: str) -> None:
    with pytest.raises(InvalidSpiffeId) as exc:
        parse_spiffe_id(value)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_trust_domain_mismatch_names_both() -> None:
    with pytest.raises(InvalidSpiffeId) as exc:
        parse_spiffe_id("spiffe://other.org/ns/a/sa/b", "cluster.local")
    assert "'other.org'" in str(exc.value) and "'cluster.local'" in str(exc.value)


def test_validate_trust_domain() -> None:
    assert validate_trust_domain("example.org") == "example.org"
    for bad in ("Example.org", "", "a b", "td:80"):
        with pytest.raises(InvalidSpiffeId):
            validate_trust_domain(bad)


def test_builder_validates_segments() -> None:
    assert str(spiffe_id("td", "ns1", "sa-1")) == "spiffe://td/ns/ns1/sa/sa-1"
    with pytest.raises(InvalidSpiffeId):
        spiffe_id("td", "a/b", "c")


segment = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
domain = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True)


@given(domain, segment, segment)
def test_round_trip(td: str, ns: str, sa: str) -> None:
    sid = spiffe_id(td, ns, sa)
    assert parse_spiffe_id(str(sid), td) == sid
