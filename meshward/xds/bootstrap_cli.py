"""`meshward bootstrap`: write a sidecar's Envoy bootstrap and its first-connection credentials."""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshward.cliutil import parse_workload_ref
from meshward.envoy.admin import ADMIN_SOCKET_FILE
from meshward.errors import UserError
from meshward.xds.bootstrap import (
    BOOTSTRAP_FILE,
    CA_FILE,
    CERT_FILE,
    ENVOY_ARGS,
    KEY_FILE,
    AdsCredentials,
    render_bootstrap,
)
from meshward.xds.nodeid import SERVER_SERVICE_ACCOUNT, NodeId, expected_spiffe_id

DEFAULT_CREDENTIAL_TTL = timedelta(hours=24)
ENVOY_FLAGS = " ".join(ENVOY_ARGS)

EPILOG = f"""\
examples:
  meshward bootstrap --workload shop/orders --xds 127.0.0.1:15010 --ca certs/ca
  meshward bootstrap --workload shop/orders --instance 2 --xds xds.mesh:15010 --ca certs/ca \\
      --out sidecar-config/ --path-prefix /etc/meshward --delta

writes <out>/<name>.<namespace>[.<instance>]/:
  {BOOTSTRAP_FILE}   Envoy bootstrap: node id NS/NAME[/INSTANCE], ADS only, admin on the Unix
               socket {ADMIN_SOCKET_FILE} beside it (mode 0600; --admin-socket), never TCP:
               curl --unix-socket <dir>/{ADMIN_SOCKET_FILE} http://envoy/ready
  {CERT_FILE}  first-connection credentials (with --ca): an SVID for the workload's own
  {KEY_FILE}   identity (default TTL 24h; key 0600) and the trust bundle ({CA_FILE}).
They authenticate the ADS connection only: the control plane accepts them only for this
workload's node ids, and sends the data-plane SVID (SDS "default", renewed at half-life) over
it. Envoy watches the directory: re-run this command before the credentials expire to refresh
them in a running Envoy -- and after every `meshward ca rotate`, within its grace period: the
files trust only the roots that existed when they were written, and once the old root is
dropped the control plane presents a certificate from the new one (`meshward status` flags
sidecars still on an old root: ADS CREDS RETIRING).
Run Envoy with: envoy -c {BOOTSTRAP_FILE} {ENVOY_FLAGS}
"""


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic replace (a move into the watched directory is what makes Envoy reload)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def write_sidecar_config(
    out_dir: Path,
    node: NodeId,
    xds_host: str,
    xds_port: int,
    *,
    ca: Any = None,  # meshward.certs.CertificateAuthority; None: credentials are not written
    trust_domain: str = "cluster.local",
    root_namespace: str = "meshward-system",
    service_account: str | None = None,
    delta: bool = False,
    admin_socket: str | None = None,
    ttl: timedelta = DEFAULT_CREDENTIAL_TTL,
    path_prefix: str | None = None,
    server_identity: str | None = None,
) -> Path:
    """Write ``<out_dir>/<name>.<ns>[.<instance>]/`` (bootstrap + credentials); return the
    bootstrap's path. ``path_prefix``: the directory as Envoy will see it (e.g. in a container).
    ``admin_socket``: Envoy's admin socket path (default: ``admin.sock`` in that directory)."""
    directory = out_dir / ".".join(p for p in (node.workload, node.namespace, node.instance) if p)
    directory.mkdir(parents=True, exist_ok=True)
    if ca is not None:
        trust_domain = ca.trust_domain
        identity = expected_spiffe_id(
            trust_domain, node.namespace, service_account or node.workload
        )
        svid = ca.issue(identity, ttl=ttl)
        _write(directory / CERT_FILE, svid.cert_chain_pem, 0o644)
        _write(directory / KEY_FILE, svid.private_key_pem, 0o600)
        _write(directory / CA_FILE, ca.trust_bundle().roots_pem, 0o644)
    seen_as = (
        f"{path_prefix.rstrip('/')}/{directory.name}" if path_prefix else str(directory.resolve())
    )
    config = render_bootstrap(
        node,
        xds_host,
        xds_port,
        server_identity=server_identity
        or expected_spiffe_id(trust_domain, root_namespace, SERVER_SERVICE_ACCOUNT),
        credentials=AdsCredentials.in_directory(seen_as),
        delta=delta,
        admin_socket=admin_socket or f"{seen_as}/{ADMIN_SOCKET_FILE}",
    )
    path = directory / BOOTSTRAP_FILE
    _write(path, (json.dumps(config, indent=2) + "\n").encode(), 0o644)
    return path


def run(args: argparse.Namespace) -> int:
    from meshward.xds.service import split_address

    namespace, name = args.workload
    try:
        node = NodeId.parse(f"{namespace}/{name}" + (f"/{args.instance}" if args.instance else ""))
        host, port = split_address(args.xds)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not 1 <= port <= 65535:
        raise UserError(f"--xds {args.xds}: port {port} is out of range (1-65535)")
    if args.path_prefix is not None and not args.path_prefix.startswith("/"):
        raise UserError(
            f"--path-prefix {args.path_prefix!r} must be an absolute path (where Envoy finds "
            "the files, e.g. /etc/meshward)"
        )
    trust_domain, root_namespace, account = (
        args.trust_domain,
        args.root_namespace,
        args.service_account,
    )
    if args.policy:
        from meshward.policy import load

        policy = load(args.policy)
        trust_domain, root_namespace = policy.mesh.trust_domain, policy.mesh.root_namespace
        workload = policy.workload(node.workload_ref)
        if workload is None:
            raise UserError(
                f"no workload {node.workload_ref} in {', '.join(args.policy)}; declare it "
                "(kind: Workload) or check the NAMESPACE/NAME"
            )
        account = account or workload.service_account or workload.name
    ca = None
    if args.ca:
        from meshward.certs import CertificateAuthority

        ca = CertificateAuthority.load(Path(args.ca))
    from meshward.certs.duration import parse_duration

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if ca is not None:
        from meshward.certs.ca import check_svid_ttl

        check_svid_ttl(ttl)  # before anything is written
    _check_identities(args, trust_domain, root_namespace, node.namespace, account or node.workload)
    try:
        path = _write_config(args, node, host, port, ca, trust_domain, root_namespace, account, ttl)
    except ValueError as exc:  # e.g. an admin socket path too long for a Unix socket
        raise UserError(f"{exc} (--admin-socket)") from None
    except OSError as exc:
        raise UserError(f"cannot write under --out {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {path}")
    if ca is None:
        print(
            f"no --ca: put {CERT_FILE}, {KEY_FILE} (an SVID for this workload) and {CA_FILE} "
            f"next to it, or re-run with --ca DIR"
        )
    print(f"run: envoy -c {path} {ENVOY_FLAGS}")
    return 0


def _check_identities(
    args: argparse.Namespace, trust_domain: str, root_namespace: str, namespace: str, account: str
) -> None:
    """The identities the bootstrap names must be valid SPIFFE IDs (InvalidSpiffeId is a
    UserError that says which part is wrong); a bad --service-account used to be written."""
    from meshward.certs.spiffe import parse_spiffe_id, spiffe_id

    spiffe_id(trust_domain, namespace, account)
    spiffe_id(trust_domain, root_namespace, SERVER_SERVICE_ACCOUNT)
    if args.xds_identity:
        parse_spiffe_id(args.xds_identity)


def _write_config(
    args: argparse.Namespace,
    node: NodeId,
    host: str,
    port: int,
    ca: Any,
    trust_domain: str,
    root_namespace: str,
    account: str | None,
    ttl: timedelta,
) -> Path:
    return write_sidecar_config(
        Path(args.out),
        node,
        host,
        port,
        ca=ca,
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        service_account=account,
        delta=args.delta,
        admin_socket=args.admin_socket,
        ttl=ttl,
        path_prefix=args.path_prefix,
        server_identity=args.xds_identity,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Render a sidecar's Envoy bootstrap for Meshward's ADS server: node id and metadata, "
        "admin on a 0600 Unix socket, ADS (SotW or delta) over mTLS, and nothing else; everything else "
        "arrives over ADS. With --ca, also write the first-connection credentials."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--workload", required=True, type=parse_workload_ref, metavar="NS/NAME",
                        help="the workload this sidecar fronts")  # fmt: skip
    parser.add_argument("--xds", required=True, metavar="HOST:PORT",
                        help="the ADS server (`meshward xds serve --listen`)")  # fmt: skip
    parser.add_argument("--ca", metavar="DIR", help="CA directory: issue the ADS credentials")
    parser.add_argument("--out", default="sidecar-config", metavar="DIR",
                        help="output directory (default: %(default)s)")  # fmt: skip
    parser.add_argument("--instance", metavar="ID",
                        help="replica id, appended to the node id (NS/NAME/ID)")  # fmt: skip
    parser.add_argument("--delta", action="store_true",
                        help="use incremental (delta) ADS instead of state of the world")  # fmt: skip
    parser.add_argument("--admin-socket", metavar="PATH",
                        help="Envoy admin's Unix socket, mode 0600, as Envoy sees it (default: "
                             f"{ADMIN_SOCKET_FILE} in the sidecar's directory)")  # fmt: skip
    parser.add_argument("--ttl", default="24h", metavar="DURATION",
                        help="lifetime of the ADS credentials (default: %(default)s)")  # fmt: skip
    parser.add_argument("--policy", action="append", metavar="PATH",
                        help="policy files: take the service account, trust domain and root "
                             "namespace from them")  # fmt: skip
    parser.add_argument("--service-account", metavar="SA",
                        help="the workload's service account (default: its name)")  # fmt: skip
    parser.add_argument("--trust-domain", default="cluster.local",
                        help="without --ca/--policy (default: %(default)s)")  # fmt: skip
    parser.add_argument("--root-namespace", default="meshward-system",
                        help="the control plane's namespace, part of its identity "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--xds-identity", metavar="SPIFFE_ID",
                        help="the ADS server's SPIFFE ID to pin (default: "
                             "spiffe://<td>/ns/<root namespace>/sa/meshward-xds)")  # fmt: skip
    parser.add_argument("--path-prefix", metavar="DIR",
                        help="--out as Envoy sees it (e.g. a container mount point); the bootstrap "
                             "then names its credential files under it")  # fmt: skip
    parser.set_defaults(func=run)
