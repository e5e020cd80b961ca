"""`meshward denials`: recent denials of a running (or finished ``--state``) demo."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshward.cliutil import (
    add_json_flag,
    did_you_mean,
    duration,
    non_negative_int,
    parse_workload_ref,
    print_json,
)
from meshward.errors import UserError

EPILOG = """\
examples:
  meshward denials                              # the running (or last) `meshward demo`
  meshward denials --since 10m --workload shop/payments
  meshward denials --from shop/orders --json
  meshward denials --jaeger http://localhost:16686   # a link to each trace
  meshward denials --state /tmp/mw --dry-run    # a finished `meshward demo --state /tmp/mw`,
                                                # with what dry-run policies would deny
  meshward denials --xds 127.0.0.1:15011        # fleet-wide: every sidecar's denials, mTLS
                                                # refusals included, from the control plane
  meshward denials --xds 127.0.0.1:15011 --trace 4bf92f3577b34da6a3ce929d0e0e4736

sources (without --xds): each sidecar's JSON access log (Envoy RBAC denials: rbac_access_denied_matched_policy,
ext_authz denials: ext_authz_denied) and the ext_authz decision log (policy, rule, reason), as
listed in the demo's state.json; an ext_authz denial found in both is listed once.
In Jaeger: service meshward-extauthz with tag meshward.decision=deny, or the sidecars' spans
with http.status_code=403.
"""


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) <= len("https://"):
        raise argparse.ArgumentTypeError(
            f"expected an http(s) URL such as http://localhost:16686, got {text!r}"
        )
    return text


def run(args: argparse.Namespace) -> int:
    if args.xds is not None:  # fleet-wide, from the control plane's flow store
        from meshward.flows.cli import run_denials

        if args.workload:
            args.to = args.workload
        return run_denials(args)
    from meshward.demo import state as demo_state
    from meshward.demo.traces import read_spans
    from meshward.flows import denials as core

    location = demo_state.find_state(args.state)
    state = demo_state.load(location)
    from meshward.telemetry.limits import read_rotated  # the file and its rotated backups

    access = {ref: read_rotated(w.access_log) for ref, w in state.workloads.items()}
    spans = read_spans(Path(state.trace_file)) if state.trace_file else []
    every = core.collect(
        access, read_rotated(state.decision_log), spans=spans, include_dry_run=args.dry_run
    )
    now = datetime.now(UTC)
    workload = "/".join(args.workload) if args.workload else None
    source = "/".join(args.source) if args.source else None
    for flag, ref in (("--workload", workload), ("--from", source)):
        if ref is not None and state.workloads and ref not in state.workloads:
            known = sorted(state.workloads)
            raise UserError(
                f"{flag} {ref}: no such workload in this demo{did_you_mean(ref, known)} "
                f"(known: {', '.join(known)})"
            )
    chosen = core.select(every, since=args.since, now=now, workload=workload, source=source)
    if args.trace:
        chosen = [d for d in chosen if d.trace_id == args.trace.lower()]
    older = len(core.select(every, workload=workload, source=source)) - len(chosen)
    if args.limit:
        chosen = chosen[-args.limit :]
    if args.json:
        print_json(
            {
                "state": str(location),
                "running": state.alive() if state.kind == "local" else None,
                "since": args.since.total_seconds() if args.since else None,
                "denials": [d.to_json(args.jaeger) for d in chosen],
                "older": older,
            }
        )
        return 0
    running = state.alive() if state.kind == "local" else True
    window = f"in the last {_span(args.since)}" if args.since else "so far"
    print(
        f"{len(chosen)} denial{'s' if len(chosen) != 1 else ''} {window} "
        f"({'running' if running else 'stopped'} {state.kind} demo, {location})"
    )
    if chosen:
        print(core.render(chosen, jaeger=args.jaeger))
    if older > 0:
        print(f"({older} older; widen with --since, e.g. --since 24h)")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List recent denials of a running (or finished --state) `meshward demo`, whoever made\n"
        "them: Envoy RBAC (from the sidecars' access logs) or ext_authz (its decision log),\n"
        "with the policy, rule, reason and trace id."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--since", type=duration, default=timedelta(hours=1), metavar="DURATION",
                        help="only denials newer than this, e.g. 10m, 2h (default: 1h)")  # fmt: skip
    parser.add_argument("--workload", type=parse_workload_ref, metavar="NS/NAME",
                        help="only denials made at this workload's sidecar (the callee)")  # fmt: skip
    parser.add_argument("--from", dest="source", type=parse_workload_ref, metavar="NS/NAME",
                        help="only denials of calls made by this workload")  # fmt: skip
    parser.add_argument("--state", metavar="DIR",
                        help="the demo's state directory or state.json (default: the last "
                             "`meshward demo` run, as recorded at start)")  # fmt: skip
    parser.add_argument("--jaeger", type=_url, metavar="URL",
                        help="print a link to each trace in this Jaeger UI, e.g. http://localhost:16686")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true",
                        help="also list what dry-run policies would have denied (nothing was)")  # fmt: skip
    parser.add_argument("--limit", type=non_negative_int, default=0, metavar="N",
                        help="only the newest N (default: all)")  # fmt: skip
    parser.add_argument("--trace", metavar="ID", help="only the denial(s) of this trace id")
    from meshward.xds.status_cli import add_admin_flags

    add_admin_flags(parser)
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
