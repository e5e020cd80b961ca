"""The demo's own trace collector, used when no ``--otlp-endpoint`` is given.

Envoy only stamps a trace id on a request (and into its access log and the ext_authz Check)
when a tracer is configured, and a tracer needs a collector. So the local demo always runs one:
this OTLP/gRPC receiver on 127.0.0.1 keeps one JSON line per span in the state directory, which
``meshward denials`` reads to show which components took part in a denied request's trace.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import TracebackType
from typing import Any

from meshward.net import LOOPBACK

KEPT_ATTRIBUTES = (
    "http.status_code",
    "response_flags",
    "upstream_cluster",
    "meshward.decision",
    "meshward.policy",
    "meshward.rule",
    "meshward.reason",
)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def span_lines(request: Any) -> Iterator[dict[str, Any]]:
    """ExportTraceServiceRequest -> one small dict per span."""
    for resource_spans in request.resource_spans:
        service = ""
        for attr in resource_spans.resource.attributes:
            if attr.key == "service.name":
                service = str(_value(attr.value))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = {a.key: _value(a.value) for a in span.attributes}
                yield {
                    "service": service,
                    "name": span.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "start_unix_nano": span.start_time_unix_nano,
                    "duration_ms": round(
                        (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6, 3
                    ),
                    "attributes": {k: attributes[k] for k in KEPT_ATTRIBUTES if k in attributes},
                }


class SpanFile:
    """An OTLP/gRPC trace receiver appending spans to ``path``; ``endpoint`` is HOST:PORT."""

    def __init__(self, path: Path) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.path = path
        self._lock = threading.Lock()
        self.spans = 0
        sink = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc,unused-ignore]
            def Export(self, request: Any, context: Any) -> Any:
                sink.write(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            Service(), self._server
        )
        self.port = int(self._server.add_insecure_port(f"{LOOPBACK}:0"))
        self.endpoint = f"{LOOPBACK}:{self.port}"

    def write(self, request: Any) -> None:
        lines = [json.dumps(line, separators=(",", ":")) for line in span_lines(request)]
        if not lines:
            return
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            self.spans += len(lines)

    def start(self) -> SpanFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait(5)

    def __enter__(self) -> SpanFile:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def read_spans(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    spans = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            spans.append(item)
    return spans
