"""One place that turns an OTLP endpoint into a tracer provider.

Tracing is off (a no-op provider, near-zero cost) when no endpoint is configured: servers call
this unconditionally and never branch on whether tracing is enabled.
"""

from __future__ import annotations

import os

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracerProvider
from opentelemetry.trace import TracerProvider as ApiTracerProvider

OTLP_ENDPOINT_ENV = "MESHWARD_OTLP_ENDPOINT"


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
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter or _otlp_exporter(endpoint or ""),
            schedule_delay_millis=schedule_delay_millis,
        )
    )
    return provider
