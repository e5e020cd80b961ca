"""Tracing (OpenTelemetry over OTLP gRPC), structured JSON logging and metrics for every server."""

from meshward.telemetry.logging import JsonFormatter, setup_json_logging
from meshward.telemetry.tracing import OTLP_ENDPOINT_ENV, setup_tracing

__all__ = ["OTLP_ENDPOINT_ENV", "JsonFormatter", "setup_json_logging", "setup_tracing"]
