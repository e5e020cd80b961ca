"""ext_authz speed, as ratios measured side by side in one run.

1. Checks/s on decision-cache hits vs an empty Check handler on the same gRPC server kind
   (sync thread pool and grpc.aio; target >= 0.8). Driver: wrk -> Envoy (direct response) with
   the ext_authz filter -> the service in its own process, so the C++ side is never the limit.
2. Miss cost (policy evaluated) with 10 vs 10,000 policies in the set (target <= 1.5; the
   per-workload index makes it independent of policies selecting other workloads).
3. End to end through Envoy: ext_authz (cache hits) vs the same route decided by native RBAC
   only; requests/s and the p50/p99 latency ext_authz adds.
4. In-process (the Check handler called directly): CUSTOM and allow cache hits vs an empty
   handler, tracing off and on (the demo's setting: real OTLP exporter, real receiver), side by
   side (bench/extauthz_tracing.py; runs alone too, without Envoy or wrk).

Rounds are interleaved (A B C A B C ...) and the median is reported, because the cores are shared
with other work. Tracing is off (no OTLP endpoint) in 1-3, as in a service without a collector.

    python bench/extauthz.py [--duration 3] [--rounds 3] [--connections 16] [--workers 2]
                             [--tracing-calls 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshward.envoy.process import EnvoyProcess  # noqa: E402
from meshward.extauthz.envoyconfig import rbac_allow_paths, sidecar  # noqa: E402
from meshward.testing.jwt_issuer import LocalIssuer  # noqa: E402
from meshward.testing.processes import Launcher, meshward_argv  # noqa: E402

WORKLOAD = "foo/bench"


def policy_yaml(issuer: LocalIssuer) -> str:
    return (
        # the ext_authz JWT path is what this measures (bench/jwt_native.py compares it with jwt_authn)
        "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        "spec: {jwtEnforcement: extauthz}\n---\n"
        "apiVersion: meshward.dev/v1\nkind: Workload\n"
        "metadata: {name: bench, namespace: foo, labels: {app: bench}}\nspec: {}\n---\n"
        + issuer.request_authentication_yaml("foo", "jwt", {"app": "bench"})
        + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: admins, namespace: foo}\n"
        "spec:\n  selector: {matchLabels: {app: bench}}\n  rules:\n"
        "  - to: [{operation: {paths: ['/bench*'], methods: [GET]}}]\n"
        "    when: [{key: 'request.auth.claims[groups]', values: [admin]}]\n"
    )


# ---- processes ---------------------------------------------------------------------------------


def service_process(
    launcher: Launcher,
    name: str,
    kind: str,
    policy_dir: Path | None,
    tls_dir: Path,
    workers: int = 1,
    threads: int = 4,
) -> tuple[int, int]:
    """The real service via the CLI, or (policy_dir None) an empty handler, both over mTLS with
    the SVID in ``tls_dir``, started by the launcher (stopped with it); (port, pid)."""
    ready = launcher.root / f"{name}.ready.json"
    if policy_dir is None:
        argv = [
            sys.executable, str(Path(__file__).resolve()), "_empty-server", "--kind", kind,
            "--ready-file", str(ready), "--threads", str(threads), "--tls-dir", str(tls_dir),
        ]  # fmt: skip
    else:
        argv = meshward_argv(
            "extauthz", "serve", "--policy", str(policy_dir), "--listen", "127.0.0.1:0",
            "--server", kind, "--workers", str(workers), "--tls-dir", str(tls_dir),
            "--ready-file", str(ready), "--log-level", "WARNING", "--threads", str(threads),
        )  # fmt: skip
    info = launcher.start(name, argv, ready_path=ready, timeout=60)
    pid = launcher[name].pid
    assert pid is not None
    return int(info["listen"].rsplit(":", 1)[1]), pid


def empty_server(kind: str, ready_file: Path, threads: int, tls_dir: Path) -> None:
    import signal
    import threading

    from meshward.certs.server_tls import ServerTls
    from meshward.extauthz.callers import TlsFiles
    from meshward.extauthz.server import ExtAuthzServer
    from meshward.extauthz.service import EmptyCheckService

    tls = ServerTls(*TlsFiles(tls_dir).read())
    server = ExtAuthzServer(EmptyCheckService(), kind=kind, threads=threads, tls=tls).start()  # type: ignore[arg-type]
    ready_file.write_text(json.dumps({"listen": server.address}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


# ---- wrk ---------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int = 0
    cpu_us: float = 0.0  # server process CPU (user + system) per request


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (worker processes), from /proc."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return total
    return total + sum(cpu_seconds(int(child)) for child in children)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, *, duration: float, connections: int, token: str) -> WrkResult:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return WrkResult(rps, p50, p99, int(bad.group(1)) if bad else 0, total)


# ---- 2. miss cost ------------------------------------------------------------------------------


def miss_cost(issuer: LocalIssuer, policies: int, requests: int) -> float:
    """Mean seconds per Check that misses the decision cache (a distinct path each time)."""
    from meshward.extauthz.authorizer import Authorizer, decision_cache
    from meshward.extauthz.client import build_check_request
    from meshward.policy import parse
    from meshward.policy.model import Action, AuthorizationPolicy, Condition, Operation, Rule
    from meshward.policy.policyset import PolicySet

    base = parse({"bench.yaml": policy_yaml(issuer)})
    others = [
        AuthorizationPolicy(
            namespace="foo" if i % 2 else f"ns{i % 100}",
            name=f"other-{i}",
            action=Action.DENY if i % 3 == 0 else Action.ALLOW,
            selector={"app": f"svc-{i}"},
            rules=(
                Rule(
                    operations=(Operation(paths=(f"/p{i}/*",), methods=("GET", "POST")),),
                    conditions=(Condition(key="request.auth.claims[groups]", values=(f"g{i}",)),),
                ),
            ),
        )
        for i in range(policies - len(base.authorization_policies))
    ]
    policy_set = PolicySet.create(
        mesh=base.mesh,
        workloads=base.workloads,
        authorization_policies=(*base.authorization_policies, *others),
        request_authentications=base.request_authentications,
    )
    assert len(policy_set.authorization_policies) == policies
    authorizer = Authorizer(policy_set, cache=decision_cache(1 << 30, 60.0))
    token = issuer.token(groups=["admin"])
    headers = {"authorization": f"Bearer {token}"}
    warm = [
        build_check_request(path=f"/bench/warm{i}", headers=headers, workload=WORKLOAD)
        for i in range(200)
    ]
    batch = [
        build_check_request(path=f"/bench/{i}", headers=headers, workload=WORKLOAD)
        for i in range(requests)
    ]
    for request in warm:
        authorizer.check(request)
    before = authorizer.evaluations
    start = time.perf_counter()
    for request in batch:
        result = authorizer.check(request)
    elapsed = time.perf_counter() - start
    assert authorizer.evaluations - before == requests and result.allowed, (
        "every Check must miss and allow"
    )
    return elapsed / requests


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_empty-server":
        sub = argparse.ArgumentParser()
        sub.add_argument("_cmd")
        sub.add_argument("--kind", default="sync")
        sub.add_argument("--ready-file", type=Path, required=True)
        sub.add_argument("--threads", type=int, default=4)
        sub.add_argument("--tls-dir", type=Path, required=True)
        ns = sub.parse_args()
        empty_server(ns.kind, ns.ready_file, ns.threads, ns.tls_dir)
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument(
        "--kinds", default="sync,aio", help="server kinds to compare (default sync,aio)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="also measure hits with N worker processes (0: skip)"
    )
    parser.add_argument("--miss-requests", type=int, default=3000)
    parser.add_argument(
        "--tracing-calls",
        type=int,
        default=3000,
        help="section 4: Checks per variant per round (0: skip)",
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="sync server pool size (default 4, as the CLI)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk (Debian) and run again")
    kinds = [k for k in args.kinds.split(",") if k]

    issuer = LocalIssuer()
    token = issuer.token(groups=["admin"], ttl=3600)
    workdir = Path(tempfile.mkdtemp(prefix="bench-extauthz-"))
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    (policy_dir / "bench.yaml").write_text(policy_yaml(issuer))
    # ext_authz speaks only mTLS: the sidecar presents the workload's SVID (issue 13).
    from meshward.certs.ca import CertificateAuthority
    from meshward.policy import load
    from meshward.testing.extauthz import issue_service_tls, sidecar_tls

    ca = CertificateAuthority.ephemeral("cluster.local")
    mesh = load([policy_dir]).mesh
    tls_dir = issue_service_tls(ca, mesh, workdir / "extauthz-tls").directory
    upstream_tls = sidecar_tls(
        ca, f"spiffe://cluster.local/ns/foo/sa/{WORKLOAD.split('/')[1]}", mesh
    )
    print(
        f"cpus: {os.cpu_count()}  wrk -t1 -c{args.connections} -d{args.duration:g}s x {args.rounds} rounds (median)"
    )

    # Configurations measured through Envoy: name -> (server kind or None, policy dir or None, workers)
    configs: dict[str, tuple[str | None, Path | None, int]] = {"rbac-only": (None, None, 0)}
    for kind in kinds:
        configs[f"empty-{kind}"] = (kind, None, 1)
        configs[f"hits-{kind}"] = (kind, policy_dir, 1)
    if args.workers > 1:
        configs[f"hits-{kinds[0]}-x{args.workers}"] = (kinds[0], policy_dir, args.workers)
    results: dict[str, list[WrkResult]] = {name: [] for name in configs}
    # Unloaded latency: one connection, so no queueing at the saturated Python process.
    single = ["rbac-only", *(f"hits-{kind}" for kind in kinds)]
    single_results: dict[str, list[WrkResult]] = {name: [] for name in single}

    with Launcher(workdir, quiet=True) as launcher:
        envoys: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, (kind, policies, workers) in configs.items():
            if kind is None:
                extra = [rbac_allow_paths(["/bench"])]
                config = sidecar(workload=WORKLOAD, extauthz_port=None, extra_filters=extra)
            else:
                port, pids[name] = service_process(
                    launcher, f"service-{name}", kind, policies, tls_dir, workers, args.threads
                )
                config = sidecar(
                    workload=WORKLOAD,
                    extauthz_port=port,
                    timeout_ms=2000,
                    extauthz_tls=upstream_tls,
                )
            envoy = EnvoyProcess(config, name=f"bench-{name}", workdir=workdir / name)
            launcher.launch_envoy(f"envoy-{name}", envoy)
            launcher.wait_ready([f"envoy-{name}"])
            envoys[name] = envoy.listener_port("ingress")
        url = "http://127.0.0.1:{}/bench/x"
        for port in envoys.values():  # warm: fill caches, open connections
            wrk(url.format(port), duration=1, connections=args.connections, token=token)
        for round_ in range(args.rounds):
            for name, port in envoys.items():
                before = cpu_seconds(pids[name]) if name in pids else 0.0
                result = wrk(
                    url.format(port),
                    duration=args.duration,
                    connections=args.connections,
                    token=token,
                )
                if name in pids:
                    result.cpu_us = (cpu_seconds(pids[name]) - before) / result.requests * 1e6
                if result.non_2xx:
                    raise SystemExit(f"{name}: {result.non_2xx} non-2xx responses: setup is wrong")
                results[name].append(result)
                if name in single_results:
                    single_results[name].append(
                        wrk(url.format(port), duration=args.duration, connections=1, token=token)
                    )
            print(
                f"  round {round_ + 1}: "
                + "  ".join(f"{n} {r[-1].rps:,.0f}/s" for n, r in results.items())
            )

    def med(name: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[name]))

    def ratio(a: str, b: str) -> float:
        """Median of per-round ratios: runs of one round are adjacent in time, so they saw the
        same machine load (the cores are shared); this cancels most of the drift."""
        return statistics.median(x.rps / y.rps for x, y in zip(results[a], results[b], strict=True))

    print("\n1. Checks/s, cache hits vs an empty handler on the same server kind (through Envoy)")
    print("   throughput: median of per-round ratios; capacity: the service's own CPU per Check")
    best_kind, best_cpu = "", float("inf")
    for kind in kinds:
        hits, empty = f"hits-{kind}", f"empty-{kind}"
        cpu_hits, cpu_empty = med(hits, "cpu_us"), med(empty, "cpu_us")
        print(
            f"  {kind:<5} empty {med(empty, 'rps'):>7,.0f}/s  hits {med(hits, 'rps'):>7,.0f}/s"
            f"  throughput ratio {ratio(hits, empty):.2f}"
            f"  | CPU/Check empty {cpu_empty:4.0f} us  hits {cpu_hits:4.0f} us"
            f"  capacity ratio {cpu_empty / cpu_hits:.2f}  (target >= 0.80)"
        )
        if cpu_hits < best_cpu:
            best_kind, best_cpu = kind, cpu_hits
    print(f"  cheaper per Check on hits: {best_kind} (~{1e6 / best_cpu:,.0f} Checks/s per core)")

    print("\n2. Miss cost (policy evaluated), 10 vs 10,000 policies in the set")
    small, large = [], []
    for _ in range(args.rounds):
        small.append(miss_cost(issuer, 10, args.miss_requests))
        large.append(miss_cost(issuer, 10_000, args.miss_requests))
    s, lg = statistics.median(small), statistics.median(large)
    print(
        f"  10 policies {s * 1e6:7.1f} us/miss   10,000 policies {lg * 1e6:7.1f} us/miss   ratio {lg / s:.2f}  (target <= 1.50)"
    )

    print("\n3. End to end through Envoy: native RBAC only vs ext_authz (cache hits)")
    base = "rbac-only"
    print(f"  saturated (wrk -c{args.connections}):")
    print(
        f"  {base:<16} {med(base, 'rps'):>8,.0f} req/s   "
        f"p50 {med(base, 'p50_ms'):6.2f} ms   p99 {med(base, 'p99_ms'):6.2f} ms"
    )
    for name in configs:
        if name.startswith("hits-"):
            print(
                f"  {name:<16} {med(name, 'rps'):>8,.0f} req/s   p50 {med(name, 'p50_ms'):6.2f} ms"
                f"   p99 {med(name, 'p99_ms'):6.2f} ms   ratio {ratio(name, base):.2f}"
            )
    print("  unloaded (wrk -c1): the latency ext_authz adds to one request")

    def single_med(name: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in single_results[name]))

    b50, b99 = single_med(base, "p50_ms"), single_med(base, "p99_ms")
    print(f"  {base:<16} p50 {b50:6.3f} ms   p99 {b99:6.3f} ms")
    for name in single[1:]:
        p50, p99 = single_med(name, "p50_ms"), single_med(name, "p99_ms")
        print(
            f"  {name:<16} p50 {p50:6.3f} ms   p99 {p99:6.3f} ms   "
            f"added p50 +{p50 - b50:.3f} ms  p99 +{p99 - b99:.3f} ms"
        )
    print(
        "  bound: the Python process: every request costs it one unary gRPC call (the empty-handler\n"
        "  CPU in (1) is that floor, most of it grpcio's), one core per process; wrk, Envoy and the\n"
        "  service share this machine's 2 cores, so --workers cannot add a core here."
    )
    shutil.rmtree(workdir, ignore_errors=True)
    if args.tracing_calls:
        from bench import extauthz_tracing

        print()
        extauthz_tracing.report(extauthz_tracing.run(args.tracing_calls, args.rounds))
        extauthz_tracing.report_grpc(extauthz_tracing.run_grpc(args.tracing_calls, args.rounds))


if __name__ == "__main__":
    main()
