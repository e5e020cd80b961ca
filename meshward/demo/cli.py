"""`meshward demo`: the README's main command."""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request
from pathlib import Path

from meshward.errors import UserError


def run(args: argparse.Namespace) -> int:
    from meshward.demo.echo import EchoServer
    from meshward.envoy import EnvoyProcess, EnvoyStartError
    from meshward.envoy.bootstrap import static_proxy

    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="meshward-demo-"))
    print(f"state: {state}")
    with EchoServer("orders") as backend:
        print(f"[ready] orders (echo service) on 127.0.0.1:{backend.port}")
        try:
            envoy = EnvoyProcess(
                static_proxy(backend.port), name="orders-sidecar", workdir=state / "orders-sidecar"
            )
            envoy.start()
        except EnvoyStartError as err:
            raise UserError(f"the orders sidecar did not start: {err}") from err
        with envoy:
            port = envoy.listener_port("ingress")
            print(f"[ready] orders sidecar (Envoy) on 127.0.0.1:{port}, admin {envoy.admin_url}")
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/orders/42", timeout=5
            ) as response:
                body = json.loads(response.read())
            ok = response.status == 200 and body["service"] == "orders"
            print(
                f"GET /orders/42 via sidecar -> {response.status} from {body['service']}: {'as expected' if ok else 'UNEXPECTED'}"
            )
    return 0 if ok else 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state", metavar="DIR", help="keep certificates and logs in DIR (default: a new temp dir)"
    )
    parser.set_defaults(func=run)
