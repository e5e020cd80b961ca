"""Tour chapter "least privilege from observed traffic": the steps (data) and the judging (pure).

The story the issue asks the demo to tell: the shop starts with no AuthorizationPolicy at all
(mTLS on, nothing denied), normal traffic flows, ``meshward policy suggest`` writes per-workload
allow lists from what it observed, the dry-run copy shows that normal traffic would be untouched
while an attack path would be denied, the enforcing copy goes live, and the blast radius of
every workload (what an attacker holding it could reach) is printed before and after.

Everything here is pure so it is unit-tested without a mesh; the live run, which shells out to
``meshward policy suggest`` and ``meshward report`` (their command contracts, not their
modules), is :mod:`meshward.demo.tour_leastpriv_run`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshward.demo.tour import ALLOW, DENY, NONE, Call
from meshward.flows.evidence import NO_POLICY, NO_ROUTE, RBAC

CHAPTER = "least-privilege"
TITLE = "least privilege from observed traffic"
SUGGESTED_PREFIX = "shop/suggested-"  # `policy suggest` names each policy suggested-<workload>
# A dry-run ALLOW set that matches no rule has no single deciding policy: the evidence says so.
DRY_RUN_ALLOW = "(dry-run ALLOW)"

FE, ORD, PAY, INV, SCR = (
    "shop/frontend",
    "shop/orders",
    "shop/payments",
    "shop/inventory",
    "shop/scraper",
)


def suggested(workload: str) -> str:
    """The policy `policy suggest` writes for ``workload`` (``shop/suggested-orders``)."""
    return SUGGESTED_PREFIX + workload.split("/", 1)[1]


# -- traffic -------------------------------------------------------------------------------------
# What the shop does all day. Ids vary (42, 43, sku-1, sku-2) so the suggestion has to generalize
# them into a path template; the scraper reads /metrics everywhere.
NORMAL: tuple[tuple[str, str, str, str], ...] = (
    (FE, ORD, "GET", "/orders/42"),
    (FE, ORD, "GET", "/orders/43"),
    (FE, ORD, "POST", "/orders"),
    (ORD, PAY, "POST", "/payments"),
    (ORD, INV, "GET", "/inventory/sku-1"),
    (ORD, INV, "GET", "/inventory/sku-2"),
    *((SCR, target, "GET", "/metrics") for target in (FE, ORD, INV, PAY)),
)

# What an attacker holding one workload's identity would try: nothing the shop ever does.
# (source, target, method, path, why, decider once enforced)
ATTACKS: tuple[tuple[str, str, str, str, str, str], ...] = (
    (FE, PAY, "POST", "/payments", "a compromised frontend charges cards directly", NO_ROUTE),
    (SCR, PAY, "POST", "/admin", "a compromised scraper pokes at payments' admin API", RBAC),
    (ORD, INV, "DELETE", "/inventory/sku-1", "orders never deletes stock", RBAC),
)
# Nobody calls the scraper, so suggest closes it (allow-nothing): in dry-run the pivot is only
# reported (the shadow ALLOW engine of a ruleless dry-run ALLOW), once enforced it is denied.
UNCALLED = (SCR,)  # the shop's workloads no NORMAL call reaches
PIVOT = (PAY, SCR, "GET", "/metrics", "a compromised payments pivots through the scraper", NO_ROUTE)

S_OPEN = "no authorization policy yet: mTLS on, nothing denied (the traffic suggest learns from)"
S_DRY = "suggested policies in dry-run: normal traffic untouched, attacks only logged"
S_ENFORCED = "suggested policies enforced: normal traffic allowed, attacks denied"
S_NEVER_SEEN = "a new id under a learned path template is still allowed"


def open_traffic() -> tuple[Call, ...]:
    """Phase 1: no policy selects anything, so every call is allowed and no policy decides."""
    return tuple(
        Call(S_OPEN, src, dst, method, path, ALLOW, NO_POLICY) for src, dst, method, path in NORMAL
    )


def dry_run_traffic() -> tuple[Call, ...]:
    """Phase 2: the suggested policies are dry-run. Normal calls: no would-deny at all; each
    attack: allowed (dry-run enforces nothing) but the callee's dry-run ALLOW set (its suggested
    policy, or allow-nothing where nobody calls it) matches no rule: it would deny."""
    normal = tuple(
        Call(S_DRY, src, dst, method, path, ALLOW, would_deny=())
        for src, dst, method, path in NORMAL
    )
    attacks = tuple(
        Call(S_DRY, src, dst, method, path, ALLOW, would_deny=(DRY_RUN_ALLOW,), note=why)
        for src, dst, method, path, why, _ in (*ATTACKS, PIVOT)
    )
    return normal + attacks


def enforced_traffic() -> tuple[Call, ...]:
    """Phase 3: enforced. Normal calls are allowed by their callee's suggested policy (rule 0:
    one rule per caller, the first caller in name order here); attacks are denied — by RBAC
    where the caller may reach the callee at all, and before any HTTP where the suggestion
    gave the caller no route to it."""
    normal = tuple(
        Call(S_ENFORCED, src, dst, method, path, ALLOW, RBAC) for src, dst, method, path in NORMAL
    )
    attacks = tuple(
        Call(
            S_ENFORCED, src, dst, method, path, DENY, decider,
            NONE if decider == RBAC else None, note=why,
        )
        for src, dst, method, path, why, decider in (*ATTACKS, PIVOT)
    )  # fmt: skip
    unseen = (Call(S_NEVER_SEEN, FE, ORD, "GET", "/orders/977", ALLOW, RBAC, suggested(ORD)),)
    return normal + attacks + unseen


# -- phases --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    title: str
    calls: tuple[Call, ...]
    rounds: int = 1  # send the calls this many times (evidence: flows seen more than once)


@dataclass(frozen=True)
class Suggest:
    title: str
    mode: str  # "dry-run" or "enforce": `meshward policy suggest --mode`
    out: str  # directory name under the chapter's work dir


@dataclass(frozen=True)
class Apply:
    title: str
    source: str  # a Suggest step's ``out``: its files go into the policy directory


@dataclass(frozen=True)
class Report:
    label: str  # "before" / "after": a blast-radius snapshot via `meshward report --json`


Phase = Traffic | Suggest | Apply | Report

STEPS: tuple[Phase, ...] = (
    Report("before"),
    Traffic(S_OPEN, open_traffic(), rounds=2),
    # Both modes from the same observed flows: the enforcing twin is what was reviewed in
    # dry-run (suggesting again later would learn from the attacks dry-run let through).
    Suggest("suggest allow lists (dry-run) from the observed allowed flows", "dry-run", "dry-run"),
    Suggest("the same suggestion, enforcing", "enforce", "enforce"),
    Apply("apply the dry-run suggestion", "dry-run"),
    Traffic(S_DRY, dry_run_traffic()),
    Apply("enforce: replace the dry-run files with their enforcing twins", "enforce"),
    Traffic(S_ENFORCED, enforced_traffic()),
    Report("after"),
)


# -- judging -------------------------------------------------------------------------------------
def baseline_documents(policy_set: Any) -> str:
    """The shop as the chapter starts it: the same mesh, workloads and mTLS, no authorization
    (and no end-user JWT rules: nothing selects a workload, so nothing is denied)."""
    from meshward.policy import PolicySet

    return str(
        PolicySet.create(
            mesh=policy_set.mesh,
            workloads=policy_set.workloads,
            peer_authentications=policy_set.peer_authentications,
        ).dump()
    )


@dataclass(frozen=True)
class SuggestVerdict:
    mode: str
    files: tuple[str, ...]  # file paths written
    workloads: tuple[str, ...]
    closed: tuple[str, ...]  # given allow-nothing: no caller observed
    coverage: str  # "10/10 (100.0%)"
    would_deny: int  # probes the suggestion would deny that the current policy allows
    warnings: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "files": list(self.files),
            "workloads": list(self.workloads),
            "closed": list(self.closed),
            "coverage": self.coverage,
            "would_deny": self.would_deny,
            "warnings": list(self.warnings),
            "ok": self.ok,
            "problems": list(self.problems),
        }


def judge_suggest(
    mode: str, code: int, report: Mapping[str, Any] | None, stderr: str = ""
) -> SuggestVerdict:
    """``meshward policy suggest --json``'s answer, held to what the chapter needs: exit 0,
    valid files, every observed allowed flow allowed (100 %), a policy for each called workload
    in the requested mode, and allow-nothing for exactly the workloads nobody called (left
    without a policy, they would stay open to every caller: a pivot)."""
    if report is None:
        first = (stderr.strip().splitlines() or ["no JSON on stdout"])[-1]
        failed = f"suggest failed (exit {code}): {first}"
        return SuggestVerdict(mode, (), (), (), "-", 0, (), (failed,))
    problems: list[str] = []
    if code != 0:
        problems.append(f"suggest exited {code}")
    if report.get("mode") != mode:
        problems.append(f"asked for {mode}, got {report.get('mode')}")
    if not report.get("valid", False):
        problems.append(f"the suggestion does not validate: {report.get('validation_error')}")
    files = [f for f in report.get("files") or () if isinstance(f, Mapping)]
    workloads = tuple(sorted(str(f.get("workload")) for f in files))
    called = sorted({dst for _, dst, _, _ in NORMAL})
    missing = [w for w in called if w not in workloads]
    if missing:
        problems.append(f"no suggested policy for {', '.join(missing)}")
    closed = tuple(sorted(str(w) for w in report.get("closed") or ()))
    if closed != tuple(sorted(UNCALLED)):
        problems.append(
            f"allow-nothing for {', '.join(closed) or 'no workload'}, expected for "
            f"{', '.join(UNCALLED)} (called by nobody)"
        )
    cov = report.get("coverage") or {}
    allowed, total = cov.get("allowed", 0), cov.get("flows", 0)
    if not total or allowed != total:
        problems.append(f"coverage {allowed}/{total}: some observed allowed flow is not allowed")
    warnings = tuple(
        str(w.get("message", w)) if isinstance(w, Mapping) else str(w)
        for w in report.get("warnings") or ()
    )
    changes = (report.get("would_deny") or {}).get("changes") or ()
    return SuggestVerdict(
        mode=mode,
        files=tuple(str(f.get("file")) for f in files),
        workloads=workloads,
        closed=closed,
        coverage=f"{allowed}/{total} ({cov.get('percent', 0)}%)",
        would_deny=len(changes),
        warnings=warnings,
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class RadiusRow:
    workload: str
    direct_before: int
    direct_after: int
    transitive_before: int
    transitive_after: int
    reach_after: tuple[str, ...]  # workloads it can still reach, transitively


@dataclass(frozen=True)
class RadiusVerdict:
    rows: tuple[RadiusRow, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "workloads": {
                r.workload: {
                    "direct": [r.direct_before, r.direct_after],
                    "transitive": [r.transitive_before, r.transitive_after],
                    "reach_after": list(r.reach_after),
                }
                for r in self.rows
            },
        }


def _radius(blast: Mapping[str, Any], ref: str) -> tuple[int, int, tuple[str, ...]]:
    entry = blast.get(ref) or {}
    transitive = tuple(str(t) for t in entry.get("transitive") or ())
    return (
        int(entry.get("direct_count", len(entry.get("direct") or ()))),
        int(entry.get("transitive_count", len(transitive))),
        transitive,
    )


def judge_radius(before: Mapping[str, Any], after: Mapping[str, Any]) -> RadiusVerdict:
    """Blast radius (``meshward report --json``'s ``blast_radius``) before and after: no
    workload may reach more than before, the fleet as a whole must reach strictly less, and a
    workload nobody should call from (payments, inventory: leaves of the shop) reaches nothing."""
    problems: list[str] = []
    rows = []
    for ref in sorted(set(before) | set(after)):
        d0, t0, _ = _radius(before, ref)
        d1, t1, reach = _radius(after, ref)
        rows.append(RadiusRow(ref, d0, d1, t0, t1, reach))
        if t1 > t0 or d1 > d0:
            problems.append(f"{ref} reaches more after enforcing ({t0} -> {t1})")
    if not before or not after:
        problems.append("no blast radius in the report")
    elif sum(r.transitive_after for r in rows) >= sum(r.transitive_before for r in rows):
        problems.append("enforcing did not shrink any blast radius")
    for leaf in (PAY, INV):  # they call nobody: nothing should be reachable from them
        if _radius(after, leaf)[1]:
            problems.append(f"{leaf} still reaches {', '.join(_radius(after, leaf)[2])}")
    return RadiusVerdict(tuple(rows), tuple(problems))


def render_radius(verdict: RadiusVerdict) -> str:
    """A table: per workload, what it reaches directly / transitively, before -> after."""
    head = ("workload", "direct", "transitive", "can still reach")
    rows = [head] + [
        (
            r.workload,
            f"{r.direct_before} -> {r.direct_after}",
            f"{r.transitive_before} -> {r.transitive_after}",
            ", ".join(w.split("/", 1)[-1] for w in r.reach_after) or "nothing",
        )
        for r in verdict.rows
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.extend(f"EXPECTATION FAILED: {p}" for p in verdict.problems)
    return "\n".join(lines)


def render_suggest(verdict: SuggestVerdict) -> str:
    lines = [
        f"{len(verdict.files)} policy file(s) ({verdict.mode}) for "
        f"{', '.join(verdict.workloads) or 'no workload'}; coverage {verdict.coverage}; "
        f"would deny {verdict.would_deny} probe(s) the open mesh allows"
    ]
    if verdict.closed:
        lines.append(f"  allow-nothing (no caller observed): {', '.join(verdict.closed)}")
    lines.extend(f"  thin evidence: {w}" for w in verdict.warnings[:5])
    lines.extend(f"EXPECTATION FAILED: {p}" for p in verdict.problems)
    return "\n".join(lines)


def attack_paths(calls: Sequence[Call]) -> list[Call]:
    """The calls of a phase that are attacks (they carry the attack's explanation)."""
    notes = {why for *_, why, _ in (*ATTACKS, PIVOT)}
    return [c for c in calls if c.note in notes]


def flows_missing(rows: Sequence[Mapping[str, Any]], calls: Sequence[Call]) -> list[str]:
    """The calls' (caller, callee, method) not yet among the flow store's allowed rows: suggest
    must not run before the store has them (it writes once a second)."""
    seen = {
        (r.get("source"), r.get("destination"), r.get("method"))
        for r in rows
        if r.get("decision") == ALLOW
    }
    wanted = sorted({(c.source, c.target, c.method) for c in calls if c.expect == ALLOW})
    return [f"{s} -> {d} {m}" for s, d, m in wanted if (s, d, m) not in seen]
