"""`meshward xds serve`: run the control plane as a process.

The flow collector it runs on the ADS port (meshward.flows) stands above this package, so the
group is configured from above (meshward/cli/xds.py) with ``flows``: URL -> the factory
:class:`meshward.xds.service.XdsService` takes (meshward.xds.attached)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshward.cliutil import duration, ip_address, listen_address, positive_float, positive_int
from meshward.errors import UserError

if TYPE_CHECKING:
    from meshward.xds.attached import AttachedServiceFactory

# --flows-db's value (a SQLite file or postgresql://...) -> what XdsService(flows=...) takes.
FlowsFor = Callable[[str], "AttachedServiceFactory"]

EPILOG = """\
examples:
  meshward ca init --dir certs/ca --trust-domain cluster.local
  meshward xds serve --policy examples/ --ca certs/ca --listen 127.0.0.1:15010
  meshward xds serve --policy examples/ --ca certs/ca --listen 127.0.0.1:0 \\
      --admin 127.0.0.1:0 --bindings bindings.json --ready-file xds.json
  meshward xds serve --policy examples/ --ca certs/ca --max-instances 20 --svid-rate 0.5 \\
      --node-gc-after 5m          # tighter per-identity limits (see "per-identity limits")
  meshward xds serve --policy examples/ --ca certs/ca \\
      --join-listen 127.0.0.1:15012   # nodes make first contact with a join token there

Workload keys never leave their node: the control plane makes none and serves none. Each
sidecar's key is generated on its node, by `meshward agent` (which serves it to Envoy over SDS
on a Unix socket) or by `meshward bootstrap` for an operator-run Envoy (files read through
file-based SDS), and its SVID is signed from a CSR: first contact with a one-time join token
(`meshward ca join-token`) on --join-listen, renewals over mTLS on the ADS port.
The ADS listener is mTLS only: its certificate is issued by the CA for
spiffe://<td>/ns/<root namespace>/sa/meshward-xds, and every sidecar must present the SVID of
the workload named by its node id.
Policy files are watched: a valid change is pushed to the affected sidecars only; an invalid
one is rejected (shown in `meshward status`) and the running version stays.

bindings file (JSON, optional; what `meshward.compile.runtime_bindings` produces) maps each
workload to where its sidecar listens and where its app is, for meshes on one machine:
  {"shop/orders": {"ports": {"8080": {"listen": "127.0.0.1:15001", "app": "127.0.0.1:9001"}},
                   "outbound": {"shop/payments:8080": "127.0.0.1:15102"}}}
Without it, every sidecar listens on its workload's declared ports (--listen-host) and forwards
to the app on the same port (--app-host).
"""


CONTROL_PLANE_SECRETS_GONE = (
    "--secrets control-plane is no longer supported: the control plane never generates or "
    "transmits workload private keys (a key that crosses the network can be stolen in transit "
    "or from the server). Drop the flag (secrets come from each node), run every sidecar under "
    "`meshward agent`, or, for an Envoy you run yourself, write its key and SVID with "
    "`meshward bootstrap --join HOST:PORT --join-token-file FILE --root-cert FILE` and renew "
    "them with `meshward bootstrap --renew`. Serve joins with --join-listen HOST:PORT."
)


def _duration_seconds(text: str) -> float:
    return duration(text).total_seconds()


def _jwks_refresh(text: str) -> float:
    """A --jwks-refresh duration: at least a second (the fetcher must not hammer an IdP)."""
    seconds = _duration_seconds(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is under 1s; use e.g. 30s or 5m")
    return seconds


def _admin_address(text: str) -> str:
    """``off`` or HOST:PORT (a bad one used to end in an event-loop traceback at start)."""
    return text if text == "off" else listen_address(text)


def load_bindings(path: Path) -> dict[str, Any]:
    """The JSON bindings file (see ``meshward xds serve --help``) -> WorkloadBinding by ref."""
    from meshward.compile import Endpoint, PortBinding, WorkloadBinding

    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read bindings file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"bindings file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"bindings file {path}: expected an object keyed by NAMESPACE/NAME")
    result: dict[str, Any] = {}
    try:
        for ref, entry in data.items():
            ports = {
                int(port): PortBinding(
                    listen=Endpoint.parse(p["listen"]),
                    app=Endpoint.parse(p["app"]),
                    advertise=Endpoint.parse(p["advertise"]) if p.get("advertise") else None,
                )
                for port, p in (entry.get("ports") or {}).items()
            }
            outbound = {
                key: Endpoint.parse(value) for key, value in (entry.get("outbound") or {}).items()
            }
            result[ref] = WorkloadBinding(ports=ports, outbound=outbound)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UserError(
            f"bindings file {path}: malformed entry ({exc}); see `meshward xds serve --help`"
        ) from None
    return result


def dump_bindings(bindings: dict[str, Any]) -> dict[str, Any]:
    """WorkloadBinding by ref -> the JSON form :func:`load_bindings` reads."""
    return {
        ref: {
            "ports": {
                str(port): {
                    "listen": str(b.listen),
                    "app": str(b.app),
                    **({"advertise": str(b.advertise)} if b.advertise else {}),
                }
                for port, b in sorted(binding.ports.items())
            },
            "outbound": {key: str(ep) for key, ep in sorted(binding.outbound.items())},
        }
        for ref, binding in sorted(bindings.items())
    }


def _flows_db(args: argparse.Namespace) -> str | None:
    """--flows-db: None for 'off'; default ``flows.db`` beside the CA directory (the control
    plane's state); a plain path's directory must exist."""
    value = args.flows_db
    if value == "off":
        return None
    if value is None:
        value = str(Path(args.ca).resolve().parent / "flows.db")
    if "://" not in value and not Path(value).resolve().parent.is_dir():
        raise UserError(f"--flows-db {value}: its directory does not exist")
    return str(value)


def _history_keep(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"expected 1..1000, got {value!r}")
    return int(value)


def _history_dir(args: argparse.Namespace, flows_db: str | None) -> Path | None:
    """--history-dir: None for 'off'; default ``history/`` in --state-dir, else beside a local
    flows.db, else beside the CA directory. A default that cannot be written (a read-only CA
    mount) turns the history off with a warning; an explicit one that cannot is an error."""
    value = args.history_dir
    if value == "off":
        return None
    if value is not None:
        path = Path(value)
    elif args.state_dir:
        path = Path(args.state_dir) / "history"
    elif flows_db is not None and "://" not in flows_db:
        path = Path(flows_db).resolve().parent / "history"
    else:
        path = Path(args.ca).resolve().parent / "history"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        if value is not None:
            raise UserError(f"--history-dir {value}: {exc}") from None
        import logging

        logging.getLogger("meshward.xds").warning(
            "no policy history (`policy history`/`rollback` unavailable): %s; pass "
            "--history-dir DIR (writable) or --history-dir off",
            exc,
        )
        return None
    return path


def serve(args: argparse.Namespace, *, flows: FlowsFor) -> int:
    import asyncio
    from datetime import timedelta

    from meshward.certs import CertificateAuthority
    from meshward.compile import AccessLogFormat, CompileOptions, Endpoint
    from meshward.lifecycle import stop_event
    from meshward.policy import PolicyError
    from meshward.telemetry import TEXT_FORMAT, lean_records, setup_json_logging
    from meshward.xds.compile_adapter import compiler_for
    from meshward.xds.jwks import JwksCache
    from meshward.xds.service import XdsService

    if args.log_format == "json":
        setup_json_logging()
    else:
        import logging

        logging.basicConfig(level=logging.INFO, format=TEXT_FORMAT)
    lean_records()  # a line per node connecting, on the event loop: only what is printed
    from meshward.certs.ca import check_svid_ttl

    try:
        check_svid_ttl(timedelta(seconds=args.svid_ttl))
    except UserError as exc:
        raise UserError(f"--svid-ttl: {exc}".replace("; nothing was issued", "")) from None
    if args.secrets == "control-plane":
        raise UserError(CONTROL_PLANE_SECRETS_GONE)
    if args.ready_file and not Path(args.ready_file).resolve().parent.is_dir():
        raise UserError(f"--ready-file {args.ready_file}: its directory does not exist")
    ca = CertificateAuthority.load(Path(args.ca))
    from meshward.xds.bootstrap import XDS_CLUSTER

    flows_db = _flows_db(args)
    options = CompileOptions(
        bindings=load_bindings(Path(args.bindings)) if args.bindings else {},
        extauthz=Endpoint.parse(args.extauthz) if args.extauthz else None,
        otlp=Endpoint.parse(args.otlp) if args.otlp else None,
        access_log_path=None if args.access_log == "off" else args.access_log,
        access_log_format=AccessLogFormat(args.access_log_format),
        flow_log_cluster=None if flows_db is None else XDS_CLUSTER,
        listen_host=args.listen_host,
        app_host=args.app_host,
    )

    from meshward.xds.limits import NodeLimits

    try:
        limits = NodeLimits(
            max_instances=args.max_instances,
            max_streams=args.max_streams,
            svid_rate=args.svid_rate,
            svid_burst=args.svid_burst,
            node_gc_after=args.node_gc_after,
        )
    except ValueError as exc:
        raise UserError(f"invalid limit: {exc}") from None

    async def main() -> None:
        try:
            service = XdsService(
                None,
                ca,
                compiler_for(
                    options,
                    jwks=JwksCache(refresh_interval=args.jwks_refresh),
                    process=args.compile_in == "process",
                ),
                listen=args.listen,
                admin=None if args.admin == "off" else args.admin,
                svid_ttl=timedelta(seconds=args.svid_ttl),
                drift_threshold=args.drift_threshold,
                policy_paths=args.policy,
                watch_interval=args.watch_interval,
                limits=limits,
                join_listen=args.join_listen,
                state_dir=Path(args.state_dir) if args.state_dir else None,
                flows=None if flows_db is None else flows(flows_db),
                history_dir=_history_dir(args, flows_db),
                history_keep=args.history,
                compile_on_start=True,
            )
        except PolicyError as exc:
            raise UserError(f"the policy set is invalid; not starting.\n{exc}") from None
        except Exception as exc:  # the flow store (SQLAlchemy): unreachable, bad URL, no rights
            if type(exc).__module__.startswith("sqlalchemy"):
                first = str(exc).splitlines()[0][:300]
                raise UserError(f"--flows-db: cannot open the flow store: {first}") from None
            raise
        if service.control.policy.mesh.trust_domain != ca.trust_domain:
            raise UserError(
                f"policy trust domain {service.control.policy.mesh.trust_domain!r} differs from "
                f"the CA's {ca.trust_domain!r}; fix MeshConfig.spec.trustDomain or use another CA"
            )

        def refuse_on_compile_errors() -> None:
            errors = service.control.compile_errors()
            if errors:
                first = next(iter(errors.values())).removeprefix("UserError: ")
                raise UserError(
                    f"refusing to start: {len(errors)} workload(s) cannot be compiled "
                    f"({', '.join(list(errors)[:5])}{', ...' if len(errors) > 5 else ''}): "
                    f"{first}"
                )

        # The first compile runs with the ADS port open: the sidecars' TLS handshakes and first
        # requests overlap it; their streams wait, nothing is served before it is done.
        await service.start(check=refuse_on_compile_errors)
        ready = {
            "ads": service.address,
            "admin": service.admin_url,
            "join": service.join_address,
            "server_identity": service.server_identity,
            "policy_version": service.control.policy.version,
            "pid": os.getpid(),
        }
        print(
            f"meshward xds: ADS on {service.address} (mTLS, {service.server_identity}); "
            f"admin {service.admin_url or 'off'}; policy {service.control.policy.version[:12]}",
            flush=True,
        )
        if args.ready_file:
            path = Path(args.ready_file)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(ready) + "\n")
            tmp.replace(path)
        stop = stop_event()  # set by SIGTERM or SIGINT
        try:
            await stop.wait()
        finally:
            await service.stop()

    from meshward.xds.server import AddressInUse

    try:
        asyncio.run(main())
    except AddressInUse as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(
            f"cannot listen on {args.listen} or {args.admin}: {exc.strerror or exc}"
        ) from None
    print("meshward xds: stopped", file=sys.stderr)
    return 0


def configure(parser: argparse.ArgumentParser, *, flows: FlowsFor) -> None:
    """``flows``: how `serve` builds the flow collector for --flows-db (see the module doc)."""
    commands = parser.add_subparsers(dest="xds_command", metavar="COMMAND", title="commands")
    p = commands.add_parser(
        "serve",
        help="serve ADS (SotW + delta) to Envoy sidecars and sign their CSRs",
        description=(
            "Serve the compiled policy to Envoy sidecars over ADS (state of the world and delta); "
            "sign the SVIDs nodes request by CSR (keys stay on the nodes); watch the policy files "
            "and push valid changes live."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policy", action="append", required=True, metavar="PATH",
                   help="policy file or directory (repeatable); watched for changes")  # fmt: skip
    p.add_argument("--ca", required=True, metavar="DIR", help="CA directory (`meshward ca init`)")
    p.add_argument("--listen", type=listen_address, default="127.0.0.1:15010", metavar="HOST:PORT",
                   help="ADS (mTLS) address; port 0 picks a free one (default: %(default)s)")  # fmt: skip
    p.add_argument("--admin", type=_admin_address, default="127.0.0.1:15011", metavar="HOST:PORT",
                   help="HTTP admin address for /status and /metrics, or 'off' "
                        "(default: %(default)s; keep it on loopback)")  # fmt: skip
    p.add_argument("--svid-ttl", type=_duration_seconds, default=3600.0, metavar="DURATION",
                   help="lifetime of the SVIDs signed for nodes' CSRs (agents renew at ~50%%; "
                        "an operator-run Envoy needs `meshward bootstrap --renew` within it) "
                        "(default: 1h)")  # fmt: skip
    p.add_argument("--drift-threshold", type=_duration_seconds, default=10.0, metavar="DURATION",
                   help="how long a node may stay behind its desired version before it is "
                        "reported as drifting (default: 10s)")  # fmt: skip
    p.add_argument(
        "--bindings", metavar="FILE", help="runtime ports per workload (JSON; see below)"
    )
    p.add_argument("--extauthz", metavar="HOST:PORT", help="the ext_authz service for L7/JWT rules")
    p.add_argument("--otlp", metavar="HOST:PORT", help="OTLP gRPC collector for Envoy's spans")
    p.add_argument("--access-log", default="/dev/stdout", metavar="PATH",
                   help="sidecar access log path, or 'off' (default: %(default)s)")  # fmt: skip
    p.add_argument("--access-log-format", choices=["json", "text"], default="json")
    p.add_argument("--listen-host", type=ip_address, default="0.0.0.0",
                   help="where sidecars bind inbound listeners without bindings (default: %(default)s)")  # fmt: skip
    p.add_argument("--app-host", type=ip_address, default="127.0.0.1",
                   help="where sidecars find their app without bindings (default: %(default)s)")  # fmt: skip
    p.add_argument("--watch-interval", type=positive_float, default=0.5, metavar="SECONDS",
                   help="a policy change is applied once the files held still this long; also the "
                   "poll interval where file events are unavailable (default: %(default)s)")  # fmt: skip
    p.add_argument("--jwks-refresh", type=_jwks_refresh, default=300.0, metavar="DURATION",
                   help="refetch every RequestAuthentication jwksUri this often and push rotated "
                   "keys to the sidecars (default 5m; a failed fetch keeps the last good keys "
                   "and is retried after 10s)")  # fmt: skip
    p.add_argument("--compile-in", choices=("process", "thread"), default="process",
                   help="where policy changes are compiled: a worker process of its own, so "
                   "streams are never stalled by a mesh-wide recompile (default), or a thread of "
                   "the server (shares the interpreter with the streams)")  # fmt: skip
    limits = p.add_argument_group(
        "per-identity limits",
        "Bound what one workload certificate can make the control plane hold or sign; a node "
        "over a limit is refused with RESOURCE_EXHAUSTED (Envoy retries), counted in "
        "meshward_xds_rejected_streams{reason} and logged once a minute per identity.",
    )
    limits.add_argument("--max-instances", type=positive_int, default=100, metavar="N",
                        help="node ids (NS/NAME/INSTANCE) one identity may have at once; a new "
                             "one replaces the longest-disconnected (default: %(default)s)")  # fmt: skip
    limits.add_argument("--max-streams", type=positive_int, default=200, metavar="N",
                        help="concurrent ADS streams per identity (default: %(default)s)")  # fmt: skip
    limits.add_argument("--svid-rate", type=positive_float, default=1.0, metavar="PER_SECOND",
                        help="CSRs signed per second per identity (joins and renewals) "
                             "(default: %(default)s)")  # fmt: skip
    limits.add_argument("--svid-burst", type=positive_int, default=20, metavar="N",
                        help="SVIDs one identity may get at once before --svid-rate applies "
                             "(default: %(default)s)")  # fmt: skip
    limits.add_argument("--node-gc-after", type=_duration_seconds, default=600.0,
                        metavar="DURATION",
                        help="forget a node (its status) this long after its last stream "
                             "closed (default: 10m)")  # fmt: skip
    agents = p.add_argument_group(
        "nodes (`meshward agent`, `meshward bootstrap`)",
        "Nodes keep workload keys on their node and get SVIDs by CSR: renewals over mTLS on "
        "the ADS port, first contact with a join token (`meshward ca join-token`) on "
        "--join-listen.",
    )
    agents.add_argument("--secrets", choices=["agent", "control-plane"], default="agent",
                        help="kept for old scripts: secrets always come from the node (its "
                             "agent, or the files of `meshward bootstrap`); 'control-plane' is "
                             "refused (this server never makes or sends a workload key)")  # fmt: skip
    agents.add_argument("--join-listen", type=listen_address, metavar="HOST:PORT",
                        help="accept join tokens here (TLS, server-authenticated only)")  # fmt: skip
    agents.add_argument("--state-dir", metavar="DIR",
                        help="where spent join tokens are recorded (default: the CA directory)")  # fmt: skip
    p.add_argument("--flows-db", metavar="PATH|URL",
                   help="the flow store behind `meshward flows|denials --xds`: a SQLite file, "
                        "postgresql://USER@HOST/DB (replicas sharing one store), or 'off' "
                        "(default: flows.db next to the --ca directory)")  # fmt: skip
    p.add_argument("--history", type=_history_keep, default=20, metavar="N",
                   help="keep the last N applied policy sets for `meshward policy history` and "
                        "`rollback` (1..1000, default %(default)s)")  # fmt: skip
    p.add_argument("--history-dir", metavar="DIR",
                   help="where the policy history and the audit log of policy changes live, or "
                        "'off' (default: history/ in --state-dir, else next to a local "
                        "--flows-db, else next to the --ca directory)")  # fmt: skip
    p.add_argument("--ready-file", metavar="FILE",
                   help="write {ads, admin, server_identity, policy_version, pid} as JSON once "
                        "listening (for supervisors and scripts)")  # fmt: skip
    p.add_argument("--log-format", choices=["json", "text"], default="text")
    p.set_defaults(func=lambda args: serve(args, flows=flows))
