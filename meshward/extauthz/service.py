"""The Check handler shared by the sync and asyncio gRPC servers: a span per Check continuing
Envoy's trace, metrics, the decision log, and a denial (never a crash) when anything raises.

The span's parent is the ``traceparent`` in the gRPC call's metadata, which Envoy's ext_authz
client sets to its own ext_authz span; the ``traceparent`` inside ``CheckRequest`` HTTP headers is
the downstream caller's and would attach our span one level too high.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import NoOpTracerProvider, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshward.extauthz import decisionlog
from meshward.extauthz.authorizer import Authorizer, CheckResult
from meshward.extauthz.metrics import Metrics
from meshward.extauthz.response import deny_response
from meshward.telemetry.limits import clip

log = logging.getLogger("meshward.extauthz")

SPAN_NAME = "meshward.extauthz.check"
_PROPAGATOR = TraceContextTextMapPropagator()


def traceparent_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "traceparent":
            return value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
    return None


def trace_id_of(traceparent: str | None) -> str:
    """The trace id in a W3C traceparent (``00-<32 hex>-<16 hex>-<2 hex>``), or ""."""
    if not traceparent:
        return ""
    parts = traceparent.split("-")
    if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return ""
        return parts[1].lower()
    return ""


class CheckService:
    """``check(request, metadata) -> CheckResponse``; safe to call from many threads."""

    def __init__(
        self,
        authorizer: Authorizer,
        *,
        metrics: Metrics | None = None,
        tracer_provider: Any = None,
        log_allows: bool = False,
    ) -> None:
        self.authorizer = authorizer
        self.metrics = metrics
        provider = tracer_provider or NoOpTracerProvider()
        self._tracer = (
            None
            if isinstance(provider, NoOpTracerProvider)
            else provider.get_tracer("meshward.extauthz")
        )
        self.log_allows = log_allows

    def check(self, request: Any, metadata: Iterable[tuple[str, Any]] | None = None) -> Any:
        started = time.perf_counter()
        traceparent = traceparent_of(metadata)
        span = None
        trace_id = ""
        if self._tracer is not None:
            parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
            span = self._tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER)
            context = span.get_span_context()
            if context.is_valid:
                trace_id = format(context.trace_id, "032x")
        if not trace_id:
            trace_id = trace_id_of(traceparent)
        try:
            result = self.authorizer.check(request, trace_id)
        except Exception as exc:  # grpcio would swallow it; Envoy would see UNKNOWN and 403 blind
            log.exception("Check handler failed; denying", extra={"trace_id": trace_id})
            result = CheckResult(
                response=None,
                allowed=False,
                http_status=403,
                reason=f"internal error in ext_authz ({type(exc).__name__}); denied (fail closed)",
                policy_version=self.authorizer.version,
                code="internal_error",
                verbose=self.authorizer.verbose_denials,
            )
            result.response = deny_response(result, trace_id)
            if self.metrics is not None:
                self.metrics.errors.inc()
        if span is not None:
            _annotate(span, result)
            span.end()
        if self.metrics is not None:
            self.metrics.record(result, time.perf_counter() - started)
        if not result.allowed or result.dry_run or result.audit_policies or self.log_allows:
            try:
                decisionlog.record(result, trace_id, log_allows=self.log_allows)
            except Exception:
                log.exception("decision log write failed")
        return result.response


def _annotate(span: Any, result: CheckResult) -> None:
    if not span.is_recording():
        return
    attributes: dict[str, Any] = {
        "meshward.decision": result.decision,
        "meshward.status": result.http_status,
        "meshward.reason": result.reason,
        "meshward.policy_version": result.policy_version[:12],
        "http.request.method": result.method,
        "url.path": result.path,
    }
    if result.policy is not None:
        attributes["meshward.policy"] = result.policy
    if result.rule is not None:
        attributes["meshward.rule"] = result.rule
    if result.workload is not None:
        attributes["meshward.workload"] = result.workload
    if result.source_principal is not None:
        attributes["meshward.source_principal"] = result.source_principal
    if result.user is not None:
        attributes["meshward.user"] = result.user
    attributes["meshward.cache_hit"] = bool(result.cache_hit)
    attributes["meshward.cache"] = (
        "off" if result.cache_hit is None else ("hit" if result.cache_hit else "miss")
    )
    if result.dry_run:
        attributes["meshward.dry_run"] = [
            f"{d.policy}:{'would-deny' if d.would_deny else ('matched' if d.matched else 'no-match')}"
            for d in result.dry_run
        ]
    if result.audit_policies:
        attributes["meshward.audit"] = list(result.audit_policies)
    span.set_attributes(attributes)
    if not result.allowed:
        span.set_status(Status(StatusCode.ERROR, clip(result.reason)))


class EmptyCheckService:
    """Answers OK without looking at the request: the benchmark's floor for Python gRPC."""

    def __init__(self) -> None:
        from meshward.extauthz.response import empty_allow

        self._response = empty_allow()

    def check(self, request: Any, metadata: Iterable[tuple[str, Any]] | None = None) -> Any:
        return self._response


__all__ = ["CheckService", "EmptyCheckService"]
