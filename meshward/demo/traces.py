"""The demo's own trace collector, used when no ``--otlp-endpoint`` is given.

Envoy only stamps a trace id on a request (and into its access log and the ext_authz Check)
when a tracer is configured, and a tracer needs a collector. So the local demo always runs one:
this OTLP/gRPC receiver on 127.0.0.1 keeps one JSON line per span in the state directory, which
``meshward denials`` reads to show which components took part in a denied request's trace.

Bounded: attribute values are clipped (meshward.telemetry.limits) and the file rotates by size
(``traces.jsonl`` -> ``.1`` ...), at most ``max_bytes`` with its backups.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from meshward.lifecycle import StartStop
from meshward.telemetry.collector import OtlpReceiver, ReceivedSpan
from meshward.telemetry.limits import (
    DEFAULT_LOG_BACKUPS,
    DEFAULT_LOG_BYTES,
    clip,
    read_rotated,
    rotating_handler,
)

KEPT_ATTRIBUTES = (
    "http.status_code",
    "response_flags",
    "upstream_cluster",
    "meshward.decision",
    "meshward.policy",
    "meshward.rule",
    "meshward.reason",
)


def span_line(span: ReceivedSpan) -> dict[str, Any]:
    """One span as a small JSON-ready dict (only the attributes ``meshward denials`` shows)."""
    return {
        "service": clip(span.service, 256),
        "name": clip(span.name, 256),
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_span_id,
        "start_unix_nano": span.start_unix_nano,
        "duration_ms": round((span.end_unix_nano - span.start_unix_nano) / 1e6, 3),
        "attributes": {
            k: clip(v) if isinstance(v, str) else v
            for k in KEPT_ATTRIBUTES
            if (v := span.attributes.get(k)) is not None
        },
    }


class SpanFile(StartStop):
    """An OTLP/gRPC collector appending spans to ``path`` as JSON lines; ``endpoint`` is
    HOST:PORT. Spans are not kept in memory, so a long-running demo does not grow."""

    def __init__(
        self, path: Path, *, max_bytes: int = DEFAULT_LOG_BYTES, backups: int = DEFAULT_LOG_BACKUPS
    ) -> None:
        self.path = path
        self.spans = 0
        self.max_bytes, self.backups = max_bytes, backups
        self._handler: logging.Handler | None = None
        self._lock = threading.Lock()
        self._receiver = OtlpReceiver(on_spans=self._write, keep=False)
        self.port = self._receiver.port
        self.endpoint = self._receiver.endpoint

    def _write(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            if self._handler is None:
                return
            for span in spans:
                line = json.dumps(span_line(span), separators=(",", ":"))
                self._handler.handle(logging.makeLogRecord({"msg": line}))
            self.spans += len(spans)

    def start(self) -> SpanFile:
        self._handler = rotating_handler(self.path, self.max_bytes, self.backups)
        self.path.touch()
        self._receiver.start()
        return self

    def stop(self) -> None:
        self._receiver.stop()
        with self._lock:
            if self._handler is not None:
                self._handler.close()
                self._handler = None


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Spans of ``path`` and its rotated backups, oldest first."""
    text = read_rotated(path)
    spans = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            spans.append(item)
    return spans
