"""`meshward bootstrap`: a sidecar directory for an Envoy the operator runs (no agent).

The key is generated here, on the node; the SVID comes by CSR (join token first, then renewals
over mTLS, :mod:`meshward.agent.filecreds`); Envoy reads key, chain and bundle from files through
file-based SDS (:mod:`meshward.xds.filesds`), for its ADS connection and its data plane alike.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshward.agent.cli import add_ads_variant, add_first_contact
from meshward.agent.identity import BUNDLE_FILE, SVID_FILE, Credentials, CredentialStore
from meshward.cliutil import host_port, parse_workload_ref, print_json
from meshward.envoy.admin import ADMIN_SOCKET_FILE
from meshward.errors import UserError
from meshward.xds.bootstrap import BOOTSTRAP_FILE, ENVOY_ARGS, render_bootstrap
from meshward.xds.filesds import SDS_FILES, check_secrets_dir, secret_documents
from meshward.xds.nodeid import SERVER_SERVICE_ACCOUNT, NodeId

ENVOY_FLAGS = " ".join(ENVOY_ARGS)

EPILOG = f"""\
examples:
  # on the control plane's machine: a one-time token for this workload, valid 10 minutes
  meshward ca join-token --dir certs/ca --workload shop/orders --ttl 10m > orders.token
  # on the node: the key is generated here, the first SVID obtained with the token
  meshward bootstrap --workload shop/orders --xds 127.0.0.1:15010 --join 127.0.0.1:15012 \\
      --join-token-file orders.token --root-cert certs/ca/gen-0001/root.pem --out sidecar-config/
  envoy -c sidecar-config/orders.shop/{BOOTSTRAP_FILE} {ENVOY_FLAGS}
  # renewal: a new key and SVID, authenticated by the current one (no token); from cron
  */20 * * * *  meshward bootstrap --renew --workload shop/orders --xds 127.0.0.1:15010 \\
      --out sidecar-config/

This is for operators who run Envoy themselves. With `meshward agent` (recommended) the agent
does all of this and renews by itself; here NOTHING RENEWS BY ITSELF: renewal is your job.
The SVID lives as long as the control plane's `xds serve --svid-ttl` (default 1h); run
`meshward bootstrap --renew` well within it (at half its lifetime: every 20-30 min for 1h), and
within the grace period after a `meshward ca rotate` (the renewal also refreshes the trust
bundle). An SVID that expired cannot be renewed: the node needs a new join token.

writes <out>/<name>.<namespace>[.<instance>]/ (0700):
  {BOOTSTRAP_FILE:<18}Envoy bootstrap: node id NS/NAME[/INSTANCE], ADS over mTLS with the SVID
  {"":<18}below, admin on the Unix socket {ADMIN_SOCKET_FILE} (0600; --admin-socket), never TCP
  {SVID_FILE:<18}the workload key (generated here) then its SVID chain, 0600
  {BUNDLE_FILE:<18}the trust bundle (the mesh roots)
  {SDS_FILES["default"]:<18}file-based SDS: Envoy reads {SVID_FILE} and {BUNDLE_FILE} through these
  {SDS_FILES["ROOTCA"]:<18}and watches the directory: a renewal reaches a running Envoy (no restart)
The control plane points this node's listeners and clusters at the same files (the bootstrap's
node metadata names the directory); it never sees the key. Exit codes: 0 written, 1 refused
(no valid SVID and no usable token, join/renewal refused or unreachable, bad input), 2 usage.
"""


def _node(args: argparse.Namespace) -> NodeId:
    namespace, name = args.workload
    try:
        return NodeId.parse(f"{namespace}/{name}" + (f"/{args.instance}" if args.instance else ""))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _identities(args: argparse.Namespace, node: NodeId) -> tuple[str, str]:
    """(the workload's SPIFFE ID, the control plane's) from the flags or the policy files."""
    from meshward.certs.spiffe import parse_spiffe_id, spiffe_id

    trust_domain, root_namespace = args.trust_domain, args.root_namespace
    account = args.service_account
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
    identity = str(spiffe_id(trust_domain, node.namespace, account or node.workload))
    if args.xds_identity:
        return identity, str(parse_spiffe_id(args.xds_identity))
    return identity, str(spiffe_id(trust_domain, root_namespace, SERVER_SERVICE_ACCOUNT))


def _credentials(
    args: argparse.Namespace, store: CredentialStore, who: Any
) -> tuple[Credentials, str]:
    from meshward.agent import filecreds

    if args.renew:
        return filecreds.renew(store, who, args.xds), "renewed"
    held = filecreds.current(store, who)
    if held is not None:
        return held, "kept (still valid; renew with --renew)"
    missing = [f for f in ("join", "join_token_file", "root_cert") if not getattr(args, f)]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise UserError(
            f"{store.directory} holds no valid SVID: first contact needs {flags} (create a "
            "token with `meshward ca join-token --workload NS/NAME`)"
        )
    from meshward.certs.jointoken import read_token_file

    token = read_token_file(Path(args.join_token_file))
    try:
        roots = Path(args.root_cert).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read --root-cert {args.root_cert}: {exc.strerror}") from None
    return filecreds.join(store, who, args.join, token, roots), "joined"


def run(args: argparse.Namespace) -> int:
    from meshward.agent.filecreds import NodeIdentity
    from meshward.certs import files
    from meshward.xds.service import split_address

    node = _node(args)
    host, port = split_address(args.xds)
    if args.path_prefix is not None and not args.path_prefix.startswith("/"):
        raise UserError(
            f"--path-prefix {args.path_prefix!r} must be an absolute path (where Envoy finds "
            "the files, e.g. /etc/meshward)"
        )
    identity, server = _identities(args, node)
    directory = Path(args.out) / ".".join(
        p for p in (node.workload, node.namespace, node.instance) if p
    )
    seen_as = (
        f"{args.path_prefix.rstrip('/')}/{directory.name}"
        if args.path_prefix
        else str(directory.resolve())
    )
    try:
        seen_as = check_secrets_dir(seen_as)
    except ValueError as exc:
        raise UserError(f"--out/--path-prefix: {exc}") from None
    store = CredentialStore(directory)
    who = NodeIdentity(node.workload_ref, node.instance or "", identity, server)
    credentials, how = _credentials(args, store, who)
    bootstrap = directory / BOOTSTRAP_FILE
    if not args.renew:
        try:
            config = render_bootstrap(
                node, host, port, server_identity=server, secrets_dir=seen_as, delta=args.delta,
                admin_socket=args.admin_socket or f"{seen_as}/{ADMIN_SOCKET_FILE}",
            )  # fmt: skip
        except ValueError as exc:  # e.g. an admin socket path too long for a Unix socket
            raise UserError(f"{exc} (--admin-socket)") from None
        for name, text in secret_documents(seen_as, SVID_FILE, BUNDLE_FILE).items():
            files.write_public(directory / name, text.encode())
        files.write_public(bootstrap, (json.dumps(config, indent=2) + "\n").encode())
    lifetime = credentials.not_after - credentials.not_before
    renew_by = credentials.not_before + lifetime / 2
    result = {
        "directory": str(directory),
        "bootstrap": str(bootstrap),
        "svid": how.split(" ")[0],
        "spiffe_id": credentials.spiffe_id,
        "serial": f"{credentials.serial:x}",
        "not_after": credentials.not_after.isoformat(),
        "renew_by": renew_by.isoformat(),
    }
    if args.json:
        print_json(result)
        return 0
    left = credentials.not_after - datetime.now(UTC)
    print(f"{'renewed SVID in' if args.renew else 'wrote'} {directory}")
    print(f"  SVID {credentials.spiffe_id} serial {result['serial']}: {how}")
    print(
        f"  expires {credentials.not_after:%Y-%m-%d %H:%M:%SZ} (in {int(left.total_seconds())}s); "
        f"renew by {renew_by:%Y-%m-%d %H:%M:%SZ}: meshward bootstrap --renew --workload "
        f"{node.workload_ref}{' --instance ' + node.instance if node.instance else ''} "
        f"--xds {args.xds} --out {args.out} (nothing renews it by itself)"
    )
    if not args.renew:
        print(f"run: envoy -c {bootstrap} {ENVOY_FLAGS}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Prepare a sidecar for an Envoy you run yourself: generate the workload key on this "
        "node (0600), obtain its SVID by CSR (a join token on first contact; --renew after), "
        "and render an Envoy bootstrap that reads them through file-based SDS (ADS and data "
        "plane). Without `meshward agent`, renewal is your job: cron `--renew` well within the "
        "SVID's lifetime (the control plane's --svid-ttl, default 1h)."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--workload", required=True, type=parse_workload_ref, metavar="NS/NAME",
                        help="the workload this sidecar fronts")  # fmt: skip
    parser.add_argument("--xds", required=True, type=host_port, metavar="HOST:PORT",
                        help="the ADS server (`meshward xds serve --listen`); renewals go there")  # fmt: skip
    parser.add_argument("--out", default="sidecar-config", metavar="DIR",
                        help="output directory (default: %(default)s)")  # fmt: skip
    parser.add_argument("--instance", metavar="ID",
                        help="replica id, appended to the node id (NS/NAME/ID)")  # fmt: skip
    parser.add_argument("--renew", action="store_true",
                        help="renew the SVID in the sidecar directory (a new key; mTLS with the "
                             "current SVID) and rewrite nothing else; Envoy picks it up live")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_first_contact(parser, "first contact (while the directory holds no valid SVID)")
    add_ads_variant(parser)
    parser.add_argument("--admin-socket", metavar="PATH",
                        help="Envoy admin's Unix socket, mode 0600, as Envoy sees it (default: "
                             f"{ADMIN_SOCKET_FILE} in the sidecar's directory)")  # fmt: skip
    ident = parser.add_argument_group("identity")
    ident.add_argument("--policy", action="append", metavar="PATH",
                       help="policy files: take the service account, trust domain and root "
                            "namespace from them")  # fmt: skip
    ident.add_argument("--service-account", metavar="SA",
                       help="the workload's service account (default: its name)")  # fmt: skip
    ident.add_argument("--trust-domain", default="cluster.local",
                       help="without --policy (default: %(default)s)")  # fmt: skip
    ident.add_argument("--root-namespace", default="meshward-system",
                       help="the control plane's namespace, part of its identity "
                            "(default: %(default)s)")  # fmt: skip
    ident.add_argument("--xds-identity", metavar="SPIFFE_ID",
                       help="the ADS server's SPIFFE ID to pin (default: "
                            "spiffe://<td>/ns/<root namespace>/sa/meshward-xds)")  # fmt: skip
    parser.add_argument("--path-prefix", metavar="DIR",
                        help="--out as Envoy sees it (e.g. a container mount point); the bootstrap "
                             "and the SDS files then name their files under it")  # fmt: skip
    parser.set_defaults(func=run)
