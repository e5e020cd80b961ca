"""`meshward ca join-token`: mint a one-time, short-lived join token for one workload."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshward.cliutil import add_json_flag, duration, parse_workload_ref, print_json

EPILOG = """\
examples:
  meshward ca join-token --dir certs/ca --workload shop/orders --ttl 10m > orders.token
  meshward ca join-token --dir certs/ca --workload shop/orders --json

The token names the workload, expires after --ttl (at most 24h) and is accepted once: the
control plane records spent tokens in its state directory (join-tokens-used.log), across
restarts. Give it to `meshward agent --join-token-file`; after the first SVID the agent renews
with its certificate and never needs a token again (while its --dir is kept).
The MAC key is join-token.key in the CA directory (0600, created on first use).
"""


def join_token(args: argparse.Namespace) -> int:
    from meshward.certs.ca import STATE_FILE
    from meshward.certs.jointoken import load_or_create_key, mint
    from meshward.errors import UserError

    directory = Path(args.dir)
    if not (directory / STATE_FILE).exists():
        raise UserError(
            f"no Meshward CA in {directory}: create one with `meshward ca init --dir {directory}`"
        )
    namespace, name = args.workload
    workload = f"{namespace}/{name}"
    token = mint(load_or_create_key(directory), workload, ttl=args.ttl)
    if args.json:
        from datetime import UTC, datetime

        result: dict[str, Any] = {
            "token": token,
            "workload": workload,
            "expires_at": (datetime.now(UTC) + args.ttl).isoformat(timespec="seconds"),
        }
        print_json(result)
    else:
        print(token)
    return 0


def configure(sub: Any, add_dir: Any) -> None:
    p = sub.add_parser(
        "join-token",
        help="a one-time, short-lived token for an agent's first SVID",
        description="Mint a join token: single use, bound to one workload, short-lived.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dir(p)
    p.add_argument("--workload", required=True, type=parse_workload_ref, metavar="NS/NAME",
                   help="the workload the token is for")  # fmt: skip
    p.add_argument("--ttl", type=duration, default="10m", metavar="DURATION",
                   help="how long the token is valid (default: 10m; at most 24h)")  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=join_token)
