"""The agent's Envoy bootstrap (checked by Envoy itself) and the `agent` / `ca join-token` CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshward.agent.bootstrap import render_agent_bootstrap
from meshward.certs import CertificateAuthority
from meshward.certs.jointoken import load_or_create_key, verify
from meshward.cli import main
from meshward.envoy.process import validate_config
from meshward.xds.agentsds import SDS_CLUSTER
from meshward.xds.bootstrap import XDS_CLUSTER
from meshward.xds.nodeid import NodeId

SERVER = "spiffe://cluster.local/ns/meshward-system/sa/meshward-xds"


def bootstrap() -> dict[str, object]:
    return render_agent_bootstrap(
        NodeId("shop", "orders"), "127.0.0.1", 15010, server_identity=SERVER,
        sds_socket="/tmp/mwa/sds.sock", admin_socket="/tmp/mwa/admin.sock",
    )  # fmt: skip


def test_ads_authenticates_with_the_sds_delivered_svid() -> None:
    config = bootstrap()
    text = json.dumps(config)
    assert "inline_bytes" not in text and "filename" not in text  # no credential in the file
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}  # type: ignore[index]
    assert clusters[SDS_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"] == {"pipe": {"path": "/tmp/mwa/sds.sock"}}  # fmt: skip
    tls = clusters[XDS_CLUSTER]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificate_sds_secret_configs"][0]["name"] == "default"
    source = tls["tls_certificate_sds_secret_configs"][0]["sds_config"]["api_config_source"]
    assert source["grpc_services"] == [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]
    assert tls["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == (
        "ROOTCA"
    )


def test_envoy_accepts_the_bootstrap() -> None:
    ok, output = validate_config(bootstrap())
    assert ok, output


def test_join_token_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CertificateAuthority.init(tmp_path / "ca", "cluster.local")
    args = ["ca", "join-token", "--dir", str(tmp_path / "ca"), "--workload", "shop/orders"]
    assert main([*args, "--ttl", "5m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    claims = verify(load_or_create_key(tmp_path / "ca"), out["token"], workload="shop/orders")
    assert claims.workload == out["workload"] == "shop/orders"
    assert main([*args, "--ttl", "2d"]) == 1
    assert "between 1s and 24h" in capsys.readouterr().err
    assert main(["ca", "join-token", "--dir", str(tmp_path / "none"), "--workload", "a/b"]) == 1
    assert "no Meshward CA" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["ca", "join-token", "--dir", str(tmp_path / "ca"), "--workload", "orders"])
    assert info.value.code == 2


def test_agent_without_svid_or_token_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["agent", "--workload", "shop/orders", "--xds", "127.0.0.1:1",
                 "--dir", str(tmp_path / "s")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "first contact needs --join, --join-token-file and --root-cert" in err
    assert "Traceback" not in err


def test_agent_refused_join_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at --join: a one-line error, exit 1, no traceback."""
    CertificateAuthority.init(tmp_path / "ca", "cluster.local")
    (tmp_path / "t").write_text("mwjoin1.x.y")
    roots = tmp_path / "root.pem"
    roots.write_bytes(CertificateAuthority.load(tmp_path / "ca").trust_bundle().roots_pem)
    code = main(["agent", "--workload", "shop/orders", "--xds", "127.0.0.1:1",
                 "--join", "127.0.0.1:1", "--join-token-file", str(tmp_path / "t"),
                 "--root-cert", str(roots), "--dir", str(tmp_path / "s")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "joining the mesh failed: UNAVAILABLE" in err and "Traceback" not in err


@pytest.mark.parametrize("configure", ["agent", "bootstrap"])
def test_delta_ads_is_the_default_and_sotw_opts_out(configure: str) -> None:
    """Delta by default (a change travels as the resources it changed), as Istio's sidecars
    since 1.22; --sotw for control planes without it; both at once is an error."""
    import argparse

    from meshward.agent import bootstrap_cli, cli

    module = cli if configure == "agent" else bootstrap_cli
    parser = argparse.ArgumentParser()
    module.configure(parser)
    required = ["--workload", "shop/orders", "--xds", "127.0.0.1:15010"]
    required += ["--dir", "d"] if configure == "agent" else []
    assert parser.parse_args(required).delta is True
    assert parser.parse_args([*required, "--delta"]).delta is True
    assert parser.parse_args([*required, "--sotw"]).delta is False
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--sotw", "--delta"])
    assert "--sotw" in parser.format_help()
    assert render_agent_bootstrap(
        NodeId("shop", "orders"), "127.0.0.1", 15010, server_identity=SERVER,
        sds_socket="/tmp/mwa/sds.sock", admin_socket="/tmp/mwa/admin.sock",
    )["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"  # type: ignore[index]  # fmt: skip
