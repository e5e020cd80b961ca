"""One place that turns an OTLP endpoint into a tracer provider.

Tracing is off (a no-op provider, near-zero cost) when no endpoint is configured: servers call
this unconditionally and never branch on whether tracing is enabled.
"""

from __future__ import annotations

import os

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracerProvider
from opentelemetry.trace import TracerProvider as ApiTracerProvider

OTLP_ENDPOINT_ENV = "MESHWARD_OTLP_ENDPOINT"

# A span's attributes carry request data (a 16 KiB path, a reason quoting it). Without limits one
# huge span makes its whole batch exceed the collector's gRPC message limit (4 MiB by default)
# and the batch is dropped. With these, a span is at most ~64 x 1 KiB and a batch at most 32
# spans (~2 MiB): every export fits (issue 13).
MAX_ATTRIBUTE_CHARS = 1024
SPAN_LIMITS = SpanLimits(
    max_attributes=64,
    max_span_attributes=64,
    max_attribute_length=MAX_ATTRIBUTE_CHARS,
    max_span_attribute_length=MAX_ATTRIBUTE_CHARS,
    max_events=32,
    max_links=32,
    max_event_attributes=16,
    max_link_attributes=16,
)
MAX_EXPORT_BATCH = 32


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # Jaeger and in-test receivers on loopback speak plaintext gRPC; an https:// endpoint uses TLS.
    insecure = not endpoint.startswith("https://")
    return OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=5)


def setup_tracing(
    service_name: str,
    endpoint: str | None = None,
    *,
    exporter: SpanExporter | None = None,
    schedule_delay_millis: int = 1000,
) -> ApiTracerProvider:
    """A tracer provider exporting to ``endpoint`` (or ``$MESHWARD_OTLP_ENDPOINT``).

    Returns a provider rather than installing a global one, so several servers in one process
    (tests, the demo) each keep their own ``service.name``. Call ``shutdown()`` on the returned
    SDK provider to flush at exit.
    """
    endpoint = endpoint or os.environ.get(OTLP_ENDPOINT_ENV) or None
    if exporter is None and endpoint is None:
        return NoOpTracerProvider()
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service_name}), span_limits=SPAN_LIMITS
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter or _otlp_exporter(endpoint or ""),
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=MAX_EXPORT_BATCH,
        )
    )
    return provider
