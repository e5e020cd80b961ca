"""The Check service over real gRPC (sync and asyncio servers): health, spans parented on the
call metadata, decision log lines, metrics, and a denial (not a crash) when the handler raises."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from meshward.cli import build_parser
from meshward.extauthz.authorizer import Authorizer
from meshward.extauthz.client import build_check_request, describe_response
from meshward.extauthz.decisionlog import open_decision_log
from meshward.extauthz.metrics import Metrics, serve_metrics
from meshward.extauthz.server import ExtAuthzServer
from meshward.extauthz.service import CheckService, trace_id_of
from meshward.telemetry import setup_tracing
from meshward.testing.extauthz import ADMINS_YAML
from meshward.testing.jwt_issuer import LocalIssuer

WORKLOAD = "foo/httpbin"
POLICY = (
    ADMINS_YAML
    + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: hook}
  rules: [{to: [{operation: {paths: ["/custom*"]}}]}]
"""
)
ENVOY_SPAN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CALLER_SPAN = "00-11111111111111111111111111111111-2222222222222222-01"


def _raising_hook(policy: Any, request: Any) -> tuple[bool, str]:
    raise RuntimeError("provider exploded")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(params=["sync", "aio"])
def served(
    request: pytest.FixtureRequest,
    policy_set_for: Callable[..., Any],
    exporter: InMemorySpanExporter,
) -> Iterator[tuple[Any, CheckService, Metrics]]:
    provider = setup_tracing("meshward-extauthz", exporter=exporter, schedule_delay_millis=50)
    authorizer = Authorizer(policy_set_for(POLICY))
    metrics = Metrics()
    metrics.attach(authorizer)
    service = CheckService(authorizer, metrics=metrics, tracer_provider=provider)
    with (
        ExtAuthzServer(service, kind=request.param) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield channel, service, metrics
    provider.shutdown()  # type: ignore[attr-defined]


def _call(
    channel: Any, path: str, token: str | None = None, traceparent: str = ENVOY_SPAN
) -> dict[str, Any]:
    headers = {"traceparent": CALLER_SPAN}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = build_check_request(
        path=path,
        headers=headers,
        workload=WORKLOAD,
        source_principal="spiffe://cluster.local/ns/web/sa/frontend",
    )
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return describe_response(
        stub.Check(request, metadata=[("traceparent", traceparent)], timeout=5)
    )


def test_health_service_reports_serving(served: Any) -> None:
    channel, _, _ = served
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "envoy.service.auth.v3.Authorization"):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_span_continues_the_call_metadata_trace(
    served: Any, exporter: InMemorySpanExporter, issuer: LocalIssuer
) -> None:
    channel, service, _ = served
    denied = _call(channel, "/admin", issuer.token(groups=["dev"]))
    allowed = _call(channel, "/public")
    assert (
        denied["body"]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    )  # Envoy's, not the caller's
    assert allowed["http_status"] == 200
    service._tracer  # noqa: B018 - tracing is on
    exporter_spans = _wait_spans(exporter, 2)
    deny_span, allow_span = exporter_spans
    for span in exporter_spans:
        assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert deny_span.attributes["meshward.decision"] == "deny"
    assert deny_span.attributes["meshward.policy"] == "foo/admins"
    assert deny_span.attributes["meshward.user"] == f"{issuer.issuer}/alice"
    assert (
        deny_span.attributes["meshward.source_principal"]
        == "spiffe://cluster.local/ns/web/sa/frontend"
    )
    assert deny_span.attributes["meshward.cache_hit"] is False
    assert deny_span.attributes["url.path"] == "/admin"
    assert deny_span.status.status_code is StatusCode.ERROR
    assert allow_span.attributes["meshward.decision"] == "allow"
    assert allow_span.status.status_code is not StatusCode.ERROR


def _wait_spans(exporter: InMemorySpanExporter, count: int) -> list[Any]:
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        spans = list(exporter.get_finished_spans())
        if len(spans) >= count:
            return spans
        time.sleep(0.02)
    raise AssertionError(f"expected {count} spans, got {len(exporter.get_finished_spans())}")


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_handler_exception_is_a_denial_with_a_reason(
    kind: str, policy_set_for: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A CUSTOM provider hook that raises: grpcio would swallow it and Envoy would see UNKNOWN."""
    authorizer = Authorizer(policy_set_for(POLICY, verbose=True), custom=_raising_hook)
    assert authorizer.plan(WORKLOAD).key_of is None  # a hook may read anything: not cacheable
    metrics = Metrics()
    service = CheckService(authorizer, metrics=metrics)
    with (
        ExtAuthzServer(service, kind=kind) as server,  # type: ignore[arg-type]
        grpc.insecure_channel(server.address) as channel,
        caplog.at_level(logging.ERROR, logger="meshward.extauthz"),
    ):
        answer = _call(channel, "/custom/x")
        assert _call(channel, "/public")["http_status"] == 200  # the server lives on
    assert answer["http_status"] == 403
    assert "internal error in ext_authz (RuntimeError)" in answer["body"]["reason"]
    assert answer["headers"]["x-meshward-denied-by"] == "meshward-extauthz"
    assert any("Check handler failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert metrics.errors._value.get() == 1


def test_decision_log_lines_carry_the_trace_id(
    served: Any, tmp_path: Path, issuer: LocalIssuer
) -> None:
    channel, _, _ = served
    log_path = tmp_path / "decisions.jsonl"
    open_decision_log(log_path)
    try:
        _call(channel, "/public")  # allows are not logged by default
        _call(channel, "/admin", issuer.token(groups=["dev"]))
    finally:
        open_decision_log(None)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 1
    (line,) = lines
    assert line["decision"] == "deny" and line["status"] == 403
    assert line["policy"] == "foo/admins"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["user"] == f"{issuer.issuer}/alice"
    assert line["path"] == "/admin"


def test_metrics_endpoint_reports_cache_and_latency(served: Any, issuer: LocalIssuer) -> None:
    channel, _, metrics = served
    token = issuer.token(groups=["admin"])
    for _ in range(4):
        _call(channel, "/admin", token)
    server, port = serve_metrics(0, metrics=metrics)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["meshward_extauthz_cache_hits_total"] == 3
    assert samples["meshward_extauthz_cache_misses_total"] == 1
    assert "meshward_extauthz_cache_hit_ratio" not in samples  # hits / (hits + misses): PromQL's
    info = [k for k in samples if k.startswith("meshward_extauthz_policy_info{")]
    assert len(info) == 1 and samples[info[0]] == 1
    assert samples["meshward_extauthz_cache_entries"] == 1
    assert samples["meshward_extauthz_policy_evaluations_total"] == 1
    assert samples['meshward_extauthz_check_duration_seconds_count{cache="hit"}'] == 3
    assert samples['meshward_extauthz_checks_total{cache="hit",decision="allow",status="200"}'] == 3


def test_trace_id_of_rejects_junk() -> None:
    assert trace_id_of(ENVOY_SPAN) == "4bf92f3577b34da6a3ce929d0e0e4736"
    for junk in (
        None,
        "",
        "00-zz-01",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-" + "g" * 32 + "-1-01",
    ):
        assert trace_id_of(junk) == ""


def test_serve_help_documents_fail_closed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["extauthz", "serve", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "fail closed" in text
    assert "failure_mode_allow: false" in text
    assert "403" in text and "no Envoy restart" in text


def test_check_command_reports_an_unreachable_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from meshward.certs.ca import CertificateAuthority
    from meshward.cli import main
    from meshward.net import free_port
    from meshward.testing.extauthz import issue_tls

    tls = issue_tls(
        CertificateAuthority.ephemeral("cluster.local"),
        "spiffe://cluster.local/ns/foo/sa/httpbin",
        tmp_path,
    )
    code = main(
        [
            "extauthz", "check", "--server", f"127.0.0.1:{free_port()}",
            "--tls-dir", str(tls.directory), "--workload", WORKLOAD, "--timeout", "1",
        ]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "failed: ConnectionRefusedError" in err and "Traceback" not in err
