"""The tour's results as a table a person reads top to bottom (pure: results in, text out)."""

from __future__ import annotations

from collections.abc import Sequence

from meshward.demo.tour import CallResult, EditResult, TourResult
from meshward.flows.evidence import EXTAUTHZ, RBAC

HEADERS = ("#", "caller -> callee", "request", "expect", "actual", "decided by", "policy#rule")


def _row(r: CallResult) -> tuple[str, ...]:
    actual = r.actual + ("" if r.ok else " !!")
    return (
        str(r.index),
        r.call.who,
        r.call.request,
        r.call.expect,
        actual,
        r.decider,
        "(none matched)" if r.policy is None and r.decider in (RBAC, EXTAUTHZ) else r.rule_ref,
    )


def _details(r: CallResult) -> list[str]:
    first = f"trace {r.trace_id}" if r.trace_id else ""
    if r.reason and (r.actual == "deny" or r.decider == "ext_authz"):
        first += f"  why: {r.reason}"
    lines = [first.strip()]
    if r.would_deny:
        lines.append("dry-run (not enforced) would deny: " + ", ".join(r.would_deny))
    if r.extauthz in ("miss", "hit"):  # what ext_authz reported back (access-log metadata)
        lines.append(f"ext_authz decision cache: {r.extauthz}")
    if r.call.note:
        lines.append(f"note: {r.call.note}")
    lines.extend(f"EXPECTATION FAILED: {p}" for p in r.problems)
    return [line for line in lines if line]


def render(result: TourResult, *, details: bool = True) -> str:
    calls = [r for r in result.results if isinstance(r, CallResult)]
    rows = [HEADERS, *(_row(r) for r in calls)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    indent = " " * (widths[0] + 2)
    out: list[str] = []
    section = None
    for r in result.results:
        current = r.edit.section if isinstance(r, EditResult) else r.call.section
        if current != section:
            section = current
            out.extend(["", f"== {section}", line(HEADERS)])
        if isinstance(r, EditResult):
            state = (
                f"policy {r.policy_version[:12]}, every sidecar ACKed in {r.seconds:.1f}s"
                if r.ok
                else "FAILED: " + "; ".join(r.problems)
            )
            out.append(f"{str(r.index).ljust(widths[0])}  ~ edit: {r.edit.title} ({state})")
            continue
        out.append(line(_row(r)))
        if details:
            out.extend(f"{indent}{d}" for d in _details(r))
    held = sum(1 for r in result.results if r.ok)
    total = len(result.results)
    verdict = "every expectation held" if result.ok else f"{total - held} FAILED"
    out.extend(["", f"{held}/{total} steps as expected in {result.seconds:.1f}s: {verdict}"])
    return "\n".join(out).lstrip("\n")
