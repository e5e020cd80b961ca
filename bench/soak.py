"""Soak: a fixed request rate through the demo topology for a long time (not a test).

Starts the local demo mesh (meshward.demo.topology.DemoMesh: control plane, ext_authz, five shop
apps, one `meshward agent` + Envoy sidecar each, as processes on 127.0.0.1) and sends the demo
tour's calls round-robin at ``--rate`` requests/s for ``--duration`` seconds, each call through the caller's
own sidecar over mTLS, with end-user tokens where the tour uses them. Requests vary (order ids,
payment ids, end users) over ``--distinct`` values, so the decision and token caches fill up to
their steady state instead of serving one entry.

It checks, and exits 1 unless all hold:
- no error on an allowed flow (every allowed call answered 2xx);
- nothing the policy denies was allowed;
- every denial is a policy denial (Envoy RBAC's ``RBAC: access denied`` or ext_authz's JSON body
  naming the policy), never a proxy or transport error;
- flows are collected: the control plane's flow collector (gRPC access log from every sidecar)
  received entries and dropped none for lack of room (its store may fold paths, by design);
- memory stays flat: RSS of every Meshward process at the end of the run vs after warm-up (the
  warm-up lasts at least one full cycle through every variant, so the caches hold their working
  set before the baseline is taken).

It prints the achieved rate, p50/p99 latency (all calls, natively decided allows, ext_authz
allows, denials) and RSS at start, after warm-up and at the end of every process.

    python bench/soak.py [--duration 600] [--rate 200] [--distinct 1000] [--warmup 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshward.demo import tokens  # noqa: E402
from meshward.demo.topology import (  # noqa: E402
    ComponentFailed,
    DemoMesh,
    MeshOptions,
    find_examples,
)
from meshward.demo.tour import ALLOW, TOUR, Call  # noqa: E402
from meshward.flows.evidence import EXTAUTHZ, RBAC  # noqa: E402
from meshward.testing.traffic import Flow, Outcome, SteadyTraffic, percentile  # noqa: E402

RSS_GROWTH_LIMIT = 0.10  # flat: at most 10% (and 8 MiB) more than after warm-up
RSS_SLACK_KIB = 8 * 1024


def tour_calls() -> list[Call]:
    """The tour's calls a sidecar makes and that need no policy edit."""
    return [
        step
        for step in TOUR
        if isinstance(step, Call)
        and step.source is not None
        and step.decider in (RBAC, EXTAUTHZ)
        and not getattr(step, "settle", False)
        and not step.section.startswith("live policy edit")
        and not step.section.startswith("refused")
    ]


def vary(path: str, index: int) -> str:
    """A distinct but equivalent request: another order/payment/sku id."""
    for prefix in ("/orders/", "/inventory/"):
        if path.startswith(prefix) and path.count("/") == 2:
            return f"{prefix}{index}"
    if path == "/payments":
        return f"/payments/{index}"
    return path


def build_flows(state: Any, distinct: int, token_ttl: int) -> list[Flow]:
    """``distinct`` variants of every call, interleaved (call 0 variant 0, call 1 variant 0,
    ...), so the round-robin sends every call at the same rate."""
    key = state.signing_key
    users = {
        scope: [tokens.mint(key, scope=scope, subject=f"user-{i}", ttl=token_ttl)
                for i in range(min(distinct, 500))]
        for scope in {c.scope for c in tour_calls() if c.scope}
    }  # fmt: skip
    flows = []
    calls = tour_calls()
    for index in range(distinct):
        for call in calls:
            headers = {}
            if call.scope:
                pool = users[call.scope]
                headers["authorization"] = f"Bearer {pool[index % len(pool)]}"
            port = state.outbound(call.source, call.target).rsplit(":", 1)[1]
            flows.append(
                Flow(
                    name=f"{call.who} {call.request}",
                    port=int(port),
                    method=call.method,
                    path=vary(call.path, index),
                    headers=headers,
                    expect=200 if call.expect == ALLOW else 403,
                )
            )
    return flows


@dataclass
class Tally:
    """Aggregates outcomes as they arrive (the run is too long to keep every one)."""

    extauthz_flows: set[str]
    count: int = 0
    by_flow: Counter[tuple[str, int]] = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(
        default_factory=lambda: {"all": [], "native allow": [], "ext_authz allow": [], "deny": []}
    )
    failed_allowed: int = 0
    wrongly_allowed: int = 0
    non_policy_denials: int = 0
    samples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        flow = outcome.flow
        with self.lock:
            self.count += 1
            self.by_flow[(flow.name, outcome.status)] += 1
            self.latency["all"].append(outcome.latency)
            problem = ""
            if flow.allowed:
                if outcome.ok:
                    kind = "ext_authz allow" if flow.name in self.extauthz_flows else "native allow"
                    self.latency[kind].append(outcome.latency)
                else:
                    self.failed_allowed += 1
                    problem = "allowed flow failed"
            else:
                self.latency["deny"].append(outcome.latency)
                if outcome.ok:
                    self.wrongly_allowed += 1
                    problem = "denied flow allowed"
                elif not outcome.policy_denial:
                    self.non_policy_denials += 1
                    problem = "not a policy denial"
            if problem and len(self.samples) < 20:
                self.samples.append(
                    f"{problem}: {flow.name} {flow.path} -> {outcome.status} {outcome.detail[:120]}"
                )


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes(mesh: DemoMesh) -> dict[str, int]:
    """Every process of the mesh by component name (control plane, ext_authz, apps, sidecar
    agents) and each agent's Envoy (``<name>-envoy``)."""
    from meshward.testing.mesh import AgentEnvoy

    found = {
        name: component.pid
        for name, component in sorted(mesh.supervisor.components.items())
        if component.pid is not None
    }
    for ref, state in sorted(mesh.agents.items()):
        pid = AgentEnvoy(state).pid
        if pid is not None:
            found[f"{ref.split('/')[1]}-envoy"] = pid
    return found


def start_mesh(options: MeshOptions, attempts: int = 3) -> tuple[DemoMesh, Any]:
    """Start the demo mesh; again (fresh ports) if a port it picked was taken meanwhile by
    another process on this shared machine (the demo's ports are chosen before they are bound)."""
    for attempt in range(1, attempts + 1):
        print(f"starting the demo mesh in {options.state_dir} ...", flush=True)
        mesh = DemoMesh(options, quiet=True)
        started = time.monotonic()
        try:
            state = mesh.start()
        except ComponentFailed as exc:
            mesh.stop()
            if attempt == attempts:
                raise
            print(f"  start failed ({str(exc).splitlines()[-1]}); retrying", flush=True)
            continue
        print(f"mesh up in {time.monotonic() - started:.1f}s", flush=True)
        return mesh, state
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of traffic after warm-up (default 600: ten minutes)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=200.0,
                        help="requests/s in total (default 200)")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds of traffic before the RSS baseline, at least one full "
                             "cycle through every variant (default 30)")  # fmt: skip
    parser.add_argument("--distinct", type=int, default=1000,
                        help="distinct variants of each call (ids, end users; default 1000)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--sample-every", type=float, default=30.0,
                        help="print RSS every N seconds (default 30)")  # fmt: skip
    args = parser.parse_args()

    from meshward.demo.traces import SpanFile

    state_dir = Path(tempfile.mkdtemp(prefix="meshward-soak-"))
    sink = SpanFile(Path(os.devnull)).start()  # Envoy's and ext_authz's spans, counted, dropped
    options = MeshOptions(
        state_dir=state_dir,
        examples=find_examples(),
        otlp_endpoint=sink.endpoint,
        log_allows=False,  # decision log: denials only, as in production
        tune_tracing=False,  # Envoy's default span batching, as in production
    )
    mesh, state = start_mesh(options)
    try:
        pids = processes(mesh)
        rss_start = {name: rss_kib(pid) for name, pid in pids.items()}
        flows = build_flows(state, args.distinct, int(args.warmup + args.duration + 1200))
        # The baseline is taken once every distinct request has been sent (caches at their
        # working-set size): growth after that is what a leak or an unbounded cache looks like.
        args.warmup = max(args.warmup, 1.1 * len(flows) / args.rate)
        tally = Tally({c.who + " " + c.request for c in tour_calls() if c.decider == EXTAUTHZ})
        kinds = len(tour_calls())
        print(
            f"{kinds} kinds of call x {args.distinct} variants, {args.rate:.0f} req/s, "
            f"warm-up {args.warmup:.0f}s, then {args.duration:.0f}s",
            flush=True,
        )
        traffic = SteadyTraffic(
            flows, rate=args.rate, workers=args.workers, keepalive=True, record=tally.record
        ).start()
        try:
            time.sleep(args.warmup)
            rss_warm = {name: rss_kib(pid) for name, pid in pids.items()}
            counted_from = tally.count
            measure_start = time.monotonic()
            next_sample = measure_start + args.sample_every
            while (now := time.monotonic()) < measure_start + args.duration:
                time.sleep(min(1.0, measure_start + args.duration - now))
                mesh.supervisor.check_alive()
                if time.monotonic() >= next_sample:
                    next_sample += args.sample_every
                    total = sum(rss_kib(pid) for pid in pids.values()) // 1024
                    print(
                        f"  t={time.monotonic() - measure_start:5.0f}s  requests {tally.count}  "
                        f"failed-allowed {tally.failed_allowed}  wrongly-allowed "
                        f"{tally.wrongly_allowed}  RSS total {total} MiB",
                        flush=True,
                    )
            measured = time.monotonic() - measure_start
            measured_requests = tally.count - counted_from
        finally:
            traffic.stop()
        rss_end = {name: rss_kib(pid) for name, pid in pids.items()}
        flows_ok = report_flows(state.xds_admin, state_dir / "flows.db")
        ok = report(args, tally, measured, measured_requests, traffic, sink, pids,
                    rss_start, rss_warm, rss_end)  # fmt: skip
        return ok if flows_ok else 1
    finally:
        mesh.stop()
        sink.stop()


def report_flows(admin: str, db: Path) -> bool:
    """The flow collector's counters from the control plane's /status, and the store's size."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{admin}/status", timeout=10) as response:
        flows = json.loads(response.read()).get("flows") or {}
    size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
    dropped = {k: v for k, v in (flows.get("dropped") or {}).items() if v}
    print(f"flows: {flows.get('entries', 0)} access-log entries collected over "
          f"{flows.get('streams', 0)} streams; refused {flows.get('refused') or {}}; "
          f"dropped {dropped}; store {flows.get('store') or {}}; flows.db {size / 2**20:.1f} MiB")  # fmt: skip
    ok = bool(flows.get("entries")) and not dropped
    if not ok:
        print("flow collection: FAIL (nothing collected, or entries dropped)")
    return ok


def report(
    args: argparse.Namespace,
    tally: Tally,
    measured: float,
    measured_requests: int,
    traffic: SteadyTraffic,
    sink: Any,
    pids: dict[str, int],
    rss_start: dict[str, int],
    rss_warm: dict[str, int],
    rss_end: dict[str, int],
) -> int:
    ok = True
    print()
    print(f"rate: {measured_requests / measured:.1f} req/s achieved of {args.rate:.0f} requested "
          f"over {measured:.0f}s ({tally.count} requests in total incl. warm-up; "
          f"{traffic.stale_retries} kept-alive connections closed by a sidecar and retried)")  # fmt: skip
    print("latency (ms):        count     p50     p99")
    for kind, values in tally.latency.items():
        print(f"  {kind:16} {len(values):8d} {percentile(values, 0.5) * 1000:7.2f} "
              f"{percentile(values, 0.99) * 1000:7.2f}")  # fmt: skip
    print("outcomes by call:")
    names = sorted({name for name, _ in tally.by_flow})
    for name in names:
        statuses = {s: n for (f, s), n in tally.by_flow.items() if f == name}
        print(f"  {name:58} " + "  ".join(f"{s}x{n}" for s, n in sorted(statuses.items())))
    denials = sum(n for (_, s), n in tally.by_flow.items() if s in (401, 403))
    print(f"errors on allowed flows: {tally.failed_allowed} (must be 0)")
    print(f"denied flows allowed:    {tally.wrongly_allowed} (must be 0)")
    print(f"denials: {denials}, of which not a policy denial: {tally.non_policy_denials} "
          "(must be 0)")  # fmt: skip
    print(f"spans exported to the collector: {sink.spans}")
    for sample in tally.samples:
        print(f"  ! {sample}")
    ok = ok and tally.failed_allowed == 0 and tally.wrongly_allowed == 0
    ok = ok and tally.non_policy_denials == 0
    print("RSS (MiB):                 start  warmed     end  growth after warm-up")
    for name in pids:
        start, warm, end = rss_start[name], rss_warm[name], rss_end[name]
        growth = end - warm
        flat = growth <= max(RSS_GROWTH_LIMIT * warm, RSS_SLACK_KIB)
        ok = ok and flat
        print(f"  {name:22} {start / 1024:7.1f} {warm / 1024:7.1f} {end / 1024:7.1f} "
              f"{growth / 1024:+8.1f} ({growth / max(warm, 1):+.1%}){'' if flat else '  NOT FLAT'}")  # fmt: skip
    totals = [sum(d.values()) / 1024 for d in (rss_start, rss_warm, rss_end)]
    print(f"  {'total':22} {totals[0]:7.1f} {totals[1]:7.1f} {totals[2]:7.1f}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
