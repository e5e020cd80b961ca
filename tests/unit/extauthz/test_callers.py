"""ext_authz's doors (issue 13): Check only over mTLS, only from a mesh sidecar identity, only
about the caller's own workload; anything else is refused before the decision cache and the
decision log. Real gRPC, real certificates from a real CA."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from meshward.certs.ca import CertificateAuthority
from meshward.cli import main
from meshward.errors import UserError
from meshward.extauthz.callers import (
    NO_IDENTITY,
    NO_WORKLOAD,
    NOT_A_WORKLOAD,
    OTHER_WORKLOAD,
    caller_refusal,
    identities,
)
from meshward.extauthz.client import CheckClient, CheckFailed, build_check_request
from meshward.extauthz.server import Running, ServeOptions, start_service
from meshward.policy import load
from meshward.testing.extauthz import HTTPBIN_YAML, client_for, issue_tls, start_mtls

TD = "cluster.local"
HTTPBIN = f"spiffe://{TD}/ns/foo/sa/httpbin"
OTHER = f"spiffe://{TD}/ns/bar/sa/other"
POLICY = (
    HTTPBIN_YAML
    + """---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: other, namespace: bar, labels: {app: other}}
spec: {ports: [{name: http, port: 8000}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: never-called}
  rules: [{to: [{operation: {paths: ["/never*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: paths, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{to: [{operation: {paths: ["/public*"]}}]}]
"""
)


# ---- the pure rule -----------------------------------------------------------------------------


def test_caller_refusal_table(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    index = identities(load([tmp_path]))

    def refusal(peer: str | None, **kw: Any) -> str | None:
        found = caller_refusal(index, peer, build_check_request(**kw))
        return None if found is None else found[0]

    assert refusal(None, workload="foo/httpbin") == NO_IDENTITY
    assert refusal(f"spiffe://{TD}/ns/x/sa/nobody", workload="foo/httpbin") == NOT_A_WORKLOAD
    assert refusal("spiffe://evil.example/ns/foo/sa/httpbin", workload="foo/httpbin") == NOT_A_WORKLOAD  # fmt: skip
    assert refusal(HTTPBIN, workload="bar/other") == OTHER_WORKLOAD
    assert refusal(HTTPBIN, workload="foo/httpbin", destination_principal=OTHER) == OTHER_WORKLOAD
    assert refusal(HTTPBIN, destination_principal=OTHER) == OTHER_WORKLOAD
    assert refusal(HTTPBIN) == NO_WORKLOAD
    assert refusal(HTTPBIN, workload="foo/httpbin") is None
    assert refusal(HTTPBIN, workload="foo/httpbin", destination_principal=HTTPBIN) is None
    assert refusal(HTTPBIN, destination_principal=HTTPBIN) is None


# ---- the real service --------------------------------------------------------------------------


@dataclass
class Served:
    running: Running
    ca: CertificateAuthority
    policy: Any
    dir: Path
    decision_log: Path

    def client(self, spiffe_id: str, name: str) -> CheckClient:
        return client_for(self.ca, spiffe_id, self.dir / name, self.running.port, self.policy.mesh)

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.decision_log.exists():
            return []
        return [json.loads(line) for line in self.decision_log.read_text().splitlines()]


@pytest.fixture(scope="module", params=["sync", "aio"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("doors")
    (root / "policies").mkdir()
    (root / "policies" / "p.yaml").write_text(POLICY)
    policy = load([root / "policies"])
    ca = CertificateAuthority.ephemeral(TD)
    log = root / "decisions.jsonl"
    options = ServeOptions(
        policy_paths=[root / "policies"],
        decision_log=log,
        log_allows=True,
        poll_interval=60,
        kind=request.param,
    )
    running = start_mtls(options, ca, policy.mesh, root)
    try:
        yield Served(running, ca, policy, root, log)
    finally:
        running.stop()


def _check(client: CheckClient, **kw: Any) -> Any:
    async def run() -> Any:
        try:
            return await client.check(build_check_request(**kw), timeout=5)
        finally:
            client.close()

    return asyncio.run(run())


def test_the_own_workload_is_answered_and_logged(served: Served) -> None:
    before = len(served.log_lines())
    allowed = _check(served.client(HTTPBIN, "httpbin"), path="/public/x", workload="foo/httpbin")
    denied = _check(
        served.client(HTTPBIN, "httpbin2"),
        path="/private",
        workload="foo/httpbin",
        destination_principal=HTTPBIN,
    )
    assert allowed.status.code == 0 and denied.status.code == 7
    assert len(served.log_lines()) == before + 2


def test_refused_callers_reach_neither_cache_nor_log(served: Served) -> None:
    authorizer = served.running.authorizer
    lines, misses, hits = (
        len(served.log_lines()),
        authorizer.cache.stats.misses,
        authorizer.cache.stats.hits,
    )
    refused_before = served.running.metrics.refused.labels(OTHER_WORKLOAD)._value.get()
    cases = [
        (OTHER, "bar-as-foo", {"workload": "foo/httpbin"}),  # another workload's sidecar
        (HTTPBIN, "foo-about-bar", {"workload": "bar/other"}),  # asking about someone else
        (HTTPBIN, "foo-dest-bar", {"workload": "foo/httpbin", "destination_principal": OTHER}),
    ]
    for identity, name, kw in cases:
        with pytest.raises(CheckFailed, match=r"PERMISSION_DENIED.*own workload"):
            _check(served.client(identity, name), path="/public/x", **kw)
    with pytest.raises(CheckFailed, match=r"PERMISSION_DENIED.*not the identity of a workload"):
        _check(
            served.client(f"spiffe://{TD}/ns/x/sa/nobody", "nobody"),
            path="/",
            workload="foo/httpbin",
        )
    assert len(served.log_lines()) == lines  # nothing written
    assert (authorizer.cache.stats.misses, authorizer.cache.stats.hits) == (misses, hits)
    assert served.running.metrics.refused.labels(OTHER_WORKLOAD)._value.get() == refused_before + 3


def test_plaintext_and_foreign_certificates_do_not_get_in(served: Served) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.running.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(build_check_request(path="/public", workload="foo/httpbin"), timeout=3)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    stranger = CertificateAuthority.ephemeral(TD)  # same trust domain, another CA
    key, chain, _ = issue_tls(stranger, HTTPBIN, served.dir / "stranger").read()
    client = CheckClient(
        "127.0.0.1",
        served.running.port,
        cert_chain_pem=chain,
        key_pem=key,
        roots_pem=served.ca.trust_bundle().roots_pem,
        server_id=None,
    )
    with pytest.raises(CheckFailed):
        _check(client, path="/public", workload="foo/httpbin")


def test_serving_needs_the_extauthz_identity(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    with pytest.raises(UserError, match="only over mTLS"):
        start_service(ServeOptions(policy_paths=[tmp_path]))
    ca = CertificateAuthority.ephemeral(TD)
    files = issue_tls(ca, HTTPBIN, tmp_path / "wrong")
    with pytest.raises(UserError, match="sa/meshward-extauthz"):
        start_service(ServeOptions(policy_paths=[tmp_path], tls_dir=files.directory))
    assert (
        main(["extauthz", "serve", "--policy", str(tmp_path), "--tls-dir", str(tmp_path / "nope")])
        == 1
    )


def test_check_command_json_and_exit_codes(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = issue_tls(served.ca, HTTPBIN, served.dir / "cli").directory
    base = ["extauthz", "check", "--server", f"127.0.0.1:{served.running.port}", "--tls-dir", str(tls), "--workload", "foo/httpbin"]  # fmt: skip
    assert main([*base, "--path", "/public/a"]) == 0
    assert capsys.readouterr().out.startswith("allow 200")
    assert main([*base, "--path", "/private", "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["allowed"] is False and answer["http_status"] == 403
    assert answer["body"]["code"] == "no_matching_allow" and "policy" not in answer["body"]
    assert main([*base, "--path", "/private"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("deny 403") and "code: no_matching_allow" in out
    # Asking about another workload: refused, one line on stderr, exit 1.
    other = [*base[:-1], "bar/other"]
    assert main([*other, "--path", "/public"]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "Traceback" not in err


def test_the_compiled_extauthz_cluster_is_mtls_pinned_to_the_extauthz_identity() -> None:
    """Envoy presents the workload's SVID (SDS default) and accepts only ext_authz's SPIFFE ID."""
    from meshward.compile import CompileOptions, Endpoint, compile_workload
    from meshward.compile.workload import to_dict
    from meshward.policy.model import JwtEnforcement
    from meshward.testing.jwt import with_jwt_enforcement

    root = Path(__file__).resolve().parents[3]
    # payments' JWT rules in ext_authz (natively, payments would have no ext_authz at all)
    policy = with_jwt_enforcement(load([root / "examples"]), JwtEnforcement.EXTAUTHZ)
    built = compile_workload(
        policy, "shop/payments", CompileOptions(extauthz=Endpoint("127.0.0.1", 9191))
    )
    (cluster,) = [c for c in map(to_dict, built.clusters) if c["name"] == "meshward-extauthz"]
    tls = cluster["transport_socket"]["typed_config"]
    common = tls["common_tls_context"]
    assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["default"]
    sans = common["combined_validation_context"]["default_validation_context"]
    assert sans["match_typed_subject_alt_names"] == [
        {
            "san_type": "URI",
            "matcher": {"exact": "spiffe://cluster.local/ns/meshward-system/sa/meshward-extauthz"},
        }
    ]
    assert "default" in built.secret_names and "ROOTCA" in built.secret_names


def test_serve_with_ca_follows_a_root_rotation(tmp_path: Path) -> None:
    """`serve --ca`: ext_authz issues its own SVID and, when the CA rotates on disk, trusts the
    sidecars' new-root SVIDs (its bundle follows) without a restart."""
    import time

    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY)
    policy = load([tmp_path / "policies"])
    CertificateAuthority.init(tmp_path / "ca", TD)
    running = start_service(
        ServeOptions(
            policy_paths=[tmp_path / "policies"], ca_dir=tmp_path / "ca", poll_interval=0.2
        )
    )
    try:

        def ask(name: str) -> int:
            ca = CertificateAuthority.load(tmp_path / "ca")
            client = client_for(ca, HTTPBIN, tmp_path / name, running.port, policy.mesh)
            return int(_check(client, path="/public/x", workload="foo/httpbin").status.code)

        assert ask("before") == 0
        assert main(["ca", "rotate", "--dir", str(tmp_path / "ca"), "--grace", "1h"]) == 0
        deadline = time.monotonic() + 15
        while True:  # the service polls the CA once a second
            try:
                assert ask("after") == 0
                break
            except CheckFailed:
                assert time.monotonic() < deadline, "new-root SVIDs still refused"
                time.sleep(0.2)
    finally:
        running.stop()


def test_ca_credentials_follow_the_ca_on_disk_with_the_control_planes_certificate(
    tmp_path: Path,
) -> None:
    """`serve --ca`'s certificate is the control plane's class: a rotation on disk re-trusts
    clients and keeps the served certificate (old-bundle sidecars still accept it) until the
    old root is dropped; half life renews it."""
    from datetime import UTC, datetime, timedelta

    from meshward.certs.pem import load_certificates
    from meshward.extauthz.callers import CaCredentials

    def served() -> tuple[int, int, int]:  # (serial, issuing generation, roots)
        _, chain, roots = tls.current()
        leaf = load_certificates(chain, "served")[0]
        generation = issuer.ca.issuing_generation(leaf)
        assert generation is not None
        return leaf.serial_number, generation.number, len(load_certificates(roots, "roots"))

    ext_authz = f"spiffe://{TD}/ns/meshward-system/sa/meshward-extauthz"
    CertificateAuthority.init(tmp_path / "ca", TD)
    issuer = CaCredentials(tmp_path / "ca", ext_authz)
    now = datetime.now(UTC)
    tls = issuer.make_tls(now)
    serial, generation, roots = served()
    assert (generation, roots) == (1, 1)
    assert issuer.certificate.svid.spiffe_id == ext_authz
    issuer.maintain(now)
    assert served() == (serial, 1, 1)  # nothing changed, nothing due

    CertificateAuthority.load(tmp_path / "ca").rotate(grace=timedelta(hours=2), now=now)
    issuer.maintain(now)
    assert served() == (serial, 1, 2)  # re-trusted, same certificate

    renewal = now + timedelta(minutes=40)  # past 50% +- 10% of its hour
    issuer.maintain(renewal)
    renewed, generation, roots = served()
    assert renewed != serial and (generation, roots) == (1, 2)  # oldest trusted still signs

    after_grace = now + timedelta(hours=3)
    issuer.maintain(after_grace)
    assert served()[1:] == (2, 1)
