"""Which Checks get a span (meshward.extauthz.tracing) and that a span made after the Check is
the span starting it up front would have been: real SDK, real in-memory exporter."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshward.extauthz.authorizer import Authorizer
from meshward.extauthz.client import build_check_request
from meshward.extauthz.service import SPAN_NAME, CheckService
from meshward.extauthz.tracing import Sampler, Traceparent

PolicyFactory = Callable[..., Any]
PEER = "spiffe://cluster.local/ns/web/sa/frontend"
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: ["/public*"]}}]
"""


def _traceparent(sampled: bool = True) -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{'01' if sampled else '00'}"


def _served(policy_set: Any, **kw: Any) -> tuple[CheckService, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = CheckService(Authorizer(policy_set), tracer_provider=provider, **kw)
    return service, exporter


def _check(service: CheckService, path: str, traceparent: str | None) -> Any:
    request = build_check_request(path=path, workload="foo/httpbin", source_principal=PEER)
    return service.check(request, [("traceparent", traceparent)] if traceparent else [])


def test_traceparent_parsing() -> None:
    parsed = Traceparent.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert parsed is not None and parsed.sampled
    assert parsed.trace_id_hex == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert (
        Traceparent.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").sampled
        is False
    )  # type: ignore[union-attr]
    for junk in ("", "00-xyz", f"00-{'0' * 32}-{'1' * 16}-01", f"00-{'g' * 32}-{'1' * 16}-01"):
        assert Traceparent.parse(junk) is None


def test_misses_are_always_traced_hits_by_ratio_and_unsampled_parents_never(
    policy_set_for: PolicyFactory,
) -> None:
    service, exporter = _served(policy_set_for(POLICY), sample_ratio=0.0)
    parent = _traceparent()
    _check(service, "/public/a", parent)  # miss
    for _ in range(20):
        _check(service, "/public/a", _traceparent())  # hits, ratio 0
    _check(service, "/public/b", _traceparent(sampled=False))  # miss, but Envoy is not sampling
    (span,) = exporter.get_finished_spans()
    assert span.name == SPAN_NAME and span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == parent.split("-")[1]
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent.split("-")[2]
    assert span.attributes is not None and span.attributes["meshward.cache"] == "miss"
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= span.end_time


def test_ratio_one_traces_every_hit_and_denials_carry_an_error_status(
    policy_set_for: PolicyFactory,
) -> None:
    service, exporter = _served(policy_set_for(POLICY), sample_ratio=1.0)
    for _ in range(3):
        _check(service, "/private", _traceparent())
    spans = exporter.get_finished_spans()
    assert [s.attributes["meshward.cache"] for s in spans] == ["miss", "hit", "hit"]  # type: ignore[index]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)


def test_the_ratio_follows_the_trace_id() -> None:
    sampler = Sampler(ratio=0.25, max_per_second=10**9)
    parents = [Traceparent.parse(_traceparent()) for _ in range(4000)]
    kept = [p for p in parents if sampler.wants(p, True)]
    assert 800 < len(kept) < 1200
    assert all(sampler.wants(p, True) for p in kept)  # the same trace: the same answer
    assert Sampler(ratio=0.25, max_per_second=10**9).wants(kept[0], True)


def test_spans_per_second_are_bounded() -> None:
    now = [100.0]
    sampler = Sampler(ratio=1.0, max_per_second=50, clock=lambda: now[0])
    parent = Traceparent.parse(_traceparent())
    assert sum(sampler.wants(parent, False) for _ in range(10_000)) == 50
    now[0] += 1.0
    assert sampler.wants(parent, False)


def test_a_flood_of_misses_records_at_most_the_budget(policy_set_for: PolicyFactory) -> None:
    service, exporter = _served(policy_set_for(POLICY))
    service.sampler = Sampler(ratio=1.0, max_per_second=25, clock=lambda: 7.0)  # one second
    for i in range(300):
        _check(service, f"/public/{i}", _traceparent())  # every one a miss
    assert len(exporter.get_finished_spans()) == 25


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="within"):
        Sampler(ratio=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        Sampler(max_per_second=-1)


def test_without_a_traceparent_a_sampled_check_starts_a_trace(
    policy_set_for: PolicyFactory,
) -> None:
    service, exporter = _served(policy_set_for(POLICY), sample_ratio=1.0)
    denied = _check(service, "/private", None)
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert format(span.context.trace_id, "032x") in denied.denied_response.body
    quiet, quiet_exporter = _served(policy_set_for(POLICY), sample_ratio=0.0)
    _check(quiet, "/private", None)
    assert not quiet_exporter.get_finished_spans()
