"""The Check handler shared by the sync and asyncio gRPC servers: a span continuing Envoy's
trace (for every evaluated Check and a sample of cache hits), metrics, the decision log, and
a denial (never a crash) when anything raises.

The span's parent is the ``traceparent`` in the gRPC call's metadata, which Envoy's ext_authz
client sets to its own ext_authz span; the ``traceparent`` inside ``CheckRequest`` HTTP headers is
the downstream caller's and would attach our span one level too high. Which Checks get a span,
and why the span is made after the Check, is meshward.extauthz.tracing's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracerProvider,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from meshward.extauthz import decisionlog
from meshward.extauthz.authorizer import Authorizer, CheckResult
from meshward.extauthz.metrics import Metrics
from meshward.extauthz.response import deny_response
from meshward.extauthz.tracing import DEFAULT_MAX_PER_SECOND, DEFAULT_RATIO, Sampler, Traceparent
from meshward.telemetry.limits import clip

log = logging.getLogger("meshward.extauthz")

SPAN_NAME = "meshward.extauthz.check"


def traceparent_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "traceparent":
            return value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
    return None


def trace_id_of(traceparent: str | None) -> str:
    """The trace id in a W3C traceparent (``00-<32 hex>-<16 hex>-<2 hex>``), or ""."""
    parsed = Traceparent.parse(traceparent)
    return parsed.trace_id_hex if parsed is not None else ""


class CheckService:
    """``check(request, metadata) -> CheckResponse``; safe to call from many threads."""

    def __init__(
        self,
        authorizer: Authorizer,
        *,
        metrics: Metrics | None = None,
        tracer_provider: Any = None,
        log_allows: bool = False,
        sample_ratio: float = DEFAULT_RATIO,
        max_spans_per_second: int = DEFAULT_MAX_PER_SECOND,
    ) -> None:
        """``sample_ratio``: the share of cache hits traced (every evaluated Check is, within
        ``max_spans_per_second``); see meshward.extauthz.tracing."""
        self.authorizer = authorizer
        self.metrics = metrics
        provider = tracer_provider or NoOpTracerProvider()
        self._tracer = (
            None
            if isinstance(provider, NoOpTracerProvider)
            else provider.get_tracer("meshward.extauthz")
        )
        self.log_allows = log_allows
        self.sampler = Sampler(sample_ratio, max_spans_per_second)

    def check(self, request: Any, metadata: Iterable[tuple[str, Any]] | None = None) -> Any:
        started = time.perf_counter()
        start_ns = time.time_ns()
        parent = Traceparent.parse(traceparent_of(metadata))
        root = None
        trace_id = parent.trace_id_hex if parent is not None else ""
        if parent is None and self._tracer is not None and self.sampler.wants(None, None):
            # No trace to continue (Envoy traces nothing; with tracing on it always sends a
            # traceparent): a sampled share of these Checks starts a trace, up front, so a
            # denial body names it.
            root = self._tracer.start_span(SPAN_NAME, kind=SpanKind.SERVER, start_time=start_ns)
            if root.get_span_context().is_valid:
                trace_id = format(root.get_span_context().trace_id, "032x")
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
        if root is not None:
            _finish(root, result)
        elif (
            parent is not None
            and self._tracer is not None
            and self.sampler.wants(parent, result.cache_hit)
        ):
            self._span(parent, result, start_ns)
        if self.metrics is not None:
            self.metrics.record(result, time.perf_counter() - started)
        if not result.allowed or result.dry_run or result.audit_policies or self.log_allows:
            try:
                decisionlog.record(result, trace_id, log_allows=self.log_allows)
            except Exception:
                log.exception("decision log write failed")
        return result.response

    def _span(self, parent: Traceparent, result: CheckResult, start_ns: int) -> None:
        """The Check's span, made after the fact with its real start time."""
        assert self._tracer is not None
        context = SpanContext(
            parent.trace_id, parent.span_id, is_remote=True, trace_flags=TraceFlags(1)
        )
        span = self._tracer.start_span(
            SPAN_NAME,
            context=set_span_in_context(NonRecordingSpan(context)),
            kind=SpanKind.SERVER,
            attributes=_attributes(result),
            start_time=start_ns,
        )
        _finish(span, result, attributes=False)


def _finish(span: Any, result: CheckResult, *, attributes: bool = True) -> None:
    if attributes and span.is_recording():
        span.set_attributes(_attributes(result))
    if not result.allowed:
        span.set_status(Status(StatusCode.ERROR, clip(result.reason)))
    span.end()


def _attributes(result: CheckResult) -> dict[str, Any]:
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
    return attributes


class EmptyCheckService:
    """Answers OK without looking at the request: the benchmark's floor for Python gRPC."""

    def __init__(self) -> None:
        from meshward.extauthz.response import empty_allow

        self._response = empty_allow()

    def check(self, request: Any, metadata: Iterable[tuple[str, Any]] | None = None) -> Any:
        return self._response


__all__ = ["CheckService", "EmptyCheckService"]
