"""`meshward policy compile`: config out, or rule-by-rule explanation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshward.cli import main

ROOT = Path(__file__).resolve().parents[3]
POLICY = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {ports: [{port: 8080}, {port: 5432, protocol: TCP}]}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {ports: [{port: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
    to: [{operation: {methods: ["GET"]}}]
  - when: [{key: "request.auth.claims[groups]", values: ["admins"]}]
"""


EXTAUTHZ_MESH = """
---
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {jwtEnforcement: extauthz}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    """JWT rules decided in ext_authz (jwtEnforcement: extauthz), the comparison path."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY + EXTAUTHZ_MESH)
    return path


def test_explain_says_jwt_rules_are_native_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "native.yaml"
    path.write_text(POLICY)
    argv = ["policy", "compile", str(path), "--workload", "shop/api", "--explain"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ext_authz filter: no" in out
    lines = [line for line in out.splitlines() if "shop/allow rule[" in line]
    assert "native" in lines[1] and "jwt_authn's payload" in lines[1]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["placement"] for r in data["rules"]] == ["native", "native"]
    assert data["extauthz_filter"] is False and data["jwt_authn_filter"] is False  # no RA


def test_explain_says_where_each_rule_runs(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "compile", str(policy_file), "--workload", "shop/api", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "ext_authz filter: yes" in out
    assert "ALLOW union" in out
    lines = [line for line in out.splitlines() if "shop/allow rule[" in line]
    assert "native" in lines[0] and "RBAC ALLOW" in lines[0]
    assert "ext_authz" in lines[1] and "request.auth.claims[groups]" in lines[1]
    assert "TCP ports" in out and "inert" in out


def test_explain_json(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["policy", "compile", str(policy_file), "--workload", "shop/api", "--explain", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["extauthz_filter"] is True
    assert [r["placement"] for r in data["rules"]] == ["native", "ext_authz"]
    assert data["rules"][0]["rbac_policy"] == "ns[shop]-policy[allow]-rule[0]"
    assert data["rules"][0]["principal_index"] is False  # one rule: below the index threshold
    assert [(p["port"], p["protocol"]) for p in data["ports"]] == [(5432, "TCP"), (8080, "HTTP")]


def test_json_prints_envoy_resources(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["policy", "compile", str(policy_file), "--workload", "shop/api", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    names = [listener["name"] for listener in data["listeners"]]
    assert "inbound|8080|api.shop" in names and "outbound|8080||web.shop" in names
    assert {c["name"] for c in data["clusters"]} >= {"meshward-extauthz", "inbound|8080||api.shop"}
    assert data["secret_names"] == ["ROOTCA", "default"]


def test_text_summary_and_static_mode(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["policy", "compile", str(policy_file), "--workload", "shop/web", "--mode", "static"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mode static" in out and "outbound|8080||api.shop" in out


def test_unknown_workload_is_a_one_line_user_error(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "compile", str(policy_file), "--workload", "shop/nope"]) == 1
    err = capsys.readouterr().err
    assert "no workload shop/nope" in err and "shop/api" in err and "Traceback" not in err


def test_bad_workload_ref_is_a_usage_error(policy_file: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["policy", "compile", str(policy_file), "--workload", "nope"])
    assert exit_info.value.code == 2


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["policy", "compile", "--help"])
    out = capsys.readouterr().out
    assert "--explain" in out and "examples:" in out and "ext_authz" in out


def test_endpoint_parsing() -> None:
    from meshward.compile import Endpoint
    from meshward.errors import UserError

    assert Endpoint.parse("127.0.0.1:9191") == Endpoint("127.0.0.1", 9191)
    assert Endpoint.parse("[::1]:80") == Endpoint("::1", 80)
    for bad in ("nohost", "x:0", "x:70000", ":80", "x:y"):
        with pytest.raises(UserError, match="HOST:PORT"):
            Endpoint.parse(bad)


def test_bad_extauthz_address_is_a_user_error(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["policy", "compile", str(policy_file), "--workload", "shop/api", "--extauthz", "x"]
    assert main(argv) == 1
    assert "HOST:PORT" in capsys.readouterr().err
