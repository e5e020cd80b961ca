"""Sidecar bootstraps: accepted by `envoy --mode validate`, ADS-only, credentials written safely."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from meshward.certs import CertificateAuthority
from meshward.cli import main
from meshward.compile import runtime_bindings
from meshward.envoy.process import validate_config
from meshward.policy import parse
from meshward.xds.bootstrap import AdsCredentials, render_bootstrap
from meshward.xds.cli import dump_bindings, load_bindings
from meshward.xds.nodeid import NodeId

SERVER = "spiffe://cluster.local/ns/meshward-system/sa/meshward-xds"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca") / "ca"
    CertificateAuthority.init(directory, "cluster.local")
    return directory


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_rendered_bootstrap_validates_with_envoy(tmp_path: Path, ca_dir: Path, delta: bool) -> None:
    ca = CertificateAuthority.load(ca_dir)
    svid = ca.issue("spiffe://cluster.local/ns/shop/sa/orders")
    for name, data in (
        ("xds-cert.pem", svid.cert_chain_pem),
        ("xds-key.pem", svid.private_key_pem),
        ("xds-ca.pem", ca.trust_bundle().roots_pem),
    ):
        (tmp_path / name).write_bytes(data)
    config = render_bootstrap(
        NodeId("shop", "orders", "2"),
        "127.0.0.1",
        15010,
        server_identity=SERVER,
        credentials=AdsCredentials.in_directory(tmp_path),
        delta=delta,
    )
    ok, output = validate_config(config)
    assert ok, output
    ads = config["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == ("DELTA_GRPC" if delta else "GRPC")
    assert ads["set_node_on_first_message_only"] is True
    assert config["node"] == {
        "id": "shop/orders/2",
        "cluster": "orders.shop",
        "metadata": {"meshward.dev/workload": "shop/orders", "meshward.dev/instance": "2"},
    }
    assert config["admin"]["address"] == {"pipe": {"path": "admin.sock", "mode": 0o600}}
    [cluster] = config["static_resources"]["clusters"]  # ADS only: nothing else is static
    assert cluster["name"] == "meshward-xds"
    assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": SERVER
    }


def test_inline_credentials_validate(ca_dir: Path) -> None:
    ca = CertificateAuthority.load(ca_dir)
    svid = ca.issue("spiffe://cluster.local/ns/shop/sa/orders")
    credentials = AdsCredentials(
        svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem
    )
    config = render_bootstrap(
        NodeId("shop", "orders"), "127.0.0.1", 1, server_identity=SERVER, credentials=credentials
    )
    ok, output = validate_config(config)
    assert ok, output


def test_bootstrap_command_writes_config_and_credentials(
    tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sc"  # short: admin.sock below must fit a Unix socket path (107 bytes)
    code = main(
        ["bootstrap", "--workload", "shop/orders", "--xds", "127.0.0.1:15010", "--ca", str(ca_dir),
         "--out", str(out), "--instance", "a", "--delta", "--ttl", "2h"]
    )  # fmt: skip
    assert code == 0
    directory = out / "orders.shop.a"
    config = json.loads((directory / "envoy.json").read_text())
    assert config["node"]["id"] == "shop/orders/a"
    assert config["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert stat.S_IMODE((directory / "xds-key.pem").stat().st_mode) == 0o600
    from cryptography import x509

    from meshward.certs.verify import spiffe_id_of

    leaf = x509.load_pem_x509_certificate((directory / "xds-cert.pem").read_bytes())
    assert str(spiffe_id_of(leaf)) == "spiffe://cluster.local/ns/shop/sa/orders"
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 2 * 3600 <= lifetime.total_seconds() <= 2 * 3600 + 120
    assert "--drain-strategy immediate" in capsys.readouterr().out
    ok, output = validate_config(config)
    assert ok, output


def test_bootstrap_command_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bootstrap", "--workload", "orders", "--xds", "127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert (
        main(["bootstrap", "--workload", "shop/orders", "--xds", "nope", "--out", str(tmp_path)])
        == 1
    )
    assert "HOST:PORT" in capsys.readouterr().err


def test_bindings_file_round_trip(tmp_path: Path) -> None:
    policy = parse(
        {
            "w.yaml": "".join(
                f"---\napiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {{name: {n}, namespace: shop}}\n"
                "spec: {ports: [{name: http, port: 8080}]}\n"
                for n in ("a", "b")
            )
        }
    )
    bindings = runtime_bindings(policy.workloads, iter(range(20000, 20100)))
    path = tmp_path / "bindings.json"
    path.write_text(json.dumps(dump_bindings(bindings)))
    assert load_bindings(path) == bindings
