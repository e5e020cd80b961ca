"""`meshward agent`: run the node agent beside one Envoy (see :mod:`meshward.agent`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshward.cliutil import host_port, listen_address, number, positive_float
from meshward.errors import UserError

EPILOG = """\
examples:
  # on the control plane's machine: a one-time token for this workload, valid 10 minutes
  meshward ca join-token --dir certs/ca --workload shop/orders --ttl 10m > orders.token
  # on the node: key generated here (0600), first SVID by CSR with the token, Envoy started
  meshward agent --workload shop/orders --xds 127.0.0.1:15010 --join 127.0.0.1:15012 \\
      --join-token-file orders.token --root-cert certs/ca/gen-0001/root.pem --dir /var/lib/mw/orders
  # after a restart the SVID in --dir renews itself: no token needed
  meshward agent --workload shop/orders --xds 127.0.0.1:15010 --dir /var/lib/mw/orders

The control plane must serve joins: `meshward xds serve --join-listen HOST:PORT`.
State directory (0700): svid.pem (key + chain, 0600), bundle.pem, sds.sock (0600, Envoy's
SDS), admin.sock (Envoy admin), envoy/ (bootstrap, log, pid) and status.json (health: state,
SVID serial and expiry, renewals, Envoy pid/restarts); with --health-listen the same over HTTP
(GET /healthz: 200 or 503 with the reasons; GET /status). Exit codes: 0 stopped by a signal,
1 could not start (no valid SVID and no usable token, refused join, bad flags).
"""


def add_first_contact(parser: argparse.ArgumentParser, title: str) -> None:
    """The join-token flags, shared by `meshward agent` and `meshward bootstrap`: both make
    first contact the same way."""
    first = parser.add_argument_group(title)
    first.add_argument("--join", type=host_port, metavar="HOST:PORT",
                       help="the control plane's join address (`xds serve --join-listen`)")  # fmt: skip
    first.add_argument("--join-token-file", metavar="FILE",
                       help="file holding a token from `meshward ca join-token` (single use)")  # fmt: skip
    first.add_argument("--root-cert", metavar="FILE",
                       help="the mesh root(s), PEM: authenticates the control plane at join")  # fmt: skip


def add_ads_variant(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--delta (the default) / --sotw, shared by `meshward agent` and `meshward bootstrap`.
    Delta, as Istio's sidecars since 1.22: a change travels as the resources it changed (a
    mesh-wide RBAC edit: one route per sidecar, not every listener or route it holds)."""
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--delta", dest="delta", action="store_true", default=True,
                         help="incremental (delta) ADS: only changed resources travel "
                              "(the default)")  # fmt: skip
    variant.add_argument("--sotw", dest="delta", action="store_false",
                         help="state-of-the-world ADS: every response carries all resources "
                              "of its type (for control planes without delta)")  # fmt: skip


def _fraction(text: str) -> float:
    return number(text, float, lambda v: 0 < v < 1, "must be above 0 and below 1")


def _jitter(text: str) -> float:
    return number(text, float, lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")


def _runtime_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from meshward.agent.run import Agent, AgentConfig
    from meshward.certs.jointoken import read_token_file
    from meshward.certs.spiffe import spiffe_id
    from meshward.lifecycle import stop_event
    from meshward.xds.bootstrap import ENVOY_ARGS
    from meshward.xds.nodeid import SERVER_SERVICE_ACCOUNT, InvalidNodeId, NodeId

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        node = NodeId.parse(args.workload)
    except InvalidNodeId as exc:
        raise UserError(f"--workload: {exc}") from None
    if node.instance:
        raise UserError("--workload is NAMESPACE/NAME; give the instance with --instance")
    token = read_token_file(Path(args.join_token_file)) if args.join_token_file else None
    roots = None
    if args.root_cert:
        try:
            roots = Path(args.root_cert).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read --root-cert {args.root_cert}: {exc.strerror}") from None
    identity = str(
        spiffe_id(args.trust_domain, node.namespace, args.service_account or node.workload)
    )
    server = args.server_identity or str(
        spiffe_id(args.trust_domain, args.root_namespace, SERVER_SERVICE_ACCOUNT)
    )
    config = AgentConfig(
        workload=str(node),
        xds=args.xds,
        state_dir=Path(args.dir),
        spiffe_id=identity,
        server_identity=server,
        instance=args.instance or "",
        join=args.join,
        join_token=token,
        root_cert_pem=roots,
        renew_fraction=args.renew_fraction,
        jitter=args.jitter,
        bundle_poll=args.bundle_poll,
        envoy=not args.no_envoy,
        delta=args.delta,
        envoy_log_level=args.envoy_log_level,
        envoy_args=tuple(args.envoy_arg) if args.envoy_arg else ENVOY_ARGS,
        drain_seconds=args.drain_seconds,
        envoy_runtime=tuple(args.envoy_runtime or ()),
        health_listen=args.health_listen,
    )

    async def main() -> None:
        stop = stop_event()  # set by SIGTERM or SIGINT
        await Agent(config).run(stop)

    asyncio.run(main())
    print("meshward agent: stopped", file=sys.stderr)
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Run the node agent beside one Envoy: generate the workload key here, obtain and renew "
        "its SVID by CSR (first contact with a join token), serve SVID and trust bundle to Envoy "
        "over SDS on a Unix socket, and start, restart and drain Envoy."
    )
    parser.epilog = EPILOG
    parser.add_argument("--workload", required=True, metavar="NS/NAME",
                        help="the workload this sidecar serves")  # fmt: skip
    parser.add_argument("--instance", metavar="ID",
                        help="instance id (node id NS/NAME/ID), when one workload has several")  # fmt: skip
    parser.add_argument("--xds", required=True, type=host_port, metavar="HOST:PORT",
                        help="the control plane's ADS address (mTLS; renewals go there too)")  # fmt: skip
    parser.add_argument("--dir", required=True, metavar="DIR",
                        help="state directory (created 0700; keep it across restarts)")  # fmt: skip
    add_first_contact(parser, "first contact (only while --dir holds no valid SVID)")
    ident = parser.add_argument_group("identity")
    ident.add_argument("--trust-domain", default="cluster.local", help="(default: %(default)s)")
    ident.add_argument("--service-account", metavar="SA",
                       help="the workload's service account (default: its name)")  # fmt: skip
    ident.add_argument("--root-namespace", default="meshward-system",
                       help="the control plane's namespace (default: %(default)s)")  # fmt: skip
    ident.add_argument("--server-identity", metavar="SPIFFE_ID",
                       help="the control plane's SPIFFE ID (default: "
                            "spiffe://TD/ns/ROOT_NAMESPACE/sa/meshward-xds)")  # fmt: skip
    parser.add_argument("--health-listen", type=listen_address, metavar="HOST:PORT",
                        help="serve GET /healthz (200 healthy / 503 with reasons) and GET /status "
                             "over HTTP here; keep it on 127.0.0.1 (port 0: any free port, "
                             "written to status.json as 'health')")  # fmt: skip
    timing = parser.add_argument_group("renewal")
    timing.add_argument("--renew-fraction", type=_fraction, default=0.5, metavar="F",
                        help="renew at this fraction of the SVID's lifetime (default: %(default)s)")  # fmt: skip
    timing.add_argument("--jitter", type=_jitter, default=0.1, metavar="F",
                        help="± this fraction of the lifetime, spreads renewals (default: %(default)s)")  # fmt: skip
    timing.add_argument("--bundle-poll", type=positive_float, default=30.0, metavar="SECONDS",
                        help="how often to fetch the trust bundle (CA rotations; default: %(default)s)")  # fmt: skip
    envoy = parser.add_argument_group("Envoy")
    envoy.add_argument("--no-envoy", action="store_true",
                       help="serve SDS only; Envoy is run by someone else")  # fmt: skip
    add_ads_variant(envoy)
    envoy.add_argument("--envoy-log-level", default="warning", help="(default: %(default)s)")
    envoy.add_argument("--envoy-arg", action="append", metavar="ARG",
                       help="extra Envoy argument (repeatable; replaces the default drain flags)")  # fmt: skip
    envoy.add_argument("--envoy-runtime", action="append", type=_runtime_pair, metavar="KEY=VALUE",
                       help="an Envoy runtime value (repeatable), e.g. "
                            "tracing.opentelemetry.min_flush_spans=1")  # fmt: skip
    envoy.add_argument("--drain-seconds", type=positive_float, default=2.0, metavar="SECONDS",
                       help="on SIGTERM, drain listeners this long before stopping Envoy "
                            "(default: %(default)s)")  # fmt: skip
    parser.set_defaults(func=run)
