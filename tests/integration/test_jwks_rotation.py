"""JWKS through the control plane to real Envoy sidecars (issue 16): the control plane fetches the
jwksUri, inlines the keys into the jwt_authn provider and re-pushes when they rotate; when the
identity provider goes away the last good keys keep verifying and status says so."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshward.testing.jwt_issuer import LocalIssuer
from meshward.testing.mesh import Mesh

FRONTEND, API = "shop/frontend", "shop/api"
ISSUER = "https://idp.example.com"
POLICIES = """
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, rootNamespace: meshward-system}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: meshward-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: users, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  jwtRules: [{issuer: "%(issuer)s", jwksUri: "%(uri)s"}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-users, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"],
                       requestPrincipals: ["%(issuer)s/*"]}}]
"""


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Mesh, Path, LocalIssuer]]:
    root = tmp_path_factory.mktemp("jwks")
    jwks = root / "jwks.json"
    policies = root / "policies"
    policies.mkdir()
    (policies / "mesh.yaml").write_text(POLICIES % {"issuer": ISSUER, "uri": jwks.as_uri()})
    old = LocalIssuer(ISSUER, kid="old")
    jwks.write_text(old.jwks_json())
    mesh = Mesh(policies, root, [FRONTEND, API], jwks_refresh_interval=0.2)
    try:
        mesh.start()
        yield mesh, jwks, old
    finally:
        mesh.stop()


def _call(mesh: Mesh, token: str | None) -> int:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return mesh.request(FRONTEND, API, "/x", headers=headers)[0]


def _until(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_keys_are_inlined_rotated_and_kept_when_the_idp_goes_away(
    setup: tuple[Mesh, Path, LocalIssuer],
) -> None:
    mesh, jwks, old = setup
    new = LocalIssuer(ISSUER, kid="new")
    assert _call(mesh, old.token("alice")) == 200  # keys fetched before the first push
    assert _call(mesh, None) == 403  # no token: no request principal
    assert _call(mesh, new.token("alice")) == 401  # not a key the sidecar has (yet)
    version = mesh.status()["policy"]["version"]

    jwks.write_text(new.jwks_json())  # the identity provider rotates its keys
    _until(lambda: _call(mesh, new.token("alice")) == 200, "the rotated keys to be pushed")
    assert _call(mesh, old.token("alice")) == 401  # the old key is gone from the JWKS
    status = mesh.status()
    assert status["policy"]["version"] == version  # same policy, new keys: a re-push
    assert status["jwks"]["uris"][jwks.as_uri()]["keys"] and not status["jwks"]["failing"]

    jwks.unlink()  # the identity provider goes away: the last good keys stay
    _until(lambda: mesh.status()["jwks"]["failing"] == [jwks.as_uri()], "the failure in status")
    assert _call(mesh, new.token("alice")) == 200
    metrics = mesh.xds.service.metrics.exposition().decode()
    assert "meshward_xds_jwks_failing 1.0" in metrics
    assert json.dumps(mesh.status()["jwks"]).count("No such file") >= 1
