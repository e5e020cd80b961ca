"""The control plane's JWKS fetcher (meshward.xds.jwks): file:// and http(s):// (a real local
HTTP server), last good keys kept on failure and reported, bounded, and the compiled jwt_authn
provider follows the keys (re-push when they rotate)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.compile import CompileOptions
from meshward.compile.authz.jwt_authn import NO_KEYS_JWKS
from meshward.policy import parse
from meshward.xds import jwks
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.controlplane import ControlPlane

KEYS_A = {"keys": [{"kty": "oct", "kid": "a", "k": "c2VjcmV0"}]}
KEYS_B = {"keys": [{"kty": "oct", "kid": "b", "k": "c2VjcmV0"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[dict[str, Any]]:
    """A real HTTP server: ``state['body']`` and ``state['status']`` say what it answers."""
    state: dict[str, Any] = {"body": json.dumps(KEYS_A).encode(), "status": 200, "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["hits"] += 1
            self.send_response(state["status"])
            self.send_header("content-length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["uri"] = f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_http_fetch_keeps_the_last_good_keys_and_reports_the_failure(
    server: dict[str, Any],
) -> None:
    clock = Clock()
    cache = jwks.JwksCache(clock=clock, refresh_interval=300, retry_interval=10)
    uri = server["uri"]
    assert cache.refresh([uri]) is True
    assert json.loads(cache.documents[uri]) == KEYS_A
    assert cache.refresh([uri]) is False and server["hits"] == 1  # not due yet
    server["status"] = 500
    clock.now += 300
    assert cache.refresh([uri]) is False  # failed: the last good keys stay
    assert json.loads(cache.documents[uri]) == KEYS_A
    status = cache.status()
    assert status["failing"] == [uri] and "HTTP 500" in status["uris"][uri]["error"]
    assert status["uris"][uri]["keys"] is True
    server["status"], server["body"] = 200, json.dumps(KEYS_B).encode()
    clock.now += 5
    assert cache.refresh([uri]) is False and server["hits"] == 2  # retry not due yet
    clock.now += 5
    assert cache.refresh([uri]) is True  # rotated: push again
    assert json.loads(cache.documents[uri]) == KEYS_B and cache.status()["failing"] == []
    assert cache.fetches == {"ok": 2, "error": 1}


@pytest.mark.parametrize(
    "body,error",
    [
        (b"not json", "not JSON"),
        (b'{"keys": []}', "no key"),
        (b"[1]", "not a JWKS"),
        (b"{" + b" " * (jwks.MAX_DOCUMENT_BYTES + 1) + b"}", "larger than"),
    ],
)
def test_bad_documents_are_refused(server: dict[str, Any], body: bytes, error: str) -> None:
    server["body"] = body
    cache = jwks.JwksCache()
    assert cache.refresh([server["uri"]]) is False and cache.documents == {}
    assert error in cache.status()["uris"][server["uri"]]["error"]


def test_file_uris_unsupported_schemes_and_the_uri_bound(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(KEYS_A))
    cache = jwks.JwksCache()
    cache.refresh(["ftp://idp/jwks"])
    assert "unsupported scheme" in cache.status()["uris"]["ftp://idp/jwks"]["error"]
    many = [f"file:///zz-missing-{i:03}.json" for i in range(jwks.MAX_URIS + 5)]
    assert cache.refresh([path.as_uri(), *many]) is True
    status = cache.status()
    assert list(cache.documents) == [path.as_uri()]
    assert len(status["uris"]) == jwks.MAX_URIS and len(status["not_fetched_over_limit"]) == 6
    assert cache.refresh([path.as_uri()]) is False  # the others dropped, documents unchanged
    assert list(cache.status()["uris"]) == [path.as_uri()]


POLICY = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  jwtRules: [{issuer: "https://idp", jwksUri: "%s"}]
"""


def _provider_keys(control: ControlPlane) -> bytes:
    """The serialized listeners of shop/api (the JWKS is inlined in them)."""
    resources = control.configs["shop/api"].resources
    listeners = resources["type.googleapis.com/envoy.config.listener.v3.Listener"]
    return b"".join(r.body.value for r in listeners)


def test_the_control_plane_inlines_the_keys_and_repushes_on_rotation(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(KEYS_A))
    policy = parse({"p.yaml": POLICY % path.as_uri()})
    cache = jwks.JwksCache(refresh_interval=0)
    compiler = compiler_for(CompileOptions(), jwks=cache)
    assert jwks.jwks_uris(policy) == [path.as_uri()]
    cache.refresh(jwks.jwks_uris(policy))
    ca = CertificateAuthority.ephemeral("cluster.local")
    control = ControlPlane(
        policy, ca, compiler, wall_clock=lambda: datetime(2030, 1, 1, tzinfo=UTC)
    )
    assert b'"kid":"a"' in _provider_keys(control)
    path.write_text(json.dumps(KEYS_B))
    assert cache.refresh(jwks.jwks_uris(policy)) is True
    assert control.refresh() == {"shop/api"}  # rotated keys: pushed again
    assert b'"kid":"b"' in _provider_keys(control)
    path.unlink()  # the IdP goes away: the last good keys stay, nothing to push
    assert cache.refresh(jwks.jwks_uris(policy)) is False
    assert control.refresh() == set()
    assert NO_KEYS_JWKS.encode() not in _provider_keys(control)


def test_the_service_fetches_before_the_first_compile_and_reports_failures(
    tmp_path: Path,
) -> None:
    from meshward.xds.service import XdsService

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(KEYS_A))
    second = ("---\n" + POLICY.split("---")[1].replace("name: jwt,", "name: jwt2,")) % bad.as_uri()
    text = POLICY % good.as_uri() + second.replace("https://idp", "https://other")
    policy = parse({"p.yaml": text})
    service = XdsService(
        policy, CertificateAuthority.ephemeral("cluster.local"), compiler_for(CompileOptions())
    )
    status = service.status()["jwks"]
    assert status["uris"][good.as_uri()]["keys"] is True  # fetched before the first compile
    assert status["failing"] == [bad.as_uri()] and status["uris"][bad.as_uri()]["keys"] is False
    assert b'"kid":"a"' in _provider_keys(service.control)
    metrics = service.metrics.exposition().decode()
    assert 'meshward_xds_jwks_fetches_total{result="error"} 1.0' in metrics
    assert "meshward_xds_jwks_failing 1.0" in metrics


def test_serve_jwks_refresh_flag_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    from meshward.cli import main

    for bad in ("0s", "nonsense"):
        with pytest.raises(SystemExit) as exit_info:
            main(["xds", "serve", "--jwks-refresh", bad])
        assert exit_info.value.code == 2
        assert "--jwks-refresh" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["xds", "serve", "--help"])
    assert "--jwks-refresh" in capsys.readouterr().out
