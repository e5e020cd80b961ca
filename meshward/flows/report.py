"""`meshward report`: what the current policy set allows and what the flows show (pure: the
policy set, the flow totals of a window and ``now`` in, one JSON-ready document out).

- reachability and blast radius come from :mod:`meshward.flows.reach` (the policy evaluator
  over every workload pair), so they agree with ``meshward policy explain`` by construction;
- unused rules, dry-run readiness, compliance and mTLS coverage come from the flow store's
  totals (:mod:`meshward.flows.report_query`): the deciding ``policy#rule`` and the dry-run
  verdicts every sidecar reported;
- emergency allows (``meshward.dev/expires-at``) are read from the policies against ``now``.

The control plane serves the document at ``/report`` (its admin address, next to ``/flows``);
the CLI prints it as text or JSON and renders the HTML page (:mod:`meshward.flows.html`) from
the same document, so every view shows the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from meshward.flows.reach import Reachability, blast_radius, reachability
from meshward.flows.records import ALLOW, DENY, PLAINTEXT
from meshward.flows.report_query import FlowTotal
from meshward.policy.model import Action, AuthorizationPolicy, MtlsMode
from meshward.policy.policyset import PolicySet

DEFAULT_SOON = timedelta(hours=24)  # an emergency allow ending within this is "expiring"
READY = "ready to enforce"
WOULD_DENY = "would deny"
NO_EVIDENCE = "no traffic seen"
# What one document lists at most (counts stay exact): a mesh of 1,000 workloads that all may
# call each other has a million edges, which no reader and no HTTP answer should carry.
MAX_EDGES_LISTED = 20_000
MAX_RADIUS_LISTED = 500  # names per blast-radius list


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _rate(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 4)


def _expired(policy: AuthorizationPolicy, now: datetime) -> bool:
    return policy.expires_at is not None and policy.expires_at <= now


def _selection(policy_set: PolicySet) -> dict[str, list[str]]:
    """Policy ref -> the workloads it selects (one pass over the workloads)."""
    out: dict[str, list[str]] = defaultdict(list)
    for w in policy_set.workloads:
        for policy in policy_set.policies_for(w):
            out[policy.ref].append(w.ref)
    return out


# --------------------------------------------------------------------------- parts


def unused_rules(
    policy_set: PolicySet, totals: Sequence[FlowTotal], now: datetime
) -> list[dict[str, Any]]:
    """Rules of enforced ALLOW, DENY and CUSTOM policies no flow of the window was decided by.
    A flow names only the rule that decided it (the first match in Envoy's order), so a rule
    always shadowed by another is unused too — which is what an operator wants to know. AUDIT
    and dry-run rules decide nothing and are left out; expired policies are under emergency."""
    matched: set[str] = set()
    whole: set[str] = set()  # flows that name a policy but no rule: every rule counts as used
    for total in totals:
        if total.policy:
            matched.add(total.policy)
            if "#" not in total.policy:
                whole.add(total.policy)
    selection = _selection(policy_set)
    out = []
    for policy in policy_set.authorization_policies:
        if policy.dry_run or policy.action is Action.AUDIT or _expired(policy, now):
            continue
        if policy.ref in whole:
            continue
        workloads = selection.get(policy.ref, [])
        for i in range(len(policy.rules)):
            ref = f"{policy.ref}#{i}"
            if ref not in matched:
                out.append(
                    {
                        "rule": ref,
                        "policy": policy.ref,
                        "index": i,
                        "action": policy.action.value,
                        "workloads": workloads,
                        "note": "" if workloads else "the policy selects no declared workload",
                    }
                )
    return out


def emergency(policy_set: PolicySet, now: datetime, soon: timedelta) -> list[dict[str, Any]]:
    selection = _selection(policy_set)
    out = []
    for policy in policy_set.authorization_policies:
        if policy.expires_at is None:
            continue
        left = (policy.expires_at - now).total_seconds()
        state = (
            "expired" if left <= 0 else "expiring" if left <= soon.total_seconds() else "in force"
        )
        out.append(
            {
                "policy": policy.ref,
                "action": policy.action.value,
                "dry_run": policy.dry_run,
                "expires_at": _iso(policy.expires_at),
                "state": state,
                "seconds_left": max(0, int(left)),
                "workloads": selection.get(policy.ref, []),
            }
        )
    return sorted(out, key=lambda e: (e["expires_at"], e["policy"]))


def dry_runs(policy_set: PolicySet, totals: Sequence[FlowTotal]) -> list[dict[str, Any]]:
    """Each dry-run policy with the requests it would have denied in the window. Ready to
    enforce: it would have denied nothing *and* traffic to its workloads was seen (no traffic
    is no evidence)."""
    would: dict[str, int] = defaultdict(int)
    would_sources: dict[str, set[str]] = defaultdict(set)
    inbound: dict[str, int] = defaultdict(int)
    for total in totals:
        if total.decision in (ALLOW, DENY):
            inbound[total.destination] += total.count
        for ref in total.dry_run:
            would[ref] += total.count
            would_sources[ref].add(f"{total.source} -> {total.destination}")
    selection = _selection(policy_set)
    out = []
    for policy in policy_set.authorization_policies:
        if not policy.dry_run:
            continue
        workloads = selection.get(policy.ref, [])
        seen = sum(inbound[w] for w in workloads)
        denied = would[policy.ref]
        state = WOULD_DENY if denied else READY if seen else NO_EVIDENCE
        out.append(
            {
                "policy": policy.ref,
                "action": policy.action.value,
                "workloads": workloads,
                "would_deny": denied,
                "would_deny_pairs": sorted(would_sources[policy.ref])[:50],
                "requests_seen": seen,
                "state": state,
                "ready": state == READY,
            }
        )
    return out


def compliance(totals: Sequence[FlowTotal]) -> dict[str, Any]:
    """Allowed requests that an explicit ALLOW rule let through, against those allowed only
    because no ALLOW policy selects the callee (the default allow a mesh starts from)."""
    allowed = explicit = 0
    open_to: dict[str, int] = defaultdict(int)
    for total in totals:
        if total.decision != ALLOW:
            continue
        allowed += total.count
        if total.policy:
            explicit += total.count
        else:
            open_to[total.destination] += total.count
    return {
        "allowed": allowed,
        "explicit": explicit,
        "no_policy": allowed - explicit,
        "rate": _rate(explicit, allowed),
        "no_policy_destinations": [
            {"destination": d, "count": c}
            for d, c in sorted(open_to.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    }


def mtls(policy_set: PolicySet, totals: Sequence[FlowTotal]) -> dict[str, Any]:
    """Share of requests that arrived over mTLS, and plaintext requests let in because the
    callee's port is PERMISSIVE (or DISABLE): what STRICT would refuse."""
    requests = plain = 0
    permissive: dict[tuple[str, int, str], int] = defaultdict(int)
    for total in totals:
        if total.decision not in (ALLOW, DENY):
            continue
        requests += total.count
        if total.source != PLAINTEXT:
            continue
        plain += total.count
        workload = policy_set.workload(total.destination)
        if workload is None or total.decision != ALLOW:
            continue
        mode = policy_set.mtls_mode(workload, total.port)
        if mode in (MtlsMode.PERMISSIVE, MtlsMode.DISABLE):
            permissive[(total.destination, total.port, mode.value)] += total.count
    return {
        "requests": requests,
        "mtls": requests - plain,
        "plaintext": plain,
        "coverage": _rate(requests - plain, requests),
        "plaintext_permissive": [
            {"destination": d, "port": p, "mode": m, "count": c}
            for (d, p, m), c in sorted(permissive.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    }


def graph_edges(
    reach: Reachability, totals: Sequence[FlowTotal], limit: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One edge per (source, destination) that policy allows or flows used: what the picture
    draws. Observed counts by decision, the dry-run would-deny count, and whether the current
    policy lets the source call the destination at all. Busiest first; at most ``limit``
    (edges traffic used come before those only policy allows), with how many were left out —
    only the listed ones are built, so a million allowed pairs cost no million documents."""
    edges: dict[tuple[str, str], dict[str, Any]] = {}

    def edge(source: str, destination: str) -> dict[str, Any]:
        key = (source, destination)
        if key not in edges:
            allowed = reach.edges.get(key)
            edges[key] = {
                "source": source,
                "destination": destination,
                "policy_allows": allowed is not None,
                "summary": allowed.summary() if allowed is not None else "",
                "allowed": 0,
                "denied": 0,
                "errors": 0,
                "would_deny": 0,
            }
        return edges[key]

    for total in totals:
        e = edge(total.source, total.destination)
        field = {ALLOW: "allowed", DENY: "denied"}.get(total.decision, "errors")
        e[field] += total.count
        if total.dry_run:
            e["would_deny"] += total.count
    observed = sorted(
        edges.values(),
        key=lambda e: (-(e["allowed"] + e["denied"] + e["errors"]), e["source"], e["destination"]),
    )
    room = len(reach.edges) + len(observed) if limit is None else limit
    out = observed[:room]
    unused = 0
    for key in sorted(reach.edges):
        if key in edges:
            continue
        if len(out) < room:
            out.append(edge(*key))
        else:
            unused += 1
    return out, max(0, len(observed) - room) + unused


# --------------------------------------------------------------------------- the report


def build(
    policy_set: PolicySet,
    totals: Sequence[FlowTotal],
    *,
    now: datetime,
    since: datetime | None = None,
    soon: timedelta = DEFAULT_SOON,
    truncated: bool = False,
    reach: Reachability | None = None,
) -> dict[str, Any]:
    """The whole report. ``totals``: the flows of the window (``since`` .. ``now``);
    ``truncated``: the store had more totals than were read; ``reach``: a precomputed
    reachability for this policy set at ``now`` (the control plane caches it per version)."""
    reach = reach or reachability(policy_set, now=now)
    radius = blast_radius(reach.graph)
    for entry in radius.values():
        for name in ("direct", "transitive"):
            entry[f"{name}_truncated"] = max(0, len(entry[name]) - MAX_RADIUS_LISTED)
            entry[name] = entry[name][:MAX_RADIUS_LISTED]
    listed = sorted(reach.edges)[:MAX_EDGES_LISTED]
    edges, edges_cut = graph_edges(reach, totals, MAX_EDGES_LISTED)
    nodes = sorted(
        set(reach.workloads) | {t.source for t in totals} | {t.destination for t in totals}
    )
    declared = set(reach.workloads)
    return {
        "generated_at": _iso(now),
        "policy_version": policy_set.version,
        "window": {"since": _iso(since), "until": _iso(now), "flows_truncated": truncated},
        "workloads": list(reach.workloads),
        "nodes": [{"id": n, "workload": n in declared} for n in nodes],
        "reachability": [reach.edges[k].to_json() for k in listed],
        "reachability_summary": {
            "pairs": len(reach.workloads) * max(0, len(reach.workloads) - 1),
            "reachable_pairs": len(reach.edges),
            "listed": len(listed),
            "unrestricted_pairs": sum(1 for e in reach.edges.values() if e.everything),
            "evaluations": reach.evaluations,
            "skipped": reach.skipped,
            "probes_cut": reach.cut_probes,
        },
        "probes": {
            ref: [p.to_json() for p in probes] for ref, probes in sorted(reach.probes.items())
        },
        "conditional_rules": {k: list(v) for k, v in sorted(reach.conditional_rules.items())},
        "blast_radius": radius,
        "unused_rules": unused_rules(policy_set, totals, now),
        "emergency": emergency(policy_set, now, soon),
        "dry_run": dry_runs(policy_set, totals),
        "compliance": compliance(totals),
        "mtls": mtls(policy_set, totals),
        "edges": edges,
        "edges_truncated": edges_cut,
    }
