"""`meshward flows` and `meshward denials --xds`: the fleet's flows and denials, read from the
control plane's admin address (``GET /flows``, ``GET /denials``), as `meshward status` does.

Thin: arguments -> query parameters -> rows -> a table or ``--json``. Exit codes: 0 rows printed
(even none); 1 the control plane cannot be reached or has no flow collector; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from meshward.cliutil import (
    add_json_flag,
    admin_get,
    duration,
    parse_workload_ref,
    print_json,
)
from meshward.errors import UserError
from meshward.xds.status_cli import add_admin_flags, default_admin

EPILOG = """\
examples:
  meshward flows                                  # the running `meshward demo`'s control plane
  meshward flows --xds 127.0.0.1:15011 --since 10m
  meshward flows --xds 127.0.0.1:15011 --from shop/frontend --to shop/orders --json
  meshward flows --xds 127.0.0.1:15011 --decision deny

Every sidecar streams its access log to the control plane over Envoy's gRPC access log service;
the control plane folds requests into flows: source -> destination, port, method, path template
(ids such as /orders/42 become /orders/{*}), decision (allow, deny, error) and the deciding
policy#rule, with counts and first/last seen. Callers whose identity names no workload are
'unknown'; clients without mTLS are 'plaintext'.
--xds: the admin address `meshward xds serve` prints (its --admin; default: the running demo's,
else 127.0.0.1:15011).
exit status: 0 rows printed (maybe none); 1 the control plane is unreachable or collects no flows.
"""
DECISIONS = ("allow", "deny", "error")


def fetch(address: str, path: str, params: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    rows = fetch_json(address, path, params, timeout).get("rows")
    if not isinstance(rows, list):
        raise UserError(f"{address}{path}: the answer has no rows (not a Meshward control plane?)")
    return rows


def fetch_json(address: str, path: str, params: dict[str, str], timeout: float) -> dict[str, Any]:
    """One JSON object from the admin address; every failure is a UserError that says what to
    do (never a traceback)."""
    body = admin_get(
        address, path, params, timeout,
        missing="that control plane collects no flows (started with --flows-db off, or an "
        "older version)",
    )  # fmt: skip
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise UserError(
            f"{address}{path}: not JSON ({exc}): not a Meshward control plane?"
        ) from None
    if not isinstance(document, dict):
        raise UserError(f"{address}{path}: not a JSON object: not a Meshward control plane?")
    return document


def _params(args: argparse.Namespace, now: datetime) -> dict[str, str]:
    params: dict[str, str] = {"limit": str(min(1000, getattr(args, "limit", 0) or 200))}
    if getattr(args, "source", None):
        params["from"] = "/".join(args.source)
    if getattr(args, "to", None):
        params["to"] = "/".join(args.to)
    if getattr(args, "decision", None):
        params["decision"] = args.decision
    if getattr(args, "since", None):
        params["since"] = str(int((now - args.since).timestamp()))
    if getattr(args, "trace", None):
        params["trace"] = args.trace
    return params


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def run_flows(args: argparse.Namespace) -> int:
    address = args.xds or default_admin()
    rows = fetch(address, "/flows", _params(args, datetime.now(UTC)), args.timeout)
    if args.json:
        print_json({"xds": address, "flows": rows})
        return 0
    print(f"{len(rows)} flow{'s' if len(rows) != 1 else ''} ({address})")
    if rows:
        print(
            _table(
                ("source", "destination", "request", "decision", "policy", "count", "last seen"),
                [
                    (r["source"], f"{r['destination']}:{r['port']}",
                     f"{r['method']} {r['path']}".strip() or "(connection)", r["decision"],
                     r["policy"] or "-", str(r["count"]), r["last_seen"])
                    for r in rows
                ],
            )
        )  # fmt: skip
    return 0


def run_denials(args: argparse.Namespace) -> int:
    """`meshward denials --xds`: fleet-wide, from the control plane's flow store."""
    address = args.xds or default_admin()
    rows = fetch(address, "/denials", _params(args, datetime.now(UTC)), args.timeout)
    if args.json:
        print_json({"xds": address, "denials": rows})
        return 0
    print(f"{len(rows)} denial{'s' if len(rows) != 1 else ''} ({address})")
    if rows:
        print(
            _table(
                ("time", "source", "destination", "request", "policy", "trace id"),
                [
                    (r["time"], r["source"], f"{r['destination']}:{r['port']}",
                     f"{r['method']} {r['path']}".strip() or "(connection)", r["policy"] or "-",
                     r["trace_id"] or "-")
                    for r in rows
                ],
            )
        )  # fmt: skip
        for r in rows[:20]:
            print(f"  {r['time']} {r['source']} -> {r['destination']}: {r['reason']}")
    return 0


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"expected 1..1000, got {text!r}")
    return int(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List the fleet's flows (who called whom, how, and what was decided), as every sidecar\n"
        "reported them to the control plane."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_admin_flags(parser)
    parser.add_argument("--from", dest="source", type=parse_workload_ref, metavar="NS/NAME",
                        help="only flows from this workload")  # fmt: skip
    parser.add_argument("--to", type=parse_workload_ref, metavar="NS/NAME",
                        help="only flows to this workload")  # fmt: skip
    parser.add_argument("--decision", choices=DECISIONS, help="only flows with this decision")
    parser.add_argument("--since", type=duration, metavar="DURATION",
                        help="only flows seen in this window, e.g. 10m, 2h (default: all kept)")  # fmt: skip
    parser.add_argument("--limit", type=_limit, default=200, metavar="N",
                        help="at most N rows, most recent first (1..1000, default 200)")  # fmt: skip
    add_json_flag(parser)
    parser.set_defaults(func=run_flows)
