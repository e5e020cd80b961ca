"""`meshward extauthz ...`: serve Envoy's ext_authz Check, or send one Check by hand."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshward.cliutil import add_json_flag, non_negative_float, number, positive_int, print_json
from meshward.errors import UserError
from meshward.extauthz.tracing import DEFAULT_MAX_PER_SECOND, DEFAULT_RATIO
from meshward.net import LOOPBACK

SERVE_DESCRIPTION = """\
Serve envoy.service.auth.v3.Authorization/Check (gRPC) for the workloads whose policies Envoy's
native RBAC cannot decide: rules on a verified end-user JWT (requestPrincipals,
request.auth.claims[...], audiences, presenter) and CUSTOM policies. Every decision comes from
the same evaluator as `meshward policy explain`; repeated inputs are answered from a decision
cache. The standard gRPC health service (grpc.health.v1.Health) answers on the same port.

Check is served over mTLS only. --tls-dir holds the service's SVID, which must be
spiffe://<trust domain>/ns/<root namespace>/sa/meshward-extauthz (the identity the compiled
sidecars pin). A caller must present a mesh sidecar's SVID and may ask only about its own
workload; any other Check is refused (gRPC PERMISSION_DENIED) before it reaches the decision
cache or the decision log.
"""

SERVE_EPILOG = """\
which workload a Check is for:
  the compiled Envoy config sets per-route context_extensions {"workload": "NS/NAME"}; without
  it the destination's SPIFFE ID (mTLS) is mapped to the workload. Neither: denied, with a reason.

answers:
  allow   200 upstream, with x-meshward-principal (peer SPIFFE ID) and x-meshward-user
          (JWT iss/sub) set for the app; forged copies of these headers are removed.
  deny    403 with JSON {"error","code","trace_id"}: a stable reason code (no_matching_allow,
          denied_by_policy, request_rejected, ...) and the trace id, nothing about policies.
          Operators find the policy, rule and reason by trace id: `meshward denials`, the
          decision log. With MeshConfig spec.denialDetails: verbose (development), the body
          also has "policy","rule","reason" and the x-meshward-denied-by header is set.
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

limits (everything is bounded):
  --cache-bytes            decision cache, accounted bytes (keys are hashed; default 64MiB)
  --decision-log-max-bytes decision log + 3 rotated files (default 64MiB); fields > 1024
                           characters are cut with "...[truncated N chars]"
  spans                    attributes cut at 1024 characters, 64 per span, 32 spans per export

examples:
  meshward ca issue --dir ca --spiffe-id spiffe://cluster.local/ns/meshward-system/sa/meshward-extauthz \\
      --ttl 24h --out extauthz-tls
  meshward extauthz serve --policy examples/ --listen 127.0.0.1:9191 --tls-dir extauthz-tls
  meshward extauthz serve --policy policies/ --listen 127.0.0.1:9191 --tls-dir extauthz-tls \\
      --workers 2 --metrics-listen 127.0.0.1:9192 --otlp-endpoint 127.0.0.1:4317 \\
      --decision-log decisions.jsonl --decision-log-max-bytes 256MiB --cache-bytes 128MiB
  meshward extauthz check --server 127.0.0.1:9191 --tls-dir payments-svid --workload shop/payments \\
      --path /admin --token "$TOKEN"
"""

CHECK_EPILOG = """\
answers and exit codes:
  0  allowed: prints "allow 200" and the headers set for the app
  1  denied (403/401): prints the denial (code, trace id; with a verbose mesh also policy, rule
     and reason), or the Check could not be made (refused, unreachable, TLS): one line on stderr

ext_authz answers a caller only about its own workload: --tls-dir must hold an SVID of the
workload named by --workload (e.g. `meshward ca issue --spiffe-id
spiffe://cluster.local/ns/shop/sa/payments --out payments-svid`). The server must present
--server-id (default: meshward-extauthz in the root namespace of the client's trust domain).

examples:
  meshward extauthz check --server 127.0.0.1:9191 --tls-dir payments-svid --workload shop/payments \\
      --method GET --path /admin --token "$TOKEN"
  meshward extauthz check --server 127.0.0.1:9191 --tls-dir payments-svid --workload shop/payments \\
      --path /public --json | jq .http_status
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


def default_workers() -> int:
    """One worker per core this process may use (one CPython process is bound to one core)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


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
    credentials = serve.add_mutually_exclusive_group(required=True)
    credentials.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="the service's SVID: cert-chain.pem, key.pem, root-cert.pem (as `meshward ca issue` "
        "writes them); reloaded when the files change (renewing them is yours to do)",
    )
    credentials.add_argument(
        "--ca",
        type=Path,
        metavar="DIR",
        help="instead: issue the SVID from the mesh CA in DIR (as `xds serve --ca` does for "
        "itself, by the same code), renewed at about half life; after `meshward ca rotate` "
        "clients of the new root are trusted at once and the SVID moves to the new root when "
        "the old one is dropped; ext_authz then holds the CA key",
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
        type=positive_int,
        default=default_workers(),
        metavar="N",
        help="processes sharing the port via SO_REUSEPORT, one core each (default: the cores "
        f"this process may run on, {default_workers()} here); each has its own decision cache",
    )
    serve.add_argument(
        "--server",
        choices=("sync", "aio"),
        default="sync",
        help="gRPC server kind: sync thread pool (default; measured faster for unary Check) or grpc.aio",
    )
    serve.add_argument(
        "--threads",
        type=positive_int,
        default=4,
        metavar="N",
        help="sync server pool size per process (default 4: more threads only add GIL handoffs)",
    )
    serve.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="export Check spans over OTLP/gRPC (default $MESHWARD_OTLP_ENDPOINT; unset: off)",
    )
    serve.add_argument(
        "--trace-sample-ratio",
        type=_ratio,
        default=DEFAULT_RATIO,
        metavar="R",
        help=(
            f"share of decision-cache hits that get a span (default {DEFAULT_RATIO:g}); every "
            "evaluated Check gets one, unless Envoy's traceparent says the trace is not "
            "sampled, at most --max-spans-per-second in all. A span costs ~140 us of CPU here, "
            "several cache hits' worth (bench/extauthz_tracing.py): 1 traces every hit at "
            "that price"
        ),
    )
    serve.add_argument(
        "--max-spans-per-second",
        type=positive_int,
        default=DEFAULT_MAX_PER_SECOND,
        metavar="N",
        help=f"spans per second at most, per process (default {DEFAULT_MAX_PER_SECOND})",
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
        type=non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="longest a decision is reused (default 60); never past the token's exp "
        "or an emergency policy's expiry",
    )
    serve.add_argument(
        "--jwt-leeway",
        type=non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="clock skew allowed on exp/nbf/iat (default 60, as Envoy)",
    )
    serve.add_argument(
        "--max-token-bytes",
        type=positive_int,
        default=8192,
        metavar="N",
        help="longer tokens are rejected with 401 (default 8192)",
    )
    serve.add_argument(
        "--jwks-timeout",
        type=non_negative_float,
        default=3.0,
        metavar="SECONDS",
        help="timeout fetching an http(s) jwksUri (default 3)",
    )
    serve.add_argument(
        "--jwks-refresh-interval",
        type=non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="refetch a jwksUri on an unknown kid at most this often (default 30)",
    )
    serve.add_argument(
        "--poll-interval",
        type=non_negative_float,
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
        description="Build a CheckRequest like Envoy's, send it over mTLS as the workload's "
        "sidecar would, and print the decision the service returns.",
        epilog=CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--server", type=_address, required=True, metavar="HOST:PORT", help="the ext_authz service"
    )
    check.add_argument(
        "--tls-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="client SVID of the workload (cert-chain.pem, key.pem, root-cert.pem)",
    )
    check.add_argument(
        "--server-id",
        metavar="SPIFFE_ID",
        help="the server's required SPIFFE ID (default: spiffe://<your trust domain>/ns/"
        "meshward-system/sa/meshward-extauthz)",
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
        "--timeout", type=non_negative_float, default=5.0, help="seconds (default 5)"
    )
    add_json_flag(check)
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
    for flag, directory in (("--tls-dir", args.tls_dir), ("--ca", args.ca)):
        if directory is not None and not directory.is_dir():
            raise UserError(f"{flag} {directory}: no such directory")
    options = ServeOptions(
        policy_paths=list(args.policy),
        tls_dir=args.tls_dir,
        ca_dir=args.ca,
        host=host,
        port=port,
        workers=args.workers,
        kind=args.server,
        threads=args.threads,
        otlp_endpoint=args.otlp_endpoint,
        trace_sample_ratio=args.trace_sample_ratio,
        max_spans_per_second=args.max_spans_per_second,
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
    from meshward.extauthz.callers import TlsFiles, certificate_identity
    from meshward.extauthz.client import (
        CheckFailed,
        build_check_request,
        check_once,
        describe_response,
    )
    from meshward.policy.model import DEFAULT_ROOT_NAMESPACE

    headers = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--header {item!r}: expected NAME=VALUE")
        headers[name.lower()] = value
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    files = TlsFiles(args.tls_dir)
    key, chain, roots = files.read()
    identity = certificate_identity(chain, f"--tls-dir {args.tls_dir}")
    server_id = args.server_id or (
        identity.split("/ns/")[0] + f"/ns/{DEFAULT_ROOT_NAMESPACE}/sa/meshward-extauthz"
    )
    request = build_check_request(
        method=args.method,
        path=args.path,
        host=args.host,
        headers=headers,
        source_principal=args.principal,
        workload=args.workload,
    )
    host, port = args.server
    try:
        response = check_once(
            host,
            port,
            request,
            cert_chain_pem=chain,
            key_pem=key,
            roots_pem=roots,
            server_id=server_id,
            timeout=args.timeout,
        )
    except CheckFailed as exc:
        raise UserError(f"Check to {host}:{port} as {identity} failed: {exc}") from None
    answer = describe_response(response)
    allowed = answer["http_status"] == 200
    if args.json:
        print_json({"allowed": allowed, **answer})
    else:
        _print_answer(answer, allowed)
    return 0 if allowed else 1


def _print_answer(answer: dict[str, Any], allowed: bool) -> None:
    status = answer["http_status"]
    if allowed:
        print(f"allow {status}")
        for name, value in sorted(answer.get("headers", {}).items()):
            print(f"  set {name}: {value}")
        for name in answer.get("headers_to_remove", []):
            print(f"  remove {name}")
        return
    body = answer.get("body")
    print(f"deny {status}")
    if isinstance(body, dict):
        for key in ("code", "trace_id", "policy", "rule", "reason"):
            if body.get(key) not in (None, ""):
                print(f"  {key}: {body[key]}")
    elif body:
        print(f"  body: {body}")


def _ratio(text: str) -> float:
    return number(text, float, lambda v: 0.0 <= v <= 1.0, "must be within [0, 1]")
