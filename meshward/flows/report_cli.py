"""`meshward report --xds HOST:PORT`: the control plane's ``/report`` as text, ``--json`` or a
self-contained HTML page (``--html FILE``). Thin: flags -> query -> one document -> a view;
every view is drawn from the same document, so they show the same numbers.

Exit codes: 0 report printed; 1 the control plane cannot be reached, collects no flows, or the
HTML file cannot be written; 2 usage errors.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshward.cliutil import add_json_flag, duration, print_json
from meshward.errors import UserError

EPILOG = """\
examples:
  meshward report                                  # the running `meshward demo`'s control plane
  meshward report --xds 127.0.0.1:15011 --since 24h
  meshward report --xds 127.0.0.1:15011 --json | jq '.blast_radius'
  meshward report --xds 127.0.0.1:15011 --html report.html   # open it in a browser

What it shows:
  reachability   which workload may call which, with which methods and paths, under the
                 policy set in force: every workload pair is run through the policy evaluator
                 (the one behind `meshward policy explain`), with requests probing every method
                 and path pattern the rules name plus one they do not ("any other").
  blast radius   per workload, what a compromised one could call directly and transitively.
  unused rules   enforced rules no flow in the window was decided by.
  emergency      policies with meshward.dev/expires-at: in force, expiring, expired.
  dry-run        dry-run policies with the requests they would have denied; "ready to enforce"
                 when that is zero and traffic was seen.
  compliance     allowed requests an explicit ALLOW rule let through vs. those allowed only
                 because no ALLOW policy selects the callee.
  mTLS           share of requests over mTLS; plaintext ones let in by PERMISSIVE ports.
The HTML page draws the service graph: green edges carried allowed traffic, red ones denied
traffic, amber dashed ones traffic a dry-run policy would deny, grey ones are allowed by policy
but unused. It needs no network (inline SVG and script); click a workload for its blast radius.

--xds: the admin address `meshward xds serve` prints (its --admin; default: the running demo's,
else 127.0.0.1:15011).
exit status: 0 report printed; 1 unreachable control plane, no flow collector, or the HTML file
cannot be written; 2 usage errors.
"""


def _pct(value: Any) -> str:
    return "n/a (no requests in the window)" if value is None else f"{100 * float(value):.1f} %"


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    from meshward.flows.cli import _table as table

    return table(headers, [tuple(str(c) for c in row) for row in rows]).splitlines()


def render_text(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    window = doc["window"]
    since = window["since"] or "everything kept"
    lines.append(f"Meshward report at {doc['generated_at']} (policy {doc['policy_version'][:12]})")
    lines.append(f"flows: {since} .. {window['until']}")
    if window.get("flows_truncated"):
        lines.append("  note: more flow totals than the report reads; the rarest were left out")
    summary = doc["reachability_summary"]
    lines.append("")
    lines.append(
        f"REACHABILITY: {summary['reachable_pairs']} of {summary['pairs']} workload pairs may "
        f"connect ({summary['unrestricted_pairs']} without any restriction)"
    )
    if summary["skipped"]:
        lines.append(f"  not computed: {summary['skipped']}")
    rows = [(e["source"], e["destination"], e["summary"], ", ".join(r or "(no ALLOW policy)"
             for r in e["rules"])) for e in doc["reachability"]]  # fmt: skip
    if rows:
        lines += ["  " + x for x in _table(("source", "destination", "may", "allowed by"), rows)]
    for callee, rules in doc["conditional_rules"].items():
        lines.append(
            f"  {callee}: also reachable with an end-user token/header: {', '.join(rules)}"
        )
    lines.append("")
    lines.append("BLAST RADIUS (if compromised, it could reach)")
    radius = sorted(doc["blast_radius"].items(), key=lambda kv: (-kv[1]["transitive_count"], kv[0]))
    lines += [
        "  " + x
        for x in _table(
            ("workload", "direct", "transitive", "transitively reaches"),
            [
                (w, r["direct_count"], r["transitive_count"], ", ".join(r["transitive"]) or "-")
                for w, r in radius
            ],
        )
    ]
    lines.append("")
    unused = doc["unused_rules"]
    lines.append(f"UNUSED RULES (decided no flow in the window): {len(unused)}")
    for u in unused:
        note = f" ({u['note']})" if u["note"] else ""
        lines.append(f"  {u['rule']} [{u['action']}] on {', '.join(u['workloads']) or '-'}{note}")
    lines.append("")
    lines.append(f"EMERGENCY ALLOWS: {len(doc['emergency'])}")
    for e in doc["emergency"]:
        lines.append(f"  {e['policy']}: {e['state']} (expires {e['expires_at']})")
    lines.append("")
    lines.append(f"DRY-RUN POLICIES: {len(doc['dry_run'])}")
    for d in doc["dry_run"]:
        detail = f"would deny {d['would_deny']} requests" if d["would_deny"] else d["state"]
        lines.append(
            f"  {d['policy']} [{d['action']}]: {detail} ({d['requests_seen']} requests seen)"
        )
        for pair in d["would_deny_pairs"][:5]:
            lines.append(f"    {pair}")
    c = doc["compliance"]
    lines.append("")
    lines.append(
        f"COMPLIANCE: {_pct(c['rate'])} of {c['allowed']} allowed requests matched an explicit "
        f"ALLOW rule; {c['no_policy']} were allowed because no ALLOW policy selects the callee"
    )
    for d in c["no_policy_destinations"][:10]:
        lines.append(f"  {d['destination']}: {d['count']} requests with no ALLOW policy")
    m = doc["mtls"]
    lines.append("")
    lines.append(
        f"mTLS COVERAGE: {_pct(m['coverage'])} of {m['requests']} requests; "
        f"{m['plaintext']} plaintext"
    )
    for p in m["plaintext_permissive"]:
        lines.append(
            f"  {p['destination']}:{p['port']} let in {p['count']} plaintext requests ({p['mode']})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from meshward.flows.cli import fetch_json
    from meshward.xds.status_cli import default_admin

    address = args.xds or default_admin()
    params: dict[str, str] = {}
    if args.since is not None:
        params["since"] = str(int((datetime.now(UTC) - args.since).timestamp()))
    if args.expiring_within is not None:
        params["soon"] = str(int(args.expiring_within.total_seconds()))
    doc = fetch_json(address, "/report", params, args.timeout)
    if "reachability" not in doc or "blast_radius" not in doc:
        raise UserError(f"{address}/report: not a Meshward report (an older control plane?)")
    if args.html is not None:
        from meshward.flows.html import render

        try:
            Path(args.html).write_text(render(doc), encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write {args.html}: {exc.strerror or exc}") from None
    if args.json:
        print_json({"xds": address, **doc})
    else:
        print(render_text(doc))
        if args.html is not None:
            print(f"\nHTML report written to {args.html}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    from meshward.xds.status_cli import add_admin_flags

    parser.description = (
        "What the policy in force allows and what the flows show: reachability, blast radius,\n"
        "unused rules, emergency allows, dry-run readiness, compliance and mTLS coverage."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_admin_flags(parser)
    parser.add_argument("--since", type=duration, metavar="DURATION",
                        help="flows seen in this window, e.g. 1h, 24h, 7d (default: all kept)")  # fmt: skip
    parser.add_argument("--expiring-within", type=duration, metavar="DURATION",
                        help="an emergency allow ending within this is 'expiring' (default 24h)")  # fmt: skip
    parser.add_argument("--html", metavar="FILE",
                        help="also write a self-contained HTML report with the service graph")  # fmt: skip
    add_json_flag(parser)
    parser.set_defaults(func=run)
