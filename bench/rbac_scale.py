"""Native RBAC at scale, as ratios measured side by side in one run.

1. Requests/s and p50/p99 through an mTLS sidecar whose RBAC was compiled from 10 and from 1,000
   rules, against the same sidecar with no RBAC filter at all ("none": the compiled sidecar of a
   workload without policy, its RBAC filters removed). Target: 1,000 rules / none >= 0.9.
   "idle filters" is what a workload without policy really gets: every inbound chain carries
   the same seven RBAC filters (so any policy edit is a route update), each without rules,
   passing every request; its ratio is what those always-present filters cost. What each
   row measures: "1000 rules" name their callers by exact identity, so the principal index
   (meshward.compile.authz.principal_index) finds the caller's rules with one lookup on its URI SAN (a request
   does NOT walk every rule); "1000 keyed" name callers by namespace, namespace prefix,
   principal prefix or principal prefix + notPrincipals (the caller by its namespace), which
   the index takes as a prefix map (target >= 0.85); the "no index" rows compile the same
   rules without the index, i.e. Envoy's plain rules engine walking every rule. The path is the real one: load generator -> client sidecar
   (compiled outbound listener, upstream mTLS with its SVID) -> server sidecar (compiled inbound
   listener: mTLS, RBAC) -> application (a direct response in the server Envoy, so no Python
   process is in the path). The rule that allows the benchmark's caller sorts last in Envoy's
   evaluation order (the worst case for the rules engine: it walks every other rule first).
2. Compile time for 10,000 policies across 1,000 workloads, and for 1,000 across 100: the ratio
   shows how it grows (linear: ~10x for 10x the input).

Load generator: `wrk` (Debian: `apt-get install -y wrk`; elsewhere build it from
https://github.com/wg/wrk). Without it the bench falls back to a small asyncio HTTP/1.1
keep-alive client, which saturates before Envoy does: its ratios then understate RBAC's cost and
say so. Besides requests/s (which moves with whatever else the shared cores run) the bench
reports the server sidecar's CPU time per request, read from /proc: capacity = 1 / that, the
steadier measure of what RBAC costs. Rounds are interleaved (each round starting with the next variant) and medians reported, because the
cores are shared with other work. Total runtime about a minute:

    python bench/rbac_scale.py [--duration 3] [--rounds 4] [--connections 16] [--skip-compile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshward.certs.ca import CertificateAuthority  # noqa: E402
from meshward.compile import (  # noqa: E402
    CompileOptions,
    Endpoint,
    Mode,
    PortBinding,
    WorkloadBinding,
    compile_mesh,
    compile_workload,
    static_bootstrap,
)
from meshward.envoy import EnvoyProcess  # noqa: E402
from meshward.net import free_port  # noqa: E402
from meshward.policy import PolicySet  # noqa: E402
from meshward.policy.model import (  # noqa: E402
    Action,
    AuthorizationPolicy,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.testing import synth  # noqa: E402
from meshward.testing.sidecar import workload_secrets  # noqa: E402

TD = "cluster.local"
SERVER = Workload("shop", "api", {"app": "api"}, "api", ports=(WorkloadPort("http", 8080),))
CLIENT = Workload("shop", "web", {"app": "web"}, "web", ports=(WorkloadPort("http", 8080),))
PATH = "/api/v1/items"


def _keyed_source(p: int, r: int) -> Source:
    """A ``from`` the exact-identity index could not take: a namespace, a namespace prefix, a
    principal prefix, a principal prefix narrowed by notPrincipals."""
    return [
        Source(namespaces=(f"team-{p}-{r}",)),
        Source(namespaces=(f"grp-{p}-{r}*",)),
        Source(principals=(f"{TD}/ns/team-{p}/sa/svc-{r}-*",)),
        Source(
            principals=(f"{TD}/ns/team-{p}/sa/svc-{r}*",),
            not_principals=(f"{TD}/ns/team-{p}/sa/svc-{r}-banned",),
        ),
    ][(p + r) % 4]


def policy_set(rules: int, keyed: bool = False) -> PolicySet:
    """``rules`` rules in policies of ten, about one in ten DENY (never matching the bench's
    requests); the caller's ALLOW rule is in the policy that sorts last. ``keyed``: every rule
    names its callers by namespace or prefix (the caller's by its namespace), which the
    exact-identity index could not take and the prefix index can."""
    policies: list[AuthorizationPolicy] = []
    if rules:
        others = rules - 1
        for p in range((others + 9) // 10):
            count = min(10, others - 10 * p)
            deny = p % 10 == 9
            policies.append(
                AuthorizationPolicy(
                    namespace="shop",
                    name=f"team-{p:04d}",
                    action=Action.DENY if deny else Action.ALLOW,
                    selector={"app": "api"},
                    rules=tuple(
                        Rule(
                            sources=(
                                _keyed_source(p, r)
                                if keyed
                                else Source(principals=(f"{TD}/ns/team-{p}/sa/svc-{r}",)),
                            ),
                            operations=(
                                Operation(methods=("GET", "POST"), paths=(f"/team-{p}/{r}/*",)),
                            ),
                        )
                        for r in range(count)
                    ),
                )
            )
        caller = (
            Source(namespaces=(CLIENT.namespace,))
            if keyed
            else Source(principals=(CLIENT.principal(TD),))
        )
        policies.append(
            AuthorizationPolicy(
                namespace="shop",
                name="zz-web",
                selector={"app": "api"},
                rules=(
                    Rule(
                        sources=(caller,),
                        operations=(Operation(methods=("GET",), paths=("/api/*",)),),
                    ),
                ),
            )
        )
        assert sum(len(p.rules) for p in policies) == rules
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TD),
        workloads=[SERVER, CLIENT],
        authorization_policies=policies,
        peer_authentications=[PeerAuthentication("shop", "default", mode=MtlsMode.STRICT)],
    )


def app_listener(port: int) -> dict[str, Any]:
    """The application: a direct response inside the server Envoy (no Python in the path)."""
    return {
        "name": "app",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "app",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "app",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {
                                                    "status": 200,
                                                    "body": {"inline_string": "ok"},
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


@dataclass
class Pair:
    """A client sidecar and a server sidecar for one policy set; ``url`` enters the client."""

    label: str
    url: str
    server: EnvoyProcess
    client: EnvoyProcess


def strip_rbac(config: dict[str, Any]) -> None:
    """Remove every HTTP RBAC filter from a bootstrap's inbound listeners (the "none" row)."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                typed = network_filter.get("typed_config", {})
                if "http_filters" in typed:
                    typed["http_filters"] = [
                        f
                        for f in typed["http_filters"]
                        if not f["typed_config"]["@type"].endswith("filters.http.rbac.v3.RBAC")
                    ]


@contextlib.contextmanager
def sidecar_pair(
    label: str,
    rules: int,
    ca: CertificateAuthority,
    work: Path,
    *,
    index: bool = True,
    rbac: bool = True,
    keyed: bool = False,
) -> Iterator[Pair]:
    ps = policy_set(rules, keyed)
    server_port, app_port, client_in, client_out = (free_port() for _ in range(4))
    bindings = {
        SERVER.ref: WorkloadBinding(
            ports={
                8080: PortBinding(
                    listen=Endpoint("127.0.0.1", server_port), app=Endpoint("127.0.0.1", app_port)
                )
            }
        ),
        CLIENT.ref: WorkloadBinding(
            ports={
                8080: PortBinding(
                    listen=Endpoint("127.0.0.1", client_in), app=Endpoint("127.0.0.1", 9)
                )
            },
            outbound={f"{SERVER.ref}:8080": Endpoint("127.0.0.1", client_out)},
        ),
    }
    options = CompileOptions(
        mode=Mode.STATIC,
        bindings=bindings,
        access_log_path=None,
        rbac_index_min_rules=CompileOptions.rbac_index_min_rules if index else None,
    )
    server_res = compile_workload(ps, SERVER, replace(options, outbound=False))
    server_cfg = static_bootstrap(server_res, workload_secrets(ca, SERVER.spiffe_id(TD)))
    if not rbac:
        strip_rbac(server_cfg)
    server_cfg["static_resources"]["listeners"].append(app_listener(app_port))
    client_cfg = static_bootstrap(
        compile_workload(ps, CLIENT, options), workload_secrets(ca, CLIENT.spiffe_id(TD))
    )
    slug = re.sub(r"\W+", "-", label)
    server = EnvoyProcess(
        server_cfg, name=f"server-{slug}", workdir=work / f"server-{slug}", log_level="warning"
    )
    client = EnvoyProcess(
        client_cfg, name=f"client-{slug}", workdir=work / f"client-{slug}", log_level="warning"
    )
    with server, client:
        yield Pair(label, f"http://127.0.0.1:{client_out}{PATH}", server, client)


# ---- load generators -----------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    server_cpu_us: float = 0.0  # server sidecar CPU per request (filled in by measure())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(load: Any, pair: Pair, duration: float, connections: int) -> Result:
    """One load run, plus the server sidecar's CPU per request: the cores are shared with other
    work, which moves requests/s a lot but hardly moves CPU per request, so capacity ratios
    come from the latter."""
    assert pair.server.pid is not None
    before = cpu_seconds(pair.server.pid)
    result: Result = load(pair.url, duration, connections)
    used = cpu_seconds(pair.server.pid) - before
    count = result.requests or int(result.rps * duration)
    result.server_cpu_us = used / max(count, 1) * 1e6
    return result


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, duration: float, connections: int) -> Result:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return Result(rps, p50, p99, int(bad.group(1)) if bad else 0, total)


def run_asyncio(url: str, duration: float, connections: int) -> Result:
    """Fallback: keep-alive HTTP/1.1 GETs from ``connections`` asyncio connections."""
    match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert match
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0

    async def one(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
        finally:
            writer.close()

    async def main() -> None:
        deadline = time.monotonic() + duration
        await asyncio.gather(*(one(deadline) for _ in range(connections)))

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    latencies.sort()
    return Result(
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1e3,
        latencies[int(len(latencies) * 0.99)] * 1e3,
        errors,
        len(latencies),
    )


# ---- compile time --------------------------------------------------------------------------


def compile_time(workloads: int, policies: int) -> tuple[float, float]:
    """(seconds to compile every workload of the mesh, seconds to build the policy set)."""
    start = time.perf_counter()
    ps = synth.scale_policy_set(workloads, policies)
    built = time.perf_counter()
    compiled = compile_mesh(ps, CompileOptions())
    done = time.perf_counter()
    assert len(compiled) == workloads
    return done - built, built - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=3, help="seconds per load run (default 3)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--connections", type=int, default=16, help="connections (default 16)")
    parser.add_argument("--skip-compile", action="store_true", help="skip the compile-time part")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the throughput part")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="VARIANT",
        help='throughput variants to run besides "none" (e.g. "1000 keyed")',
    )
    args = parser.parse_args()

    if not args.skip_throughput:
        throughput(args)
    if not args.skip_compile:
        compile_part()


def throughput(args: argparse.Namespace) -> None:
    have_wrk = shutil.which("wrk") is not None
    load = run_wrk if have_wrk else run_asyncio
    generator = "wrk -t1" if have_wrk else "asyncio fallback (install wrk for real numbers)"
    print(
        f"cpus: {os.cpu_count()}  load: {generator} -c{args.connections} -d{args.duration:g}s x {args.rounds} rounds (median)"
    )
    print(
        "path: load -> client sidecar (outbound, mTLS) -> server sidecar (mTLS + RBAC) -> direct response"
    )
    ca = CertificateAuthority.ephemeral(TD)
    # (label, rules, principal index on, RBAC filters kept, keyed): "no index" rows show what
    # the index buys; "idle filters" what the always-present RBAC filters cost; "keyed" rules
    # name callers by namespace or prefix (the prefix map), the others by exact identity.
    variants = [
        ("none", 0, True, False, False),
        ("idle filters", 0, True, True, False),
        ("10 rules", 10, True, True, False),
        ("1000 rules", 1000, True, True, False),
        ("1000, no index", 1000, False, True, False),
        ("1000 keyed", 1000, True, True, True),
        ("1000 keyed, no index", 1000, False, True, True),
    ]
    if args.only:
        variants = [v for v in variants if v[0] in ("none", *args.only)]
    results: dict[str, list[Result]] = {label: [] for label, *_ in variants}
    with (
        tempfile.TemporaryDirectory(prefix="meshward-rbac-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        pairs = [
            stack.enter_context(
                sidecar_pair(label, n, ca, Path(tmp), index=index, rbac=rbac, keyed=keyed)
            )
            for label, n, index, rbac, keyed in variants
        ]
        for pair in pairs:  # warm up connections and check the path works
            warm = load(pair.url, 1, args.connections)
            if warm.errors or warm.rps == 0:
                raise SystemExit(f"{pair.label}: the caller is not allowed through ({warm})")
        for round_ in range(args.rounds):
            # Rotate who goes first each round, so a burst of other work on the shared cores
            # does not always land on the same variant.
            for pair in pairs[round_ % len(pairs) :] + pairs[: round_ % len(pairs)]:
                results[pair.label].append(measure(load, pair, args.duration, args.connections))
        for pair in pairs:
            denied = pair.server.stats("http.inbound_8080.rbac").get(
                "http.inbound_8080.rbac.denied", 0
            )
            assert denied == 0, f"{pair.label}: {denied} requests denied"
    base = statistics.median(r.rps for r in results["none"])
    base_cpu = statistics.median(r.server_cpu_us for r in results["none"])
    print(
        f"\n{'variant':<21} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'req/s vs none':>14}"
        f" {'server CPU us/req':>18} {'capacity vs none':>17}"
    )
    for label, *_ in variants:
        rows = results[label]
        rps = statistics.median(r.rps for r in rows)
        p50 = statistics.median(r.p50_ms for r in rows)
        p99 = statistics.median(r.p99_ms for r in rows)
        cpu = statistics.median(r.server_cpu_us for r in rows)
        errors = sum(r.errors for r in rows)
        note = f"  ({errors} errors)" if errors else ""
        print(
            f"{label:<21} {rps:>9.0f} {p50:>7.2f} {p99:>7.2f} {rps / base:>14.2f}"
            f" {cpu:>18.1f} {base_cpu / cpu:>17.2f}{note}"
        )
    for label, target in (("1000 rules", 0.9), ("1000 keyed", 0.85)):
        if label not in results:
            continue
        ratio = statistics.median(r.rps for r in results[label]) / base
        capacity = base_cpu / statistics.median(r.server_cpu_us for r in results[label])
        verdict = "meets" if min(ratio, capacity) >= target else "MISSES"
        print(
            f"{label} / none: {ratio:.2f} by req/s, {capacity:.2f} by server CPU per request "
            f"({verdict} the >= {target} target)"
        )
    if "idle filters" not in results:
        return
    idle = statistics.median(r.rps for r in results["idle filters"]) / base
    idle_capacity = base_cpu / statistics.median(r.server_cpu_us for r in results["idle filters"])
    print(
        f"idle filters / none: {idle:.2f} by req/s, {idle_capacity:.2f} by server CPU per "
        "request (the cost of seven RBAC filters without rules)"
    )
    if not have_wrk:
        print("note: the asyncio client is the bottleneck; these ratios understate RBAC's cost")


def compile_part() -> None:
    print("\ncompile time (compile_mesh, inbound + outbound, xDS mode):")
    small, small_build = compile_time(100, 1_000)
    large, large_build = compile_time(1_000, 10_000)
    print(
        f"  1,000 policies /   100 workloads: {small:6.2f} s  ({small / 100 * 1e3:.1f} ms per workload; policy set built in {small_build:.2f} s)"
    )
    print(
        f" 10,000 policies / 1,000 workloads: {large:6.2f} s  ({large / 1000 * 1e3:.1f} ms per workload; policy set built in {large_build:.2f} s)"
    )
    growth = large / small
    shape = "linear or better" if growth <= 12 else "WORSE than linear"
    print(f"  growth for 10x the input: {growth:.1f}x ({shape})")


if __name__ == "__main__":
    main()
