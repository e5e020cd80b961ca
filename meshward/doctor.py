"""`meshward doctor`: prove this installation can run a mesh, and say how to fix what cannot."""

from __future__ import annotations

import argparse
import importlib

from meshward.cliutil import add_json_flag, print_json
from meshward.errors import UserError


def _check_envoy() -> str:
    from meshward.envoy.binary import envoy_version, find_envoy

    path = find_envoy()
    return f"{path} (Envoy {envoy_version(path)})"


def _check_otel_proto() -> str:
    # xds-protos overwrites opentelemetry-proto's files with an old copy (no ScopeSpans); the
    # OTLP exporter then fails at the first export. `make` reinstalls the real one.
    trace_pb2 = importlib.import_module("opentelemetry.proto.trace.v1.trace_pb2")
    if not hasattr(trace_pb2, "ScopeSpans"):
        raise UserError(
            "opentelemetry-proto was overwritten by xds-protos' old copy; run "
            "`pip install --force-reinstall --no-deps opentelemetry-proto==<version>`"
        )
    return "ScopeSpans present"


def _check_xds_protos() -> str:
    importlib.import_module("envoy.service.auth.v3.external_auth_pb2_grpc")
    importlib.import_module("envoy.service.discovery.v3.ads_pb2_grpc")
    return "Envoy API protos importable"


CHECKS = (
    ("envoy", _check_envoy),
    ("opentelemetry-proto", _check_otel_proto),
    ("xds-protos", _check_xds_protos),
)


def run(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, str | bool]] = {}
    for name, check in CHECKS:
        try:
            results[name] = {"ok": True, "detail": check()}
        except (UserError, ImportError) as exc:
            results[name] = {"ok": False, "detail": str(exc)}
    if args.json:
        print_json(results)
    else:
        for name, result in results.items():
            print(f"{'ok ' if result['ok'] else 'FAIL'} {name}: {result['detail']}")
    failed = [name for name, result in results.items() if not result["ok"]]
    if failed:
        raise UserError(f"installation check failed: {', '.join(failed)}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    parser.set_defaults(func=run)
