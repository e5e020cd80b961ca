"""`meshward status`: what every sidecar runs, compared to what it should run.

Reads the control plane's admin endpoint (``GET /status``). Exit codes: 0 when every node is in
sync or still converging; 1 when any node drifts (desired != ACKed for longer than the
threshold), does not enforce the policy set (it NACKed a listener or route of the desired
version), or holds ADS credentials from a dropped CA root, the latest policy change was
rejected, or the control plane cannot be reached — so
the command doubles as a health check in scripts and CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from meshward.cliutil import add_json_flag, did_you_mean, positive_float, print_json
from meshward.errors import UserError

TYPES = ("CDS", "EDS", "SDS", "LDS", "RDS")
DEFAULT_ADMIN = "127.0.0.1:15011"  # `meshward xds serve --admin` default

EPILOG = """\
examples:
  meshward status                                   # the running `meshward demo`, else
                                                    # 127.0.0.1:15011 (xds serve's default admin)
  meshward status --xds 127.0.0.1:15011 --json
  meshward status --xds 127.0.0.1:15011 --node shop/orders

--xds takes the admin address `meshward xds serve` prints (its --admin). Given the ADS address
instead, status uses the admin endpoint of the running demo whose ADS that is, else tries
port + 1 (xds serve's default layout: ADS 15010, admin 15011); the demo picks free ports, so
there only its recorded admin address works.

columns: per xDS type, ok = ACKed the desired version; pending = being pushed (under the drift
threshold); STALE = behind for longer than the threshold (drift); NACK = the node rejected the
latest version and keeps its last good one; - = not subscribed.
STATE NOT ENFORCED: the node rejected a listener or route of the desired version, so the policy
set in force does not apply there (the policy documents involved and Envoy's error follow the
table); it clears once the node ACKs a version without the rejected content.
ADS CREDS: the CA root the sidecar's ADS client certificate (its SVID) chains to: ok; RETIRING
= that root is dropped at the end of a `meshward ca rotate` grace period: an agent renews onto
the new root by itself, an operator-run Envoy needs `meshward bootstrap --renew` before then;
UNTRUSTED = already dropped: the sidecar cannot reconnect once its stream ends.
versions: a type's version is a digest of its content (the same on every control plane replica
and after a restart); the policy set's version is shown on its own line.
exit status: 0 all nodes in sync or converging; 1 any node drifts, is NOT ENFORCED or has
UNTRUSTED ADS credentials, the last policy change was rejected, the control plane is
unreachable, or a --node names no node there.
"""


def _get(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


MAX_PAGES = 1000  # 1,000 nodes a page: a million nodes, far past any fleet this serves


def fetch_nodes(base: str, timeout: float, nodes: Sequence[str]) -> dict[str, Any]:
    """The per-node view, page after page (the endpoint answers at most 1,000 nodes at once)."""
    filters = "".join(f"&node={urllib.parse.quote(n, safe='')}" for n in nodes)
    status = _get(f"{base}/status?view=nodes{filters}", timeout)
    offset = (status.get("page") or {}).get("next_offset")
    for _ in range(MAX_PAGES):
        if offset is None:
            break
        more = _get(f"{base}/status?view=nodes&offset={offset}{filters}", timeout)
        status["nodes"].extend(more["nodes"])
        offset = (more.get("page") or {}).get("next_offset")
    status.pop("page", None)
    return status


def fetch_status(
    address: str,
    timeout: float = 5.0,
    *,
    demo_admin: str | None = None,
    demo_ads: str | None = None,
    nodes: Sequence[str] = (),
) -> dict[str, Any]:
    """GET /status?view=nodes (every page; only ``nodes`` when given) from the admin endpoint
    at ``address``. When ``address`` is the ADS address
    of the running demo (``demo_ads``), its recorded admin endpoint; otherwise, after
    ``address`` itself, port + 1 (`meshward xds serve`'s default admin next to its ADS)."""
    base = address if "://" in address else f"http://{address}"
    if demo_admin and demo_ads and _hostport(address) == _hostport(demo_ads):
        candidates = [demo_admin]
    else:
        candidates = [base]
        host, _, port = base.rpartition(":")
        if port.isdigit() and int(port) < 65535:
            candidates.append(f"{host}:{int(port) + 1}")
    errors = []
    for candidate in candidates:
        try:
            return fetch_nodes(candidate.rstrip("/"), timeout, nodes)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            errors.append(f"{candidate}: {reason}")
    raise UserError(
        "cannot read the control plane status ("
        + "; ".join(errors)
        + "); pass the admin address printed by `meshward xds serve` (default 127.0.0.1:15011)"
    )


def _admin_target(text: str) -> str:
    """HOST:PORT or an http(s):// URL with a numeric port (`127.0.0.1:abc` used to end in an
    http.client traceback)."""
    rest = text.split("://", 1)[1] if text.startswith(("http://", "https://")) else text
    hostport = rest.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (or http://HOST:PORT), got {text!r}, e.g. 127.0.0.1:15011"
        )
    return text


def _hostport(address: str) -> str:
    return address.split("://", 1)[-1].rstrip("/").lower()


def _running_demo() -> Any:
    """The running `meshward demo` (as `meshward denials` finds it), or None."""
    from meshward import meshstate as demo_state

    try:
        state = demo_state.load(demo_state.find_state(None))
    except UserError:
        return None
    if state.kind != "local" or not state.alive() or not state.xds_admin:
        return None
    return state


def default_admin() -> str:
    """The admin address when --xds is not given: the running `meshward demo`'s, else
    DEFAULT_ADMIN."""
    demo = _running_demo()
    return str(demo.xds_admin) if demo is not None else DEFAULT_ADMIN


def add_admin_flags(parser: argparse.ArgumentParser) -> None:
    """--xds and --timeout for the commands that read the control plane's admin address
    (flows, denials, report, suggest, history, rollback)."""
    parser.add_argument("--xds", type=_admin_target, metavar="HOST:PORT",
                        help="the control plane's admin address (`meshward xds serve --admin`; "
                             f"default: the running demo's, else {DEFAULT_ADMIN})")  # fmt: skip
    parser.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                        help="HTTP timeout (default: %(default)s)")  # fmt: skip


def _select_nodes(status: dict[str, Any], wanted: list[str]) -> None:
    """Keep the nodes asked for; a name matching no node is an error that lists the nodes
    there are (it used to print "no nodes have connected" and exit 0)."""
    nodes = status["nodes"]
    names = {n["node"] for n in nodes} | {n["workload"] for n in nodes if n.get("workload")}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        connected = sorted({n["node"] for n in nodes})
        hints = "".join(did_you_mean(w, sorted(names)) for w in unknown[:1])
        raise UserError(
            f"no node {', '.join(unknown)} in this control plane's status{hints}; "
            + (
                f"{len(connected)} node(s): {', '.join(connected)}"
                if connected
                else "no nodes have connected"
            )
        )
    status["nodes"] = [n for n in nodes if n["node"] in wanted or n.get("workload") in wanted]


def _age(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    seconds = int((now - datetime.fromisoformat(iso)).total_seconds())
    return _span(seconds)


def _span(seconds: float) -> str:
    seconds = int(seconds)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds}s"
    if seconds < 3600:
        return f"{sign}{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{sign}{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["in_sync"]:
        return "ok"
    if entry.get("last_nack") and entry["last_nack"]["version"] == entry["sent"]:
        return "NACK"
    return "STALE" if entry["drift"] else "pending"


def _expiry_cell(node: dict[str, Any], now: datetime) -> str:
    """When the node's credential expires: the earliest notAfter among the client certificates
    its ADS streams presented (the agent's SVID; the control plane holds no node certificate)."""
    stamps = [(s.get("ads_credentials") or {}).get("not_after") for s in node.get("streams") or []]
    earliest = min((datetime.fromisoformat(t) for t in stamps if t), default=None)
    if earliest is None:
        return "-"
    left = (earliest - now).total_seconds()
    return f"in {_span(left)}" if left >= 0 else f"EXPIRED {_span(-left)} ago"


def _credentials_cell(stream: dict[str, Any] | None) -> str:
    credentials = (stream or {}).get("ads_credentials")
    if not credentials:
        return "-"
    state = credentials.get("state")
    return {"ok": "ok", "root-retiring": "RETIRING", "untrusted": "UNTRUSTED"}.get(state, "?")


def node_state(node: dict[str, Any]) -> str:
    if not node["connected"]:
        return "DISCONNECTED"
    if node.get("policy_enforced") is False:
        return "NOT ENFORCED"
    if node["drift"]:
        return "DRIFT"
    synced = all(t["in_sync"] for s in node["streams"] for t in s["types"])
    return "SYNCED" if synced else "CONVERGING"


def render(status: dict[str, Any], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    policy = status["policy"]
    lines = [
        f"control plane {status['ads']['address']} ({status['ads']['server_identity']})",
        f"policy {policy['version'][:12]} applied {_age(policy['applied_at'], now)} ago"
        + (f"; next expiry {policy['next_expiry']}" if policy.get("next_expiry") else ""),
    ]
    if policy.get("error"):
        first = policy["error"].splitlines()
        lines.append(f"REJECTED policy change ({_age(policy['error_at'], now)} ago): {first[0]}")
        lines.extend(f"  {line}" for line in first[1:6])
    nodes = status["nodes"]
    if not nodes:
        lines.append("no nodes have connected")
        return "\n".join(lines) + "\n"
    header = ["NODE", "MODE", "CONNECTED", *TYPES, "CERT EXPIRES", "ADS CREDS", "STATE"]
    rows = []
    details: list[str] = []
    for node in nodes:
        stream = node["streams"][-1] if node["streams"] else None
        by_type = {t["type"]: t for t in stream["types"]} if stream else {}
        rows.append(
            [
                node["node"],
                stream["mode"] if stream else "-",
                _age(node["connected_since"], now) if node["connected"] else "no",
                *(_cell(by_type.get(t)) for t in TYPES),
                _expiry_cell(node, now),
                _credentials_cell(stream),
                node_state(node),
            ]
        )
        if node.get("ads_credentials_warning"):
            details.append(f"  {node['node']}: {node['ads_credentials_warning']}")
        for entry in by_type.values():
            if entry["in_sync"]:
                continue
            text = (
                f"  {node['node']} {entry['type']}: desired {entry['desired']}, "
                f"ACKed {entry['acked'] or 'nothing'} ({_span(entry['out_of_sync_seconds'])} behind)"
            )
            nack = entry.get("last_nack")
            if nack:
                rejected = ", ".join(nack["resources"]) or "whole response"
                text += (
                    f"; last NACK {nack['at']} of {nack['version']} ({rejected}): {nack['error']}"
                )
            details.append(text)
        if node.get("compile_error"):
            details.append(f"  {node['node']}: compile error: {node['compile_error']}")
        details.extend(_not_enforced_lines(node, policy["version"]))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.extend(details)
    return "\n".join(lines) + "\n"


def _not_enforced_lines(node: dict[str, Any], version: str) -> list[str]:
    """Why a node does not enforce the policy set: what it rejected, Envoy's (redacted) error,
    and the policy documents behind that config."""
    info = node.get("not_enforced")
    if not node["connected"] or not info:
        return []
    lines = [
        f"  {node['node']}: policy {version[:12]} NOT ENFORCED: the sidecar rejected "
        f"{', '.join(info['resources'])} ({', '.join(info['types'])}) and keeps its old rules: "
        f"{info['error']}"
    ]
    if info.get("policies"):
        lines.append(f"    policy documents involved: {'; '.join(info['policies'])}")
    return lines


def run(args: argparse.Namespace) -> int:
    demo = _running_demo()
    if args.xds is None:
        address = demo.xds_admin if demo is not None else DEFAULT_ADMIN
        try:
            status = fetch_status(address, timeout=args.timeout)
        except UserError as exc:
            if demo is None:
                raise UserError(f"{exc}; no running `meshward demo` was found either") from None
            raise
    else:
        status = fetch_status(
            args.xds,
            timeout=args.timeout,
            demo_admin=demo.xds_admin if demo else None,
            demo_ads=demo.ads if demo else None,
        )
    if args.node:
        _select_nodes(status, args.node)
    if args.json:
        print_json(status)
    else:
        print(render(status), end="")
    return 1 if unhealthy(status) else 0


def _untrusted(node: dict[str, Any]) -> bool:
    return any(
        (stream.get("ads_credentials") or {}).get("state") == "untrusted"
        for stream in node.get("streams", [])
    )


def unhealthy(status: dict[str, Any]) -> bool:
    """Worth a non-zero exit: a rejected policy change, a drifting node, or a node whose ADS
    credentials chain to a dropped root (it cannot reconnect once its stream ends)."""
    return bool(status["policy"].get("error")) or any(
        node["drift"]
        or _untrusted(node)
        or (node.get("connected", True) and node.get("policy_enforced") is False)
        for node in status["nodes"]
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show, per sidecar node: connected since, desired vs ACKed version per xDS type, the "
        "last NACK (redacted), certificate expiry; flag nodes in drift."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--xds", type=_admin_target, metavar="HOST:PORT",
                        help="the control plane's admin address (`meshward xds serve --admin`; "
                             "default: the running `meshward demo`'s, else "
                             f"{DEFAULT_ADMIN}); see below for the ADS address")  # fmt: skip
    parser.add_argument("--node", action="append", metavar="NODE",
                        help="only this node id or workload NS/NAME (repeatable; an unknown one "
                             "is an error listing the nodes there are)")  # fmt: skip
    parser.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                        help="HTTP timeout (default: %(default)s)")  # fmt: skip
    add_json_flag(parser)
    parser.set_defaults(func=run)
