"""ext_authz cache hits vs an empty handler, in-process, tracing off and on.

Section 4 of bench/extauthz.py, and runnable alone (no Envoy, no wrk):

    python bench/extauthz_tracing.py [--calls 3000] [--rounds 5] [--json]

The Check handler (meshward.extauthz.service.CheckService.check, what the gRPC server calls)
is called directly, N times per variant per round, variants interleaved, with the traceparent
metadata Envoy's ext_authz client sends: sampled, as in the demo, whose Envoys trace every
request. Two decisions, both cache hits: the demo's CUSTOM policy (no external provider, so
ext_authz denies, fail closed; each denial is written to the decision log file, as in the demo)
and an allow (a JWT rule under ``jwtEnforcement: extauthz``). Tracing on is the real setup
(meshward.telemetry.setup_tracing: OTLP gRPC exporter, batch span processor) pointing at a real
OTLP receiver in another process: CPU is this process's time, all threads, so the exporter's
background encoding counts and the receiver's does not.

Variants per decision: tracing off; tracing on as served (cache hits sampled at the service's
default ratio, every evaluated Check traced: meshward.extauthz.tracing); and a span on every
Check (ratio 1, what the service did before sampling). The receiver's span count per variant is
printed. Checks are paced (at most ~10k/s, still more than one process serves through gRPC) so
the batch processor exports every span rather than dropping what its queue cannot hold (a
dropped span costs less), and each variant flushes its exporter before its clock stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEER = "spiffe://cluster.local/ns/shop/sa/orders"
CUSTOM_POLICY = """\
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: payments, namespace: shop, labels: {app: payments}}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: refunds-review, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: CUSTOM
  provider: {name: meshward-extauthz}
  rules:
  - to: [{operation: {paths: ["/refunds*"]}}]
"""


@contextlib.contextmanager
def receiver_process() -> Iterator[tuple[str, Path]]:
    """A real OTLP/gRPC receiver in its own process (on the launcher, its output in
    ``receiver.log`` beside the counts); yields (endpoint, counts file)."""
    from meshward.testing.processes import ComponentFailed, Launcher

    workdir = Path(tempfile.mkdtemp(prefix="bench-otlp-"))
    ready, counts = workdir / "ready", workdir / "counts.json"
    with Launcher(workdir, quiet=True, logs=workdir) as launcher:
        launcher.launch(
            "receiver",
            [sys.executable, __file__, "_receiver", str(ready), str(counts)],
            ready=lambda: ready.exists() and bool(ready.read_text()),
            timeout=30,
        )
        try:
            launcher.wait_ready(["receiver"])
        except ComponentFailed as err:
            raise SystemExit(f"OTLP receiver did not start: {err}") from None
        yield ready.read_text(), counts
        launcher.stop("receiver", timeout=10)


def _receiver(ready: Path, counts: Path) -> None:
    import threading

    from meshward.telemetry.collector import OtlpReceiver

    lock, seen = threading.Lock(), dict[str, int]()

    def on_spans(spans: list[Any]) -> None:
        with lock:
            for span in spans:
                seen[span.service] = seen.get(span.service, 0) + 1
            tmp = counts.with_suffix(".tmp")
            tmp.write_text(json.dumps(seen))
            tmp.replace(counts)

    receiver = OtlpReceiver(on_spans=on_spans, keep=False)
    receiver.start()
    ready.write_text(receiver.endpoint)
    threading.Event().wait()


def _scenarios() -> dict[str, tuple[str, Any]]:
    """decision -> (policy YAML, CheckRequest): both cache hits after the first Check."""
    from bench.extauthz import WORKLOAD as JWT_WORKLOAD
    from bench.extauthz import policy_yaml
    from meshward.extauthz.client import build_check_request
    from meshward.testing.jwt_issuer import LocalIssuer

    issuer = LocalIssuer()
    token = issuer.token(groups=["admin"], ttl=3600)
    return {
        "CUSTOM deny": (
            CUSTOM_POLICY,
            build_check_request(
                path="/refunds/42",
                workload="shop/payments",
                source_principal=PEER,
                destination_port=8080,
            ),
        ),
        "allow": (
            policy_yaml(issuer),
            build_check_request(
                path="/bench/x",
                headers={"authorization": f"Bearer {token}"},
                workload=JWT_WORKLOAD,
                source_principal=PEER,
            ),
        ),
    }


def _service(policy: str, endpoint: str | None, name: str, ratio: float | None) -> Any:
    from meshward.extauthz.authorizer import Authorizer
    from meshward.extauthz.metrics import Metrics
    from meshward.extauthz.service import CheckService
    from meshward.policy import parse
    from meshward.telemetry import setup_tracing

    authorizer = Authorizer(parse({"p.yaml": policy}))
    metrics = Metrics()
    metrics.attach(authorizer)
    provider = setup_tracing(name, endpoint)
    # ratio 1 and no span budget: the service as it was before sampling
    kw: dict[str, Any] = (
        {} if ratio is None else {"sample_ratio": ratio, "max_spans_per_second": 10**9}
    )
    return CheckService(authorizer, metrics=metrics, tracer_provider=provider, **kw), provider


CHUNK = 50  # Checks between pauses
PAUSE = 0.005  # seconds: at most ~10k Checks/s, what the exporter keeps up with (no drops)


def _cpu_us(handler: Any, provider: Any, request: Any, calls: int) -> float:
    """CPU microseconds per Check, each with a fresh sampled traceparent (as from Envoy).

    Paced (CHUNK Checks, then PAUSE) so the batch processor exports every span instead of
    dropping what its queue cannot hold (a dropped span costs less), and flushed before the
    clock stops, so each variant pays for its own exports."""
    metadata = [
        [("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01")]
        for _ in range(calls)
    ]
    start = time.process_time()
    for index, md in enumerate(metadata, 1):
        handler.check(request, md)
        if index % CHUNK == 0:
            time.sleep(PAUSE)
    if hasattr(provider, "force_flush"):
        provider.force_flush()
    return (time.process_time() - start) / calls * 1e6


def run(calls: int, rounds: int) -> dict[str, Any]:
    from meshward.extauthz.decisionlog import open_decision_log
    from meshward.extauthz.service import EmptyCheckService

    log_dir = Path(tempfile.mkdtemp(prefix="bench-decisions-"))
    open_decision_log(log_dir / "decisions.jsonl")  # denials go to a file, as in the demo
    out: dict[str, Any] = {"calls": calls, "rounds": rounds, "decisions": {}}
    with receiver_process() as (endpoint, counts_file):
        variants: dict[str, tuple[Any, Any, Any]] = {"empty": (EmptyCheckService(), None, None)}
        for decision, (policy, request) in _scenarios().items():
            for mode, traced, ratio in (
                ("off", None, None),
                ("on", endpoint, None),
                ("every span", endpoint, 1.0),
            ):
                name = f"{decision} | {mode}"
                service_name = f"bench-{decision}-{mode}".replace(" ", "-")
                handler, provider = _service(policy, traced, service_name, ratio)
                handler.check(request, [("traceparent", f"00-{'1' * 32}-{'2' * 16}-01")])
                assert handler.authorizer.cache.stats.misses == 1, name
                variants[name] = (handler, provider, request)
        empty_request = variants["allow | off"][2]
        per: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (handler, provider, request) in variants.items():
                per[name].append(_cpu_us(handler, provider, request or empty_request, calls))
        for _, provider, _ in variants.values():
            if hasattr(provider, "force_flush"):
                provider.force_flush()
        time.sleep(1.0)
        counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
        for _, provider, _ in variants.values():
            if hasattr(provider, "shutdown"):
                provider.shutdown()
    open_decision_log(None)
    med = {name: statistics.median(v) for name, v in per.items()}
    out["empty_us"] = med["empty"]
    sample_ratio = variants["allow | on"][0].sampler.ratio
    out["sample_ratio"] = sample_ratio
    for decision in ("CUSTOM deny", "allow"):
        off, on, every = (per[f"{decision} | {m}"] for m in ("off", "on", "every span"))
        out["decisions"][decision] = {
            "cpu_us": {
                "off": med[f"{decision} | off"],
                "on": med[f"{decision} | on"],
                "every span": med[f"{decision} | every span"],
            },
            "tracing_added_us": statistics.median(b - a for a, b in zip(off, on, strict=True)),
            "every_span_added_us": statistics.median(
                b - a for a, b in zip(off, every, strict=True)
            ),
            "ratio_on_off": statistics.median(b / a for a, b in zip(off, on, strict=True)),
            "ratio_every_off": statistics.median(b / a for a, b in zip(off, every, strict=True)),
            "spans": {
                mode: counts.get(f"bench-{decision}-{mode}".replace(" ", "-"), 0)
                for mode in ("on", "every span")
            },
            "checks_per_variant": calls * rounds + 1,
        }
    return out


# ---- through gRPC: the capacity ratio vs an empty handler ----------------------------------


def _client(address: str, calls: int, path: str, workload: str) -> None:
    """Sends ``calls`` Checks one after another, each with a fresh sampled traceparent."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    from meshward.extauthz.client import build_check_request

    request = build_check_request(
        path=path, workload=workload, source_principal=PEER, destination_port=8080
    )
    with grpc.insecure_channel(address) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for _ in range(calls):
            tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            stub.Check(request, metadata=[("traceparent", tp)], timeout=5)


def run_grpc(calls: int, rounds: int) -> dict[str, Any]:
    """CUSTOM cache hits vs an empty handler behind the real sync gRPC server (in this process;
    the client is another process): server CPU per Check, tracing off, on, every span."""
    from meshward.extauthz.decisionlog import open_decision_log
    from meshward.extauthz.server import ExtAuthzServer
    from meshward.extauthz.service import EmptyCheckService

    open_decision_log(Path(tempfile.mkdtemp(prefix="bench-decisions-")) / "decisions.jsonl")
    per: dict[str, list[float]] = {}
    with receiver_process() as (endpoint, _), contextlib.ExitStack() as stack:
        variants: dict[str, tuple[str, Any]] = {}
        empty = stack.enter_context(ExtAuthzServer(EmptyCheckService()))
        variants["empty"] = (empty.address, None)
        for mode, traced, ratio in (
            ("off", None, None),
            ("on", endpoint, None),
            ("every span", endpoint, 1.0),
        ):
            handler, provider = _service(
                CUSTOM_POLICY, traced, f"grpc-{mode}".replace(" ", "-"), ratio
            )
            server = stack.enter_context(ExtAuthzServer(handler))
            variants[mode] = (server.address, provider)
        for address, _ in variants.values():  # warm: the miss, connections
            _client(address, 5, "/refunds/42", "shop/payments")
        per = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (address, provider) in variants.items():
                start = time.process_time()
                subprocess.run(
                    [sys.executable, __file__, "_client", address, str(calls)], check=True
                )
                if hasattr(provider, "force_flush"):
                    provider.force_flush()
                per[name].append((time.process_time() - start) / calls * 1e6)
        for _, provider in variants.values():
            if hasattr(provider, "shutdown"):
                provider.shutdown()
    open_decision_log(None)
    return {
        "calls": calls,
        "cpu_us": {name: statistics.median(v) for name, v in per.items()},
        "capacity_ratio": {
            name: statistics.median(e / v for e, v in zip(per["empty"], per[name], strict=True))
            for name in per
            if name != "empty"
        },
    }


def report_grpc(r: dict[str, Any]) -> None:
    cpu, ratio = r["cpu_us"], r["capacity_ratio"]
    print(
        f"  through the sync gRPC server ({r['calls']:,} Checks per variant per round from a client "
        "process): server CPU per Check, capacity ratio vs the empty handler"
    )
    print(f"  {'empty':<18} {cpu['empty']:6.1f} us   1.00")
    for name in ("off", "on", "every span"):
        label = f"CUSTOM deny {name}"
        print(f"  {label:<18} {cpu[name]:6.1f} us   {ratio[name]:.2f}")


def report(r: dict[str, Any]) -> None:
    print(
        f"4. ext_authz cache hits vs an empty handler, in-process (handler called directly, no gRPC),"
        f"\n   tracing off and on: {r['calls']:,} Checks x {r['rounds']} rounds per variant, interleaved;"
        f"\n   cache hits traced at ratio {r['sample_ratio']:g} (as served); empty handler {r['empty_us']:.1f} us/Check"
    )
    print(
        f"  {'decision':<12} {'off':>8} {'on':>8} {'added':>8} {'on/off':>7}   "
        f"{'every span':>10} {'added':>8} {'/off':>6}   spans received (on, every span) of Checks"
    )
    for decision, d in r["decisions"].items():
        cpu = d["cpu_us"]
        print(
            f"  {decision:<12} {cpu['off']:6.1f}us {cpu['on']:6.1f}us {d['tracing_added_us']:6.1f}us "
            f"{d['ratio_on_off']:7.2f}   {cpu['every span']:8.1f}us {d['every_span_added_us']:6.1f}us "
            f"{d['ratio_every_off']:6.2f}   {d['spans']['on']:,}, {d['spans']['every span']:,} of {d['checks_per_variant']:,}"
        )
    print("  target: tracing on adds <= 20 us of CPU per Check")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_receiver":
        _receiver(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        _client(sys.argv[2], int(sys.argv[3]), "/refunds/42", "shop/payments")
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="Checks per variant per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument(
        "--grpc-calls",
        type=int,
        default=2000,
        help="Checks per variant per round through gRPC (0: skip)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    result = run(args.calls, args.rounds)
    result["cpus"] = os.cpu_count()
    if args.grpc_calls:
        result["grpc"] = run_grpc(args.grpc_calls, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
        if args.grpc_calls:
            report_grpc(result["grpc"])


if __name__ == "__main__":
    main()
