"""ext_authz with a real Envoy in front of an echo backend, the service running as a real
`meshward extauthz serve` process, Envoy and the service both tracing to an in-test OTLP
receiver. One Envoy and one service for the whole module (tens of seconds in total).

Static Envoy config (meshward.extauthz.envoyconfig) with the same ext_authz settings the
compiler emits: fail closed, per-route context_extensions naming the workload.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshward.certs.ca import CertificateAuthority
from meshward.envoy.process import EnvoyProcess
from meshward.extauthz.envoyconfig import sidecar
from meshward.policy import load
from meshward.telemetry.collector import OtlpReceiver
from meshward.testing.echo import EchoServer
from meshward.testing.extauthz import (
    ADMINS_YAML,
    HTTPBIN_YAML,
    issue_service_tls,
    mesh_yaml,
    sidecar_tls,
)
from meshward.testing.jwt_issuer import LocalIssuer, unsigned_token
from meshward.testing.processes import Launcher, meshward_argv
from meshward.testing.waiting import wait_until

WORKLOAD = "foo/httpbin"

# Development mode: denial bodies name policy, rule and reason (the default is quiet; see
# tests/adversarial/test_hostile_requests.py), so this module can check them end to end.
WORKLOAD_YAML = HTTPBIN_YAML + "---\n" + mesh_yaml(verbose=True)
REPORTS_YAML = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reports, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: ["/reports*"]}}]
    when: [{key: "request.auth.claims[groups]", values: ["dev"]}]
"""


class _JwksServer:
    """The issuer's JWKS over HTTP on loopback, as an identity provider serves it."""

    def __init__(self, body: str) -> None:
        data = body.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"

    def __enter__(self) -> _JwksServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class ExtAuthzProcess:
    """`python -m meshward extauthz serve` as a child process; restartable on the same port."""

    def __init__(self, workdir: Path, policy_dir: Path, otlp_endpoint: str, tls_dir: Path) -> None:
        self.workdir = workdir
        self.tls_dir = tls_dir
        self.policy_dir = policy_dir
        self.otlp_endpoint = otlp_endpoint
        self.decision_log = workdir / "decisions.jsonl"
        self.port = 0
        self.metrics_port = 0
        self.launcher = Launcher(workdir, quiet=True)

    def start(self) -> None:
        ready = self.workdir / "ready.json"
        argv = meshward_argv(
            "extauthz", "serve",
            "--policy", str(self.policy_dir),
            "--listen", f"127.0.0.1:{self.port}",
            # one process: these tests read one decision cache (a second worker has its own)
            "--workers", "1",
            "--tls-dir", str(self.tls_dir),
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--otlp-endpoint", self.otlp_endpoint,
            "--decision-log", str(self.decision_log),
            "--poll-interval", "0.1",
            "--ready-file", str(ready),
        )  # fmt: skip
        info = self.launcher.start("extauthz", argv, ready_path=ready)
        self.port = int(info["listen"].rsplit(":", 1)[1])
        self.metrics_port = int(info["metrics"].rsplit(":", 1)[1])

    def kill(self) -> None:
        if "extauthz" in self.launcher.components:
            self.launcher.kill("extauthz")

    def stop(self) -> None:
        if "extauthz" in self.launcher.components:
            self.launcher.stop("extauthz", 10)

    def log_tail(self, lines: int = 20) -> str:
        path = self.launcher.logs / "extauthz.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as response:
            text = response.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }


@dataclass
class Stack:
    issuer: LocalIssuer
    envoy: EnvoyProcess
    service: ExtAuthzProcess
    otlp: OtlpReceiver
    policy_dir: Path
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy.listener_port('ingress')}"

    def get(self, path: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
        request = urllib.request.Request(self.url + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        request.add_header("x-meshward-user", "forged-by-client")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return (
                    response.status,
                    {k.lower(): v for k, v in response.headers.items()},
                    response.read().decode(),
                )
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("extauthz-envoy")
    issuer = LocalIssuer()
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    (policy_dir / "workload.yaml").write_text(WORKLOAD_YAML)
    (policy_dir / "admins.yaml").write_text(ADMINS_YAML)
    access_log = workdir / "access.log"
    with (
        OtlpReceiver() as otlp,
        EchoServer("httpbin") as echo,
        _JwksServer(issuer.jwks_json()) as jwks,
    ):
        (policy_dir / "jwt.yaml").write_text(
            issuer.request_authentication_yaml("foo", "jwt", {"app": "httpbin"}, jwks_uri=jwks.url)
        )
        ca = CertificateAuthority.ephemeral("cluster.local")
        mesh = load([policy_dir]).mesh
        tls = issue_service_tls(ca, mesh, workdir / "extauthz-tls")
        service = ExtAuthzProcess(workdir, policy_dir, otlp.endpoint, tls.directory)
        service.start()
        try:
            config = sidecar(
                workload=WORKLOAD,
                extauthz_port=service.port,
                upstream_port=echo.port,
                otlp_port=otlp.port,
                access_log_path=str(access_log),
                declared_port=8000,
                extauthz_tls=sidecar_tls(ca, "spiffe://cluster.local/ns/foo/sa/httpbin", mesh),
            )
            with EnvoyProcess(config, name="sidecar", workdir=workdir / "envoy") as envoy:
                yield Stack(issuer, envoy, service, otlp, policy_dir, access_log)
                print(f"--- envoy log tail ---\n{envoy.log_tail(15)}")
        finally:
            service.stop()
            print(f"--- ext_authz log tail ---\n{service.log_tail()}")


def test_valid_token_with_the_right_claim_reaches_the_app(stack: Stack) -> None:
    status, _, body = stack.get("/admin/users", stack.issuer.token("alice", groups=["admin"]))
    assert status == 200
    seen = json.loads(body)
    assert seen["service"] == "httpbin"
    assert (
        seen["headers"]["x-meshward-user"] == f"{stack.issuer.issuer}/alice"
    )  # the forged one is gone
    assert "authorization" not in seen["headers"]  # forwardOriginalToken: false


def test_no_token_is_anonymous(stack: Stack) -> None:
    assert stack.get("/public/x")[0] == 200
    status, _, body = stack.get("/admin/users")
    assert status == 403 and json.loads(body)["policy"] == "foo/admins"


def test_wrong_claim_is_403_naming_the_policy_in_body_log_and_access_log(stack: Stack) -> None:
    path = f"/admin/{uuid.uuid4().hex}"
    status, headers, body = stack.get(path, stack.issuer.token("bob", groups=["dev"]))
    assert status == 403
    denial = json.loads(body)
    assert denial["error"] == "access denied"
    assert denial["policy"] == "foo/admins"
    assert "no ALLOW policy matched" in denial["reason"]
    assert len(denial["trace_id"]) == 32
    assert headers["x-meshward-denied-by"] == "foo/admins"

    entry = _wait_for_line(stack.access_log, path)
    assert (
        entry["code"] == 403 and entry["details"] == "ext_authz_denied" and entry["flags"] == "UAEX"
    )
    assert entry["ext_authz"]["policy"] == "foo/admins"
    assert entry["trace_id"] == denial["trace_id"]
    decision = _wait_for_line(stack.service.decision_log, path)
    assert decision["trace_id"] == denial["trace_id"]
    assert decision["user"] == f"{stack.issuer.issuer}/bob"


@pytest.mark.parametrize("case", ["expired", "forged", "alg-none"])
def test_bad_tokens_are_401(stack: Stack, case: str) -> None:
    issuer = stack.issuer
    token = {
        "expired": lambda: issuer.token(groups=["admin"], exp=int(time.time()) - 3600),
        "forged": lambda: LocalIssuer(kid=issuer.kid).token(groups=["admin"]),
        "alg-none": lambda: unsigned_token(
            {"iss": issuer.issuer, "sub": "root", "groups": ["admin"]}
        ),
    }[case]()
    status, headers, body = stack.get("/public/x", token)
    assert status == 401
    reason = json.loads(body)["reason"]
    assert {"expired": "expired", "forged": "signature invalid", "alg-none": "'none'"}[
        case
    ] in reason
    assert headers["www-authenticate"].startswith("Bearer")


def test_second_identical_request_does_not_evaluate_policy(stack: Stack) -> None:
    token = stack.issuer.token(groups=["admin"])
    path = f"/admin/{uuid.uuid4().hex}"
    before = stack.service.metrics()
    assert stack.get(path, token)[0] == 200
    middle = stack.service.metrics()
    assert stack.get(path, token)[0] == 200
    after = stack.service.metrics()
    evaluations = "meshward_extauthz_policy_evaluations_total"
    assert middle[evaluations] == before[evaluations] + 1
    assert after[evaluations] == middle[evaluations]
    hits = "meshward_extauthz_cache_hits_total"
    assert after[hits] == middle[hits] + 1


def test_policy_change_takes_effect_on_the_next_request(stack: Stack) -> None:
    token = stack.issuer.token(groups=["dev"])
    assert stack.get("/reports/q1", token)[0] == 403
    assert stack.get("/reports/q1", token)[0] == 403  # now a cached denial
    reports = stack.policy_dir / "reports.yaml"
    reports.write_text(REPORTS_YAML)
    try:
        version = load([stack.policy_dir]).version[:12]
        _wait(
            lambda: (
                stack.service.metrics().get(f'meshward_extauthz_policy_info{{version="{version}"}}')
                == 1
            )
        )
        assert stack.get("/reports/q1", token)[0] == 200
    finally:
        reports.unlink()
    original = load([stack.policy_dir]).version[:12]
    _wait(
        lambda: (
            stack.service.metrics().get(f'meshward_extauthz_policy_info{{version="{original}"}}')
            == 1
        )
    )
    assert stack.get("/reports/q1", token)[0] == 403


def test_check_span_continues_envoys_trace(stack: Stack) -> None:
    status, _, body = stack.get("/admin/trace", stack.issuer.token(groups=["admin"]))
    assert status == 200
    trace_id = json.loads(body)["headers"]["traceparent"].split("-")[1]

    def complete(spans: list[Any]) -> bool:
        services = {s.service for s in spans if s.trace_id == trace_id}
        return {"sidecar", "meshward-extauthz"} <= services

    spans = [s for s in stack.otlp.wait_for(complete, timeout=15) if s.trace_id == trace_id]
    check = next(s for s in spans if s.service == "meshward-extauthz")
    envoy_ids = {s.span_id: s for s in spans if s.service == "sidecar"}
    assert check.parent_span_id in envoy_ids  # parented on Envoy's ext_authz span ...
    assert "Authorization" in envoy_ids[check.parent_span_id].name  # ... not the caller's
    assert check.attributes["meshward.decision"] == "allow"
    assert check.attributes["meshward.policy"] == "foo/admins"
    assert check.attributes["meshward.workload"] == WORKLOAD


def test_fail_closed_when_the_service_dies_and_recovery_without_restarting_envoy(
    stack: Stack,
) -> None:
    token = stack.issuer.token(groups=["admin"])
    envoy_pid = stack.envoy.pid
    stack.service.kill()
    try:
        status, _, body = stack.get("/admin/down", token)
        assert status == 403 and body == ""  # Envoy's own fail-closed answer
        assert stack.get("/public/x")[0] == 403
        assert stack.envoy.stat("http.ingress.ext_authz.error") >= 1
        entry = _wait_for_line(stack.access_log, "/admin/down")
        assert (entry["code"], entry["details"], entry["flags"]) == (403, "ext_authz_error", "UAEX")
    finally:
        stack.service.start()  # same port
    _wait(lambda: stack.get("/admin/up", token)[0] == 200)
    assert stack.envoy.pid == envoy_pid and stack.envoy.running()


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    wait_until(predicate, timeout, interval=0.1, tolerate=(OSError,))  # a server restarting


def _wait_for_line(path: Path, needle: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if needle in line:
                    entry: dict[str, Any] = json.loads(line)
                    return entry
        time.sleep(0.1)
    raise AssertionError(f"no line with {needle!r} in {path}")


ACME = "https://login.acme.test"
ACME_POLICY = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: acme, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{ACME}/*"]}}}}]
    to: [{{operation: {{paths: ["/acme*"]}}}}]
"""


def test_request_principal_issuer_split_agrees_with_the_evaluator(stack: Stack) -> None:
    """`requestPrincipals: ["https://login.acme.test/*"]` admits tokens whose iss IS
    https://login.acme.test, not https://login.acme.test/tenant1 (current Istio splits at the
    last '/'). Both issuers are trusted, so only the rule decides; Envoy + ext_authz and the
    evaluator agree on every token."""
    from meshward.policy import Request, evaluate

    home, tenant = LocalIssuer(ACME, kid="acme-1"), LocalIssuer(f"{ACME}/tenant1", kid="acme-2")
    files = {
        "acme.yaml": ACME_POLICY,
        "acme-home.yaml": home.request_authentication_yaml("foo", "acme-home", {"app": "httpbin"}),
        "acme-tenant.yaml": tenant.request_authentication_yaml(
            "foo", "acme-tenant", {"app": "httpbin"}
        ),
    }
    for name, text in files.items():
        (stack.policy_dir / name).write_text(text)
    try:
        policy_set = load([stack.policy_dir])
        version = policy_set.version[:12]
        _wait(
            lambda: (
                stack.service.metrics().get(f'meshward_extauthz_policy_info{{version="{version}"}}')
                == 1
            )
        )
        workload = policy_set.workload(WORKLOAD)
        assert workload is not None
        cases = [(home, "alice", 200), (tenant, "alice", 403), (home, "tenant1/alice", 200)]
        for issuer, sub, expected in cases:
            token = issuer.token(sub)
            status = stack.get("/acme/x", token)[0]
            decision = evaluate(
                policy_set,
                workload,
                Request(
                    path="/acme/x", destination_port=8000, claims={"iss": issuer.issuer, "sub": sub}
                ),
                now=datetime.now(UTC),
            )
            assert status == expected, (issuer.issuer, sub, status)
            assert decision.allowed is (expected == 200), decision.reason
    finally:
        for name in files:
            (stack.policy_dir / name).unlink()
    original = load([stack.policy_dir]).version[:12]
    _wait(
        lambda: (
            stack.service.metrics().get(f'meshward_extauthz_policy_info{{version="{original}"}}')
            == 1
        )
    )
