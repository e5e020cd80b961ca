"""MeshConfig spec.jwtEnforcement (issue 16): native by default (jwt_authn + RBAC), extauthz
on request (kept for comparison), anything else an error; the default keeps every version."""

from __future__ import annotations

import pytest

from meshward.policy import PolicyError, parse
from meshward.policy.canonical import mesh_document
from meshward.policy.model import JwtEnforcement

MESH = """\
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local%s}
"""


def test_native_is_the_default_and_keeps_versions() -> None:
    plain = parse({"m.yaml": MESH % ""})
    native = parse({"m.yaml": MESH % ", jwtEnforcement: native"})
    legacy = parse({"m.yaml": MESH % ", jwtEnforcement: extauthz"})
    assert plain.mesh.jwt_enforcement is JwtEnforcement.NATIVE
    assert legacy.mesh.jwt_enforcement is JwtEnforcement.EXTAUTHZ
    assert plain.version == native.version != legacy.version
    assert mesh_document(legacy.mesh)["spec"]["jwtEnforcement"] == "extauthz"
    assert "jwtEnforcement" not in mesh_document(plain.mesh)["spec"]


def test_an_unknown_value_is_an_error_naming_the_choices() -> None:
    with pytest.raises(PolicyError, match="native, extauthz") as info:
        parse({"m.yaml": MESH % ", jwtEnforcement: envoy"})
    assert "spec.jwtEnforcement" in str(info.value)
