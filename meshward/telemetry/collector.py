"""An in-process OTLP/gRPC trace receiver: the real protocol, spans decoded as they arrive.

Tests point exporters (Meshward's and Envoy's OpenTelemetry tracer) at it and assert on what
arrived instead of mocking the exporter; the local demo runs one as its collector when no
``--otlp-endpoint`` is given, handing each export to a callback that writes a span file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from meshward.lifecycle import StartStop
from meshward.net import LOOPBACK


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0
    start_unix_nano: int = 0
    end_unix_nano: int = 0


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc,unused-ignore]
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(self, request: Any, context: Any) -> Any:
        self._sink._add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


MAX_EXPORT_BYTES = 16 * 1024 * 1024


class OtlpReceiver(StartStop):
    """Listens on 127.0.0.1 (kernel-chosen port); ``endpoint`` is ``127.0.0.1:<port>``."""

    def __init__(
        self,
        *,
        on_spans: Callable[[list[ReceivedSpan]], None] | None = None,
        keep: bool = True,
    ) -> None:
        """``on_spans`` sees each export's spans (on a gRPC thread); ``keep=False`` stops
        keeping them in memory, for a long-running collector that only forwards them."""
        self._on_spans = on_spans
        self._keep = keep
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Condition()
        # Envoy's and other exporters' batches are not ours to size: take up to 16 MiB.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_receive_message_length", MAX_EXPORT_BYTES)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server
        )
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")
        self.endpoint = f"{LOOPBACK}:{self.port}"

    def _add(self, request: Any) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = ""
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.name":
                    service = str(_value(attr.value))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            start_unix_nano=span.start_time_unix_nano,
                            end_unix_nano=span.end_time_unix_nano,
                        )
                    )
        if self._on_spans is not None and received:
            self._on_spans(received)
        if self._keep:
            with self._lock:
                self._spans.extend(received)
                self._lock.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        """Wait until ``predicate(spans)`` holds; return the spans, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [(s.service, s.name) for s in self._spans]
                    raise TimeoutError(f"spans never matched; received {names}")
                self._lock.wait(remaining)
            return list(self._spans)

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        # a short grace lets an export in flight finish, so the last spans are not lost
        self._server.stop(grace=1).wait(5)
