"""`meshward policy compile`: show what the compiler makes of a workload's policies.

Plugged into `meshward policy` by meshward.cli.policy (``configure_compile(subparsers)``).
Heavy imports (protos) stay inside the handler so `meshward --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from meshward.cliutil import add_json_flag, parse_workload_ref, print_json

EPILOG = """\
examples:
  meshward policy compile examples/ --workload shop/payments --explain
      where each rule runs (native Envoy RBAC or ext_authz) and why
  meshward policy compile examples/ --workload shop/payments --json
      the Envoy resources (listeners, routes, clusters, endpoints) as the control plane serves them
  meshward policy compile examples/ --workload shop/payments --mode static --json
      the same with inline routes/endpoints, as a static bootstrap would hold them

Rules Envoy can decide from the connection and headers (principals, namespaces, IPs, ports,
methods, paths, hosts, headers, SNI) compile to the native RBAC filter. Rules that read a verified
end-user JWT (requestPrincipals, request.auth.*) and CUSTOM policies are decided by the ext_authz
service; only workloads with such rules get the ext_authz filter.
"""


def configure_compile(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "compile",
        help="compile a workload's policies to Envoy config, or explain where each rule runs",
        description=(
            "Compile the policy set for one workload into the Envoy resources its sidecar gets "
            "(inbound listeners with mTLS and RBAC, outbound listeners and clusters for the peers "
            "it may call), or with --explain say rule by rule whether Envoy decides it natively "
            "or the ext_authz service does, and why."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="policy files or directories")
    parser.add_argument(
        "--workload",
        required=True,
        type=parse_workload_ref,
        metavar="NS/NAME",
        help="the workload to compile (a `kind: Workload` in the policy set)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print where each rule runs (native RBAC or ext_authz) and why, instead of config",
    )
    parser.add_argument(
        "--mode",
        choices=("xds", "static"),
        default="xds",
        help="xds: SDS/EDS/RDS over ADS (what the control plane serves); static: everything "
        "inline for a static bootstrap (default: %(default)s)",
    )
    parser.add_argument(
        "--extauthz",
        default="127.0.0.1:9191",
        metavar="HOST:PORT",
        help="the ext_authz gRPC service, used when a rule needs it (default: %(default)s)",
    )
    parser.add_argument(
        "--otlp", metavar="HOST:PORT", help="OTLP gRPC collector for Envoy spans (default: none)"
    )
    parser.add_argument("--no-outbound", action="store_true", help="compile only the inbound side")
    parser.add_argument(
        "--now",
        metavar="TIME",
        help="drop emergency policies expired at this RFC 3339 time (default: the current time)",
    )
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _parse_now(value: str | None) -> datetime:
    from meshward.errors import UserError

    if value is None:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:
        raise UserError(
            f"--now: expected an RFC 3339 time such as 2030-01-31T18:00:00Z, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        raise UserError("--now: the time needs a zone, e.g. a trailing Z for UTC")
    return parsed.astimezone(UTC)


def run(args: argparse.Namespace) -> int:
    from meshward.compile.explain import explain_json, explain_text
    from meshward.compile.options import CompileOptions, Endpoint, Mode
    from meshward.compile.workload import compile_workload
    from meshward.errors import UserError
    from meshward.policy import load

    namespace, name = args.workload
    ref = f"{namespace}/{name}"
    policy_set = load(args.paths)
    workload = policy_set.workload(ref)
    if workload is None:
        known = ", ".join(w.ref for w in policy_set.workloads) or "none"
        raise UserError(f"no workload {ref} in {' '.join(args.paths)} (declared: {known})")
    now = _parse_now(args.now)
    if args.explain:
        if args.json:
            print_json(explain_json(policy_set, workload, now=now))
        else:
            sys.stdout.write(explain_text(policy_set, workload, now=now))
        return 0
    options = CompileOptions(
        mode=Mode(args.mode),
        extauthz=Endpoint.parse(args.extauthz),
        otlp=Endpoint.parse(args.otlp) if args.otlp else None,
        outbound=not args.no_outbound,
    )
    resources = compile_workload(policy_set, workload, options, now=now)
    if args.json:
        print_json(resources.to_json())
    else:
        sys.stdout.write(summary_text(resources))
    return 0


def summary_text(resources: Any) -> str:
    lines = [
        f"{resources.workload}: policy version {resources.policy_version[:12]}, "
        f"mode {resources.mode.value}",
        f"authorization: {resources.placement.summary()}",
        f"secrets (SDS): {', '.join(resources.secret_names) or 'none'}",
        "listeners:",
    ]
    for listener in resources.listeners:
        address = listener.address.socket_address
        chains = ", ".join(c.name or "default" for c in listener.filter_chains)
        lines.append(f"  {listener.name}  {address.address}:{address.port_value}  [{chains}]")
    lines.append("clusters:")
    lines.extend(f"  {c.name}" for c in resources.clusters)
    lines.append("(--json prints the full resources; --explain says where each rule runs)")
    return "\n".join(lines) + "\n"
