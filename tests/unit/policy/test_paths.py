"""Path normalization must equal Envoy's (normalize_path + merge_slashes + REJECT_REQUEST on
escaped slashes). ENVOY_1_40 was recorded by sending each raw path through a real Envoy 1.40
with those settings to an echo server; None means Envoy answered 400."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshward.policy.paths import (
    DOT_SEGMENT_PARAMETERS_REGEX,
    DotSegmentRejected,
    PathRejected,
    check_dot_segment_parameters,
    check_path_template,
    compiled_path_template,
    is_path_template,
    normalize_path,
    path_template_regex,
    strip_trailing_host_dot,
)

ENVOY_1_40: list[tuple[str, str | None]] = [
    ("/a%01b", "/a%01b"),
    ("/a%7fb", "/a%7fb"),
    ("/a%0ab", "/a%0ab"),
    ("/a%ffb", "/a%ffb"),
    ("/a>b", "/a%3Eb"),
    ("/a?%00", "/a"),
    ("/a?x y", None),
    ("/a%2e%2e", "/a.."),
    ("/a/%2E%2e", "/"),
    ("/a/%2e%2e/b%2F", None),
    ("/\\..\\..\\etc", "/etc"),
    ("/a/b%5c", None),
    ("/a?b#", None),
    ("/a?x#y", None),
    ("/x\\..\\admin", "/admin"),
    ("/a\\\\b", "/a/b"),
    ("/a?x=%2F", "/a"),
    ("/a?x=%5c/../..", "/a"),
    ('/a"b', "/a%22b"),
    ("/a<b", "/a%3Cb"),
    ("/a{b}", "/a%7Bb%7D"),
    ("/a|b", "/a%7Cb"),
    ("/a^b", "/a%5Eb"),
    ("/a`b", "/a%60b"),
    ("/a[b]", "/a[b]"),
    ("/é", None),
    ("/a\x01b", None),
    ("/a\x7fb", None),
    ("/a%00b", None),
    ("/a/%2e%2e%2fadmin", None),
    ("/a/..%2fadmin", None),
    ("/a/.%2E", "/"),
    ("/a/%2e.", "/"),
    ("/a/.%252e/b", "/a/.%252e/b"),
    ("/a\\", "/a/"),
    ("/\\admin", "/admin"),
    ("/a/%5c..%5cadmin", None),
    ("/a/b", "/a/b"),
    ("/admin/../api", "/api"),
    ("//admin", "/admin"),
    ("/ADMIN", "/ADMIN"),
    ("/%2e%2e/admin", "/admin"),
    ("/a/%2E%2E/admin", "/admin"),
    ("/a;x/../b", "/b"),
    ("/admin;params", "/admin;params"),
    ("/a/./b/.", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/..", "/"),
    ("/../../x", "/x"),
    ("/a%2Fb", None),
    ("/a%2fb", None),
    ("/a%5Cb", None),
    ("/a%5cb", None),
    ("/a\\b", "/a/b"),
    ("/%41%7e%7E", "/A~~"),
    ("/%3a%3A", "/%3a%3A"),
    ("/a%zz", "/a%zz"),
    ("/a%", "/a%"),
    ("/a%2", "/a%2"),
    ("/a?x=1/../y", "/a"),
    ("/a#frag", None),
    ("/a//b///c", "/a/b/c"),
    ("/a/.%2e/b", "/b"),
    ("/a/%2e/b", "/a/b"),
    ("/a/b/../../..", "/"),
    ("/a/..b", "/a/..b"),
    ("/a/...", "/a/..."),
    ("/%20x", "/%20x"),
    ("/a%252F", "/a%252F"),
    ("/a/b/./../c/", "/a/c/"),
    ("/~user", "/~user"),
    ("/a/%7euser", "/a/~user"),
    ("/a//..//b", "/a/b"),
    ("/a+b", "/a+b"),
    ("/a=b", "/a=b"),
    ("/a*b", "/a*b"),
    ("/a%2b", "/a%2b"),
    ("/%C3%A9", "/%C3%A9"),
    ("/a/%2e%2E/%2E/b", "/b"),
    # A literal "." / ".." segment loses its ";" parameters before dot-segment removal.
    ("/x/..;/admin", "/admin"),
    ("/a/.;x/b", "/a/b"),
    ("/a/b/..;", "/a/"),
    ("/a/%2e%2e;/b", "/a/..;/b"),
    ("/a/..;a/b", "/b"),
    ("/a/.;/b", "/a/b"),
    ("/a/..;;/b", "/b"),
    ("/a/%2e.;/b", "/a/..;/b"),
    ("/a/.%2e;/b", "/a/..;/b"),
    ("/a/b/.;", "/a/b/"),
    ("/a/b/..;x", "/a/"),
    ("/a/b/.;x", "/a/b/"),
    ("/a//..;//b", "/a/b"),
    ("/a/..;b;/c", "/c"),
    ("/a/...;/b", "/a/...;/b"),
    ("/a/.x;/b", "/a/.x;/b"),
    ("/a/;../b", "/a/;../b"),
    ("/a/;/b", "/a/;/b"),
    ("/a/..;%2F/b", None),
    ("/a/..;?x", "/"),
    ("/a/..;%3b/b", "/b"),
    ("/a/b;/..;/c", "/a/c"),
    ("/..;/x", "/x"),
    ("/.;/x", "/x"),
    ("/a/..;\\b", "/"),
    ("/a/..;\\..;\\b", "/"),
    ("/a\\..;\\b", "/a/..;/b"),
    ("/..;", "/"),
    ("/.;", "/"),
    ("/a/.;", "/a/"),
    ("/a/..;/..;/b", "/b"),
    ("/a/..%3b/b", "/a/..%3b/b"),
    ("/a/..%3B/b", "/a/..%3B/b"),
    ("/a/..;%2e%2e/b", "/b"),
    ("/a/..;/%2e%2e/b", "/b"),
    ("/a/.;;/b", "/a/b"),
    ("/a/..;=/b", "/b"),
    ("/a/..;.;/b", "/b"),
    ("/a/..;..;/b", "/b"),
    ("/a/..;%00/b", "/b"),
    ("/a/..;%5C/b", None),
    ("/a/..;%5c/b", None),
    ("/a/..;\\x/b", "/b"),
    ("/a/..;<x>/b", "/b"),
    ("/a/..;%zz/b", "/b"),
    ("/a/..;%/b", "/b"),
    ("/a/..x;/b", "/a/..x;/b"),
    ("/a\\..;/b", "/a/..;/b"),
    ("/a/b\\..;", "/a/b/..;"),
    ("//..;/b", "/b"),
    ("/a/..;//b", "/b"),
    ("/a/..,x/b", "/a/..,x/b"),
    ("/a/..=x/b", "/a/..=x/b"),
    ("/a/..;x=1;y=2/b", "/b"),
    ("/a/b/c/..;/..;/d", "/a/d"),
    ("/a/b/..;/../c", "/c"),
    ("/a/b/../..;/c", "/c"),
    ("/a/./..;/b", "/b"),
    ("/a/.;/..;/b", "/b"),
    ("/a/..;/./b", "/b"),
    ("/a/b/..;/", "/a/"),
    ("/a/b/.;/", "/a/b/"),
    ("/a/..;%2f", None),
    ("/a/..;?x=/..;/", "/"),
    ("/..;/..;/x", "/x"),
    ('/a/..;"x/b', "/b"),
    ("/a/..;{x}/b", "/b"),
    ("/a/..;%41/b", "/b"),
    ("/a/..;./b", "/b"),
    ("/a/..;../b", "/b"),
    ("/a;b/..;/c", "/c"),
    ("/a/..;/b;c/..;/d", "/d"),
    ("/a/%2e;/b", "/a/.;/b"),
    ("/a/%2E;x/b", "/a/.;x/b"),
    ("/a/.;%2F/b", None),
    ("/a/.;%00", "/a/"),
    ("/a/..;é/b", None),
]


@pytest.mark.parametrize(("raw", "envoy"), ENVOY_1_40)
def test_normalization_equals_envoy(raw: str, envoy: str | None) -> None:
    if envoy is None:
        with pytest.raises(PathRejected):
            normalize_path(raw)
    else:
        assert normalize_path(raw) == envoy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/admin/../api", "/api"),
        ("/api/../admin", "/admin"),
        ("//admin", "/admin"),
        ("/./admin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/x/%2E%2e/admin", "/admin"),
        ("/x\\..\\admin", "/admin"),
        ("/admin;params", "/admin;params"),
        ("/x/..;/admin", "/admin"),
        ("/x/.;/admin", "/x/admin"),
        ("/ADMIN", "/ADMIN"),
        ("/%61dmin", "/admin"),
    ],
)
def test_classic_bypasses_normalize(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw", ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5c..%5cadmin", "/..%2fadmin", "/a#x", "", "a/b"]
)
def test_rejected(raw: str) -> None:
    with pytest.raises(PathRejected):
        normalize_path(raw)


def test_path_rejected_is_a_value_error() -> None:
    assert issubclass(PathRejected, ValueError)


_segment = st.text(alphabet="ab.%2eE/", max_size=12)


@given(st.lists(_segment, max_size=6))
def test_normalized_paths_are_fixed_points(parts: list[str]) -> None:
    raw = "/" + "/".join(parts)
    try:
        once = normalize_path(raw)
    except PathRejected:
        return
    assert once.startswith("/")
    assert "//" not in once
    assert "/../" not in once + "/" and "/./" not in once + "/"
    assert normalize_path(once) == once


@pytest.mark.parametrize(
    ("template", "matches", "misses"),
    [
        ("/foo/{*}", ["/foo/bar"], ["/foo/bar/baz", "/foo/", "/foo"]),
        ("/foo/{**}", ["/foo/", "/foo/bar", "/foo/bar/baz"], ["/foo", "/foobar"]),
        ("/foo/{*}/bar/{**}", ["/foo/x/bar/", "/foo/x/bar/y/z"], ["/foo/x/y/bar/z"]),
        ("/path/template/{*}", ["/path/template/a"], ["/path/template/a/b"]),
        ("/{**}/path/template", ["/a/path/template", "/a/b/path/template"], ["/path/template"]),
        ("{**}/path/template", ["/path/template", "/a/b/path/template"], ["/a/path/templates"]),
        # Envoy's template literal class excludes "=" and "*".
        ("/foo/{*}", [], ["/foo/a=b", "/foo/a*b"]),
    ],
)
def test_path_templates(template: str, matches: list[str], misses: list[str]) -> None:
    assert is_path_template(template)
    assert check_path_template(template) is None
    regex = compiled_path_template(template)
    for path in matches:
        assert regex.fullmatch(path), path
    for path in misses:
        assert not regex.fullmatch(path), path


def test_template_regex_is_re2_friendly() -> None:
    regex = path_template_regex("/a.b+c/{*}/(x)/{**}")
    assert regex.startswith("/a\\.b\\+c/")
    assert "\\(x\\)" in regex
    assert re.fullmatch(regex, "/a.b+c/seg/(x)/rest/of/it")


@pytest.mark.parametrize(
    "template",
    ["/*/baz/{*}", "/**/baz/{*}", "/{**}/foo/{*}", "/foo/{*}.txt", "/foo/{*}{*}", "/a}/{*}"],
)
def test_invalid_templates(template: str) -> None:
    assert check_path_template(template) is not None


@pytest.mark.parametrize(
    ("raw", "rejected"),
    [
        ("/x/%2e%2e;/admin", True),  # Envoy forwards /x/..;/admin: Tomcat serves /admin
        ("/a/%2e;/b", True),
        ("/%2E%2E;x/admin", True),
        ("/a/.%2e;/b", True),
        ("/a/%2e.;x=1", True),
        ("/ok?next=/..;/x", False),  # in the query, not the path
        ("/x/..;/admin", False),  # literal: the parameters go, the path is /admin
        ("/a/.;/b", False),
        ("/a/...;/b", False),
        ("/a/..x;/b", False),
        # an escaped ';' after a dot segment: treated as the raw form (it used to pass)
        ("/a/..%3b/b", True),
        ("/a/..%3B/b", True),
        ("/x/%2e%2e%3b/admin", True),
        ("/x/%2E%2e%3B/admin", True),
        ("/x/.%3B/admin", True),
        ("/x/.%2e%3bx=1/admin", True),
        ("/admin/..%3b", True),
        ("/a/b..%3b/c", False),  # not a dot segment
        ("/a/..x%3b/b", False),
        ("/a/%3b../b", False),
        ("/ok?next=/..%3b/x", False),  # in the query
        ("/a;/b", False),
    ],
)
def test_dot_segments_with_parameters_are_rejected(raw: str, rejected: bool) -> None:
    path = normalize_path(raw)
    if rejected:
        with pytest.raises(DotSegmentRejected, match=r"'\.\.' segment with ';' parameters"):
            check_dot_segment_parameters(path)
        assert isinstance(DotSegmentRejected("x"), PathRejected)
    else:
        check_dot_segment_parameters(path)
    # The route regex sees :path with its query; the evaluator the normalized path.
    query = raw.partition("?")[2]
    with_query = path + ("?" + query if query else "")
    assert (re.fullmatch(DOT_SEGMENT_PARAMETERS_REGEX, with_query) is not None) is rejected


def test_the_dot_segment_regex_catches_escaped_dots_where_nothing_normalizes() -> None:
    """Outbound listeners do not normalize: the raw escaped forms must match too."""
    for raw in ("/x/%2e%2e;/admin", "/x/%2E.;/a", "/%2e;", "/x/%2e%2e%3b/admin", "/%2E%3B"):
        assert re.fullmatch(DOT_SEGMENT_PARAMETERS_REGEX, raw), raw
    assert re.fullmatch(DOT_SEGMENT_PARAMETERS_REGEX, "/x?a=/%2e%2e;/b") is None


@pytest.mark.parametrize(
    ("host", "stripped"),
    [
        ("admin.internal.", "admin.internal"),
        ("admin.internal.:8080", "admin.internal:8080"),
        ("admin.internal..", "admin.internal."),  # one dot, as Envoy
        ("admin.internal", "admin.internal"),
        ("admin.internal:8080", "admin.internal:8080"),
        ("10.0.0.1.", "10.0.0.1"),
        ("[::1]:8080", "[::1]:8080"),
        ("[::ffff:1.2.3.4]", "[::ffff:1.2.3.4]"),
        ("", ""),
        (".", ""),
    ],
)
def test_one_trailing_host_dot_is_stripped_like_envoy(host: str, stripped: str) -> None:
    assert strip_trailing_host_dot(host) == stripped


@pytest.mark.parametrize("raw", ["/payments/..%3b/admin", "/payments/%2e%2E%3B/admin", "/x/.%3b"])
def test_the_evaluator_refuses_an_escaped_semicolon_on_a_dot_segment(raw: str) -> None:
    """As the sidecar does (400 before authorization): an ALLOW on /payments* must not let
    /payments/..%3b/admin through to an application that decodes it to /payments/..;/admin."""
    from pathlib import Path

    from meshward.policy import Request, evaluate, load

    policy = load([Path(__file__).resolve().parents[3] / "examples"])
    workload = policy.workload("shop/payments")
    assert workload is not None
    decision = evaluate(
        policy,
        workload,
        Request(method="POST", path=raw, host="payments", destination_port=8080,
                source_principal="spiffe://cluster.local/ns/shop/sa/orders"),
        now=datetime.now(UTC),
    )  # fmt: skip
    assert not decision.allowed
    assert decision.reason.startswith("rejected before authorization (HTTP 400)")
    assert "escaped as %3B" in decision.reason
