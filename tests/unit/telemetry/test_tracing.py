"""Spans leave through the real OTLP gRPC exporter and arrive at a real receiver."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracerProvider

from meshward.telemetry import setup_tracing
from meshward.telemetry.collector import OtlpReceiver


def test_scope_spans_proto_is_the_real_one() -> None:
    # xds-protos overwrites opentelemetry-proto with an old copy lacking ScopeSpans; setup restores it.
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    assert "spans" in ScopeSpans.DESCRIPTOR.fields_by_name


def test_no_endpoint_means_no_tracing(monkeypatch) -> None:
    monkeypatch.delenv("MESHWARD_OTLP_ENDPOINT", raising=False)
    assert isinstance(setup_tracing("svc"), NoOpTracerProvider)


def test_span_is_exported_over_otlp_with_attributes(otlp_receiver: OtlpReceiver) -> None:
    provider = setup_tracing("meshward-test", otlp_receiver.endpoint, schedule_delay_millis=50)
    assert isinstance(provider, TracerProvider)
    with provider.get_tracer("test").start_as_current_span("check") as span:
        span.set_attribute("meshward.decision", "deny")
        span.set_attribute("meshward.rule", 3)
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.shutdown()  # flushes

    spans = otlp_receiver.wait_for(lambda got: any(s.name == "check" for s in got), timeout=10)
    (check,) = [s for s in spans if s.name == "check"]
    assert check.service == "meshward-test"
    assert check.trace_id == trace_id
    assert check.attributes == {"meshward.decision": "deny", "meshward.rule": 3}


def test_env_var_configures_the_endpoint(monkeypatch, otlp_receiver: OtlpReceiver) -> None:
    monkeypatch.setenv("MESHWARD_OTLP_ENDPOINT", otlp_receiver.endpoint)
    provider = setup_tracing("from-env", schedule_delay_millis=50)
    assert isinstance(provider, TracerProvider)
    provider.get_tracer("t").start_span("env-span").end()
    provider.shutdown()
    spans = otlp_receiver.wait_for(lambda got: any(s.name == "env-span" for s in got), timeout=10)
    assert spans[-1].service == "from-env"
