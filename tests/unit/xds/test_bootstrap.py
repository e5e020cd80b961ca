"""Sidecar bootstraps: accepted by `envoy --mode validate`, ADS-only, secrets from files or an agent."""

from __future__ import annotations

import json
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
    """The operator-run form: the ADS client certificate and the trust bundle through
    file-based SDS (the files `meshward bootstrap` keeps), named in the node metadata."""
    from meshward.agent.identity import BUNDLE_FILE, SVID_FILE
    from meshward.xds.filesds import secret_documents

    ca = CertificateAuthority.load(ca_dir)
    svid = ca.issue("spiffe://cluster.local/ns/shop/sa/orders")  # (a test's own key)
    (tmp_path / SVID_FILE).write_bytes(svid.private_key_pem + svid.cert_chain_pem)
    (tmp_path / BUNDLE_FILE).write_bytes(ca.trust_bundle().roots_pem)
    for name, text in secret_documents(str(tmp_path), SVID_FILE, BUNDLE_FILE).items():
        (tmp_path / name).write_text(text)
    config = render_bootstrap(
        NodeId("shop", "orders", "2"),
        "127.0.0.1",
        15010,
        server_identity=SERVER,
        secrets_dir=str(tmp_path),
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
        "metadata": {
            "meshward.dev/workload": "shop/orders",
            "meshward.dev/instance": "2",
            "meshward.dev/secrets-dir": str(tmp_path),
        },
    }
    assert config["admin"]["address"] == {"pipe": {"path": "admin.sock", "mode": 0o600}}
    [cluster] = config["static_resources"]["clusters"]  # ADS only: nothing else is static
    assert cluster["name"] == "meshward-xds"
    assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    combined = tls["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"][0][
        "matcher"
    ] == {"exact": SERVER}
    [cert] = tls["tls_certificate_sds_secret_configs"]
    assert cert["sds_config"]["path_config_source"] == {
        "path": f"{tmp_path}/sds-default.json",
        "watched_directory": {"path": str(tmp_path)},
    }
    assert "inline_bytes" not in json.dumps(config)  # no key material in the bootstrap


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


def test_bootstrap_command_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bootstrap", "--workload", "orders", "--xds", "127.0.0.1:1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["bootstrap", "--workload", "shop/orders", "--xds", "nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
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
