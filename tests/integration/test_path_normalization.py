"""The evaluator's path normalization equals what a real Envoy does with the settings the
compiler gives it (normalize_path, merge_slashes, REJECT_REQUEST on escaped slashes).

If Envoy and the evaluator disagreed, a path rule could be enforced by one and bypassed through
the other; this runs the raw paths through both, side by side.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from meshward.envoy import EnvoyProcess
from meshward.envoy.bootstrap import static_proxy
from meshward.policy.paths import PathRejected, normalize_path
from meshward.testing.echo import EchoServer

RAW_PATHS = [
    "/a/b", "/admin/../api", "//admin", "/ADMIN", "/%2e%2e/admin", "/a/%2E%2E/admin",
    "/a;x/../b", "/admin;params", "/a/./b/.", "/a/b/..", "/..", "/../../x", "/a%2Fb", "/a%2fb",
    "/a%5Cb", "/a%5cb", "/a\\b", "/%41%7e%7E", "/%3a%3A", "/a%zz", "/a%", "/a%2", "/a?x=1/../y",
    "/a#frag", "/a//b///c", "/a/.%2e/b", "/a/%2e/b", "/a/b/../../..", "/a/..b", "/a/...", "/%20x",
    "/a%252F", "/a/b/./../c/", "/~user", "/a/%7euser", "/a//..//b", "/a+b", "/a=b", "/a*b",
    "/a%2b", "/%C3%A9", "/a/%2e%2E/%2E/b", "/a%01b", "/a%7fb", "/a%ffb", "/a>b", "/a%2e%2e",
    "/a/%2e%2e/b%2F", "/\\..\\..\\etc", "/a/b%5c", "/x\\..\\admin", "/a?x=%2F", "/a\"b", "/a<b",
    "/a{b}", "/a|b", "/a^b", "/a`b", "/a[b]", "/a%00b", "/a/%2e%2e%2fadmin", "/a/..%2fadmin",
    "/a/.%2E", "/a/%2e.", "/a/.%252e/b", "/a\\", "/\\admin", "/a/%5c..%5cadmin",
    # A literal "." or ".." segment loses its ";" parameters (Envoy 1.40, CVE-2026-73511); escaped
    # dots and an escaped ";" do not count; escaped slashes and bad characters still reject.
    "/x/..;/admin", "/a/.;x/b", "/a/b/..;", "/a/%2e%2e;/b", "/a/..;a/b", "/a/.;/b", "/a/..;;/b",
    "/a/%2e.;/b", "/a/.%2e;/b", "/a/%2e;/b", "/a/%2E;x/b", "/a/b/.;", "/a/b/..;x", "/a/b/.;x",
    "/a//..;//b", "/a/..;b;/c", "/a/...;/b", "/a/.x;/b", "/a/..x;/b", "/a/;../b", "/a/;/b",
    "/a/..;%2F/b", "/a/..;%2f", "/a/.;%2F/b", "/a/..;%5C/b", "/a/..;%5c/b", "/a/..;?x",
    "/a/..;?x=/..;/", "/a/..;%3b/b", "/a/..%3b/b", "/a/..%3B/b", "/a/b;/..;/c", "/..;/x", "/.;/x",
    "/..;", "/.;", "/a/.;", "/a/..;\\b", "/a/..;\\..;\\b", "/a\\..;\\b", "/a\\..;/b", "/a/b\\..;",
    "/a/..;/..;/b", "/a/..;%2e%2e/b", "/a/..;/%2e%2e/b", "/a/.;;/b", "/a/..;=/b", "/a/..;.;/b",
    "/a/..;..;/b", "/a/..;%00/b", "/a/.;%00", "/a/..;\\x/b", "/a/..;<x>/b", "/a/..;\"x/b",
    "/a/..;{x}/b", "/a/..;%zz/b", "/a/..;%/b", "/a/..;%41/b", "/a/..;./b", "/a/..;../b",
    "//..;/b", "/a/..;//b", "///..;///x", "/a/..,x/b", "/a/..=x/b", "/a/..;x=1;y=2/b",
    "/a/b/c/..;/..;/d", "/a/b/..;/../c", "/a/b/../..;/c", "/a/./..;/b", "/a/.;/..;/b",
    "/a/..;/./b", "/a/b/..;/", "/a/b/.;/", "/..;/..;/x", "/a;b/..;/c", "/a/..;/b;c/..;/d",
    "/a/..;#x", "/a/..;\u00e9/b", "/a/..;\x01/b", "/a/..; x/b", "/a/..;%252F/b",
    # An escaped ";" stays as sent (case kept) and strips nothing, after any dot form: the route
    # that answers 400 (DOT_SEGMENT_PARAMETERS_REGEX) sees exactly these.
    "/a/%2e%2e%3b/b", "/a/%2E%2e%3B/b", "/a/.%3b/b", "/a/.%3B", "/a/%2e.%3bx=1/b", "/..%3b/x",
    "/a/..%3b%2fb", "/a/..%253b/b",
]  # fmt: skip


@pytest.fixture(scope="module")
def normalizing_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with EchoServer("echo") as echo:
        config = static_proxy(echo.port)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]
        hcm.update(
            normalize_path=True,
            merge_slashes=True,
            path_with_escaped_slashes_action="REJECT_REQUEST",
        )
        with EnvoyProcess(config, name="paths", workdir=tmp_path_factory.mktemp("paths")) as envoy:
            yield envoy.listener_port("ingress")


def _through_envoy(port: int, raw: str) -> str | None:
    """The path the backend saw (query dropped), or None when Envoy refused the request.

    Reads only as far as needed: after a 400 Envoy holds the connection open for its delayed
    close timeout (1 s), which would dominate this file's run time."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if int(head.split()[1]) != 200:
            return None
        while chunk := sock.recv(65536):
            body += chunk
    return str(json.loads(body)["path"]).split("?")[0]


@pytest.mark.parametrize("raw", RAW_PATHS)
def test_evaluator_normalizes_like_envoy(normalizing_proxy: int, raw: str) -> None:
    try:
        ours: str | None = normalize_path(raw)
    except PathRejected:
        ours = None
    assert ours == _through_envoy(normalizing_proxy, raw)
