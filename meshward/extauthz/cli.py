"""`meshward extauthz ...`: serve Envoy's ext_authz Check, or send one Check by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meshward.errors import UserError
from meshward.net import LOOPBACK

SERVE_DESCRIPTION = """\
Serve envoy.service.auth.v3.Authorization/Check (gRPC) for the workloads whose policies Envoy's
native RBAC cannot decide: rules on a verified end-user JWT (requestPrincipals,
request.auth.claims[...], audiences, presenter) and CUSTOM policies. Every decision comes from
the same evaluator as `meshward policy explain`; repeated inputs are answered from a decision
cache. The standard gRPC health service (grpc.health.v1.Health) answers on the same port.
"""

SERVE_EPILOG = """\
which workload a Check is for:
  the compiled Envoy config sets per-route context_extensions {"workload": "NS/NAME"}; without
  it the destination's SPIFFE ID (mTLS) is mapped to the workload. Neither: denied, with a reason.

answers:
  allow   200 upstream, with x-meshward-principal (peer SPIFFE ID) and x-meshward-user
          (JWT iss/sub) set for the app; forged copies of these headers are removed.
  deny    403 with JSON {"error","policy","rule","reason","trace_id"} and x-meshward-denied-by.
  401     a token was present but invalid (expired, not yet valid, bad signature, alg none,
          unknown key, wrong issuer/audience, malformed, too large). No token = anonymous.
  Dry-run policies and AUDIT are logged and traced, never enforced.

fail closed (what happens when this service is down or slow):
  Envoy's filter is configured with failure_mode_allow: false and a timeout, so a request
  that cannot be checked (service stopped, crashed, timing out, unreachable) is answered 403
  with an empty body by Envoy itself (access log flag UAEX, stat ext_authz.error). Nothing is
  let through. When the service comes back, Envoy reconnects on its own: no Envoy restart.
  Inside the service, any internal error is also a 403 with a reason, never an allow.

policy changes:
  --policy paths are polled; a complete, valid new set is swapped in atomically and takes
  effect on the next request (cached decisions of the old version become unreachable). An
  invalid change is logged and the last good set keeps serving.

examples:
  meshward extauthz serve --policy examples/ --listen 127.0.0.1:9191
  meshward extauthz serve --policy policies/ --listen 127.0.0.1:9191 --workers 2 \\
      --metrics-listen 127.0.0.1:9192 --otlp-endpoint 127.0.0.1:4317 --decision-log decisions.jsonl
  meshward extauthz check --server 127.0.0.1:9191 --workload foo/httpbin --path /admin \\
      --token "$TOKEN"
"""


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = LOOPBACK, value
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host or LOOPBACK, number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


_UNITS = {
    "": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}


def byte_size(value: str) -> int:
    """``65536``, ``512KiB``, ``64MiB``, ``1GiB`` (k/m/g accepted; powers of 1024)."""
    text = value.strip().lower().replace(" ", "")
    digits = text.rstrip("kmgib")
    unit = text[len(digits) :]
    if not digits.isdigit() or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size like 65536, 512KiB or 64MiB, got {value!r}"
        )
    number = int(digits) * _UNITS[unit]
    if number < 1024:
        raise argparse.ArgumentTypeError(f"{value!r} is below the minimum of 1KiB")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="extauthz_command", metavar="COMMAND", title="commands")

    serve = commands.add_parser(
        "serve",
        help="serve ext_authz Check for Envoy (fail closed)",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--policy",
        action="append",
        required=True,
        type=Path,
        metavar="PATH",
        help="policy file or directory (repeatable); watched for changes",
    )
    serve.add_argument(
        "--listen",
        type=_address,
        default=(LOOPBACK, 9191),
        metavar="HOST:PORT",
        help="gRPC address (default 127.0.0.1:9191; port 0 picks one, printed on stdout)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="processes sharing the port via SO_REUSEPORT, one core each (default 1); "
        "each has its own decision cache",
    )
    serve.add_argument(
        "--server",
        choices=("sync", "aio"),
        default="sync",
        help="gRPC server kind: sync thread pool (default; measured faster for unary Check) or grpc.aio",
    )
    serve.add_argument(
        "--threads",
        type=_positive_int,
        default=4,
        metavar="N",
        help="sync server pool size per process (default 4: more threads only add GIL handoffs)",
    )
    serve.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="export a span per Check over OTLP/gRPC (default $MESHWARD_OTLP_ENDPOINT; unset: off)",
    )
    serve.add_argument(
        "--decision-log",
        type=Path,
        metavar="FILE",
        help="append JSON decision lines here (default: the server log on stderr)",
    )
    serve.add_argument(
        "--decision-log-max-bytes",
        type=byte_size,
        default=64 << 20,
        metavar="SIZE",
        help="the decision log and its 3 rotated files (FILE.1..3) hold at most this much "
        "(default 64MiB); fields longer than 1024 characters are cut with a marker",
    )
    serve.add_argument(
        "--log-allows",
        action="store_true",
        help="also write a decision line for every allow (default: denials, dry-run, AUDIT)",
    )
    serve.add_argument(
        "--metrics-listen",
        type=_address,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off)",
    )
    serve.add_argument(
        "--cache-bytes",
        type=byte_size,
        default=64 << 20,
        metavar="SIZE",
        help="decision cache budget per process, in accounted bytes, LRU (default 64MiB); keys "
        "are hashed, so a long path costs no more than a short one",
    )
    serve.add_argument(
        "--cache-ttl",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="longest a decision is reused (default 60); never past the token's exp "
        "or an emergency policy's expiry",
    )
    serve.add_argument(
        "--jwt-leeway",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="clock skew allowed on exp/nbf/iat (default 60, as Envoy)",
    )
    serve.add_argument(
        "--max-token-bytes",
        type=_positive_int,
        default=8192,
        metavar="N",
        help="longer tokens are rejected with 401 (default 8192)",
    )
    serve.add_argument(
        "--jwks-timeout",
        type=_non_negative_float,
        default=3.0,
        metavar="SECONDS",
        help="timeout fetching an http(s) jwksUri (default 3)",
    )
    serve.add_argument(
        "--jwks-refresh-interval",
        type=_non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="refetch a jwksUri on an unknown kid at most this often (default 30)",
    )
    serve.add_argument(
        "--poll-interval",
        type=_non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="policy directory poll period (default 1)",
    )
    serve.add_argument(
        "--ready-file",
        type=Path,
        metavar="FILE",
        help="write the JSON line with bound addresses here once serving",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="server log level (JSON lines on stderr; default INFO)",
    )
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check",
        help="send one Check to a running service and print the answer",
        description="Build a CheckRequest like Envoy's and print the decision the service returns.",
        epilog="example:\n  meshward extauthz check --server 127.0.0.1:9191 --workload foo/httpbin "
        '--method GET --path /admin --token "$TOKEN"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--server", type=_address, required=True, metavar="HOST:PORT", help="the ext_authz service"
    )
    check.add_argument(
        "--workload", required=True, metavar="NS/NAME", help="context_extensions.workload"
    )
    check.add_argument("--method", default="GET", help="HTTP method (default GET)")
    check.add_argument("--path", default="/", help="request path with query (default /)")
    check.add_argument("--host", default="", help="HTTP host / :authority")
    check.add_argument("--principal", default="", metavar="SPIFFE_ID", help="peer SPIFFE ID (mTLS)")
    check.add_argument("--token", help="send as Authorization: Bearer TOKEN")
    check.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra header (repeatable)",
    )
    check.add_argument(
        "--timeout", type=_non_negative_float, default=5.0, help="seconds (default 5)"
    )
    check.set_defaults(func=_check)


def _serve(args: argparse.Namespace) -> int:
    from meshward.extauthz.server import ServeOptions, run
    from meshward.telemetry import setup_json_logging

    setup_json_logging(args.log_level)
    for path in args.policy:
        if not path.exists():
            raise UserError(f"--policy {path}: no such file or directory")
    host, port = args.listen
    metrics_host, metrics_port = args.metrics_listen if args.metrics_listen else (LOOPBACK, None)
    options = ServeOptions(
        policy_paths=list(args.policy),
        host=host,
        port=port,
        workers=args.workers,
        kind=args.server,
        threads=args.threads,
        otlp_endpoint=args.otlp_endpoint,
        decision_log=args.decision_log,
        log_allows=args.log_allows,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        cache_bytes=args.cache_bytes,
        decision_log_max_bytes=args.decision_log_max_bytes,
        cache_ttl=args.cache_ttl,
        leeway=args.jwt_leeway,
        max_token_bytes=args.max_token_bytes,
        jwks_timeout=args.jwks_timeout,
        jwks_refresh_interval=args.jwks_refresh_interval,
        poll_interval=args.poll_interval,
        ready_file=args.ready_file,
        extra={"log_level": args.log_level},
    )
    return run(options)


def _check(args: argparse.Namespace) -> int:
    import grpc

    from meshward.extauthz.client import build_check_request, describe_response

    headers = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--header {item!r}: expected NAME=VALUE")
        headers[name.lower()] = value
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    request = build_check_request(
        method=args.method,
        path=args.path,
        host=args.host,
        headers=headers,
        source_principal=args.principal,
        workload=args.workload,
    )
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    host, port = args.server
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        try:
            response = stub.Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            raise UserError(
                f"Check to {host}:{port} failed: {exc.code().name} {exc.details()}"
            ) from None
    print(json.dumps(describe_response(response), indent=2, sort_keys=True))
    return 0
