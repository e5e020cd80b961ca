"""Recent denials from a demo's logs, merged into one list (pure: texts in, denials out).

An RBAC denial exists only in the callee sidecar's access log; an ext_authz denial is in both
the access log (``ext_authz_denied``) and the decision log, and is listed once (matched by
trace id), with the service's policy, rule and reason. Dry-run results ("would deny") come
from the RBAC shadow metadata and from the decision log's ``dry-run`` lines, listed only when
asked for: nothing was denied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from meshward.flows import evidence


@dataclass(frozen=True)
class Denial:
    time: datetime | None
    workload: str  # where it was denied (the callee)
    source: str  # the caller's SPIFFE ID ("" when unknown, e.g. plaintext)
    method: str
    path: str
    status: int
    decider: str  # evidence.RBAC or evidence.EXTAUTHZ
    policy: str | None
    rule: int | None
    reason: str
    trace_id: str
    dry_run: bool = False  # would have been denied by a dry-run policy; it was not
    spans: tuple[str, ...] = field(default=())  # "service: span name" of the trace, if known

    @property
    def rule_ref(self) -> str:
        if self.policy is None:
            return "(no rule matched)" if not self.dry_run else "-"
        return self.policy if self.rule is None else f"{self.policy}#{self.rule}"

    def to_json(self, jaeger: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "time": self.time.isoformat() if self.time else None,
            "workload": self.workload,
            "source": self.source,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "decided_by": self.decider,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "trace_id": self.trace_id,
            "dry_run": self.dry_run,
            "spans": list(self.spans),
        }
        if jaeger and self.trace_id:
            data["jaeger"] = jaeger_link(jaeger, self.trace_id)
        return data


def jaeger_link(base: str, trace_id: str) -> str:
    return f"{base.rstrip('/')}/trace/{trace_id}"


def short_identity(spiffe_id: str) -> str:
    """``spiffe://td/ns/shop/sa/frontend`` -> ``shop/sa/frontend``."""
    if not spiffe_id:
        return "-"
    rest = spiffe_id.removeprefix("spiffe://")
    parts = rest.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return f"{parts[2]}/sa/{parts[4]}"
    return spiffe_id


def _from_verdict(v: evidence.Verdict) -> Denial:
    return Denial(
        time=v.time,
        workload=v.workload,
        source=v.source,
        method=v.method,
        path=v.path,
        status=v.status,
        decider=v.decider,
        policy=v.policy,
        rule=v.rule,
        reason=v.reason,
        trace_id=v.trace_id,
    )


def _from_record(r: evidence.DecisionRecord) -> Denial:
    return Denial(
        time=r.time,
        workload=r.workload,
        source=r.source,
        method=r.method,
        path=r.path,
        status=r.status or 403,
        decider=evidence.EXTAUTHZ,
        policy=r.policy,
        rule=r.rule,
        reason=r.reason,
        trace_id=r.trace_id,
    )


def collect(
    access_logs: Mapping[str, str],
    decision_log: str,
    *,
    spans: Sequence[Mapping[str, Any]] = (),
    include_dry_run: bool = False,
) -> list[Denial]:
    """Every denial in the texts, oldest first. ``access_logs``: sidecar -> log text."""
    denials: list[Denial] = []
    dry: list[Denial] = []
    by_trace: dict[str, int] = {}
    for text in access_logs.values():
        for v in evidence.verdicts(text):
            if v.direction != "inbound":
                continue  # the caller's side only relays the callee's answer
            if not v.allowed and v.decider in (evidence.RBAC, evidence.EXTAUTHZ):
                if v.trace_id:
                    by_trace[v.trace_id] = len(denials)
                denials.append(_from_verdict(v))
            for policy in v.would_deny:
                dry.append(
                    replace(_from_verdict(v), decider=evidence.RBAC + " (dry-run)", policy=policy,
                            rule=None, reason="a dry-run policy would deny this", dry_run=True)
                )  # fmt: skip
    for record in evidence.decisions(decision_log):
        if record.denied:
            index = by_trace.get(record.trace_id) if record.trace_id else None
            if index is None:
                denials.append(_from_record(record))
            else:  # the access log saw it too: the decision log has the service's own words
                d = denials[index]
                denials[index] = replace(
                    d,
                    policy=record.policy,
                    rule=record.rule,
                    reason=record.reason or d.reason,
                    source=d.source or record.source,
                )
        elif record.event == "dry-run" and record.would_deny:
            dry.append(
                replace(_from_record(record), decider=evidence.EXTAUTHZ + " (dry-run)",
                        policy=record.dry_run_policy, rule=None, status=0,
                        reason="a dry-run policy would deny this", dry_run=True)
            )  # fmt: skip
    if include_dry_run:
        seen = set()
        for d in dry:
            key = (d.trace_id, d.policy, d.workload, d.time)
            if key not in seen:
                seen.add(key)
                denials.append(d)
    if spans:
        index_spans = _spans_by_trace(spans)
        denials = [replace(d, spans=index_spans.get(d.trace_id, ())) for d in denials]
    return sorted(denials, key=lambda d: (d.time is None, d.time or datetime.min))


def _spans_by_trace(spans: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, ...]]:
    grouped: dict[str, list[tuple[int, str]]] = {}
    for span in spans:
        trace = str(span.get("trace_id") or "")
        if not trace:
            continue
        label = f"{span.get('service') or '?'}: {span.get('name') or '?'}"
        grouped.setdefault(trace, []).append((int(span.get("start_unix_nano") or 0), label))
    return {t: tuple(label for _, label in sorted(items)) for t, items in grouped.items()}


def select(
    denials: Iterable[Denial],
    *,
    since: timedelta | None = None,
    now: datetime | None = None,
    workload: str | None = None,
    source: str | None = None,
) -> list[Denial]:
    """Filter: newer than ``now - since``; denied at ``workload``; called by ``source`` ("ns/name"
    matched against the caller's SPIFFE namespace and service account or name)."""
    out = []
    cutoff = (now - since) if (since is not None and now is not None) else None
    for d in denials:
        if cutoff is not None and (d.time is None or d.time < cutoff):
            continue
        if workload is not None and d.workload != workload:
            continue
        if source is not None:
            ns, name = source.split("/", 1)
            if f"/ns/{ns}/sa/" not in d.source or not d.source.endswith(f"/{name}"):
                continue
        out.append(d)
    return out


def render(
    denials: Sequence[Denial], *, jaeger: str | None = None, now: datetime | None = None
) -> str:
    """One row per denial; the reason, spans and Jaeger link on the lines below it."""
    headers = ("time", "denied at", "caller", "request", "decided by", "policy#rule", "trace id")
    rows = [headers]
    for d in denials:
        when = d.time.astimezone().strftime("%H:%M:%S") if d.time else "-"
        rows.append(
            (when, d.workload or "-", short_identity(d.source), f"{d.method} {d.path}".strip(),
             d.decider, d.rule_ref, d.trace_id or "-")
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    pad = " " * (widths[0] + 2)
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True)).rstrip()]
    for d, row in zip(denials, rows[1:], strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if d.reason:
            lines.append(f"{pad}why: {d.reason}")
        if d.spans:
            lines.append(f"{pad}spans: " + "; ".join(d.spans))
        if jaeger and d.trace_id:
            lines.append(f"{pad}{jaeger_link(jaeger, d.trace_id)}")
    return "\n".join(lines)
