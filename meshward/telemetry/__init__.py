"""Tracing (OpenTelemetry over OTLP gRPC), structured JSON logging and metrics for every server."""

from meshward.telemetry.logging import TEXT_FORMAT, JsonFormatter, lean_records, setup_json_logging
from meshward.telemetry.tracing import OTLP_ENDPOINT_ENV, setup_tracing

__all__ = [
    "OTLP_ENDPOINT_ENV",
    "TEXT_FORMAT",
    "JsonFormatter",
    "lean_records",
    "setup_json_logging",
    "setup_tracing",
]
