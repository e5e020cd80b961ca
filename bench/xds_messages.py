"""The ADS server's own per-message CPU, without gRPC: what the event loop spends per node.

bench/xds_fleet.py measures the whole control plane process, where gRPC core (TLS, HTTP/2,
its completion queue), the compile, the policy history and a loaded machine's noise all add up:
a change of a few microseconds per message in the server's own code is invisible there. This
bench drives the real :class:`meshward.xds.server.AdsServer` (its streams' reader task and
queue, the SotW protocol, the fleet counts, metrics, encoding, the write deadline) over
in-process streams: a request iterator and a context whose ``write`` hands the encoded response
to a simulated node in the same loop, which decodes it and ACKs. Nodes come as replicas of
services (5 each, sharing their contents, as in the fleet topology): 10 clusters and 5
listeners per service, CDS and LDS as wildcards (agent mode: no SDS from the server).

Phases, timed as the process's CPU (``time.process_time``; the simulated nodes' decoding and
ACKs are in it, the same work for every variant): cold (every stream opened, answered and
ACKed), then ``--changes`` mesh-wide changes (every node's listeners change: one LDS push and
its ACK per node; the snapshots are built before the clock starts). Reports microseconds per
node. ``--baseline DIR`` also runs the ``meshward`` package found in DIR (e.g. a
``git archive`` of the base commit), interleaved with this checkout, and prints the ratios.

    python bench/xds_messages.py [--nodes 2000] [--changes 6] [--rounds 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Appended, not inserted: a child run for --baseline must find that tree's meshward first.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.inprocess_ads import InProcessCall, SnapshotSource
from bench.tree_ab import add_arguments, run_variants

REPLICAS = 5
CLUSTERS = 10
LISTENERS = 5


def resources(service: int, generation: int) -> dict[str, list[Any]]:
    from meshward.testing.xds_resources import cluster, listener
    from meshward.xds import typeurls

    clusters = [cluster(f"s{service}-c{i}", 8000 + i) for i in range(CLUSTERS)]
    listeners = [
        listener(
            f"s{service}-l{i}",
            f"s{service}-c{i}",
            port=15000 + i,
            secrets=False,
            tag=f"-g{generation}",
        )
        for i in range(LISTENERS)
    ]
    return {typeurls.CLUSTER: clusters, typeurls.LISTENER: listeners}


class Node(InProcessCall):
    """One simulated node: its request stream, and a context whose write decodes and ACKs."""

    def __init__(self, name: str, waiting: Waiting) -> None:
        super().__init__(name)
        self.waiting = waiting

    def request(self, type_url: str, version: str = "", nonce: str = "") -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        message = discovery_pb2.DiscoveryRequest(
            type_url=type_url, version_info=version, response_nonce=nonce
        )
        if not nonce:
            message.node.id = self.name
        self.requests.put_nowait(message)

    async def write(self, data: bytes) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        response = discovery_pb2.DiscoveryResponse.FromString(data)
        self.request(response.type_url, response.version_info, response.nonce)
        self.waiting.received(self.name, response.type_url, response.version_info)


class Waiting:
    """The nodes still to receive the listeners version they should have."""

    def __init__(self) -> None:
        self.versions: dict[str, str] = {}
        self.done = asyncio.Event()

    def expect(self, versions: dict[str, str]) -> None:
        self.versions = dict(versions)
        self.done.clear()

    def received(self, name: str, type_url: str, version: str) -> None:
        from meshward.xds import typeurls

        if type_url == typeurls.LISTENER and self.versions.get(name) == version:
            del self.versions[name]
            if not self.versions:
                self.done.set()


async def run(nodes: int, changes: int) -> dict[str, Any]:
    from meshward.xds import typeurls
    from meshward.xds.limits import NodeLimits
    from meshward.xds.server import AdsServer

    logging_quiet()
    source = SnapshotSource()
    server = AdsServer(source, limits=NodeLimits(max_streams=nodes + 1))
    services = max(1, nodes // REPLICAS)
    names = [f"ns{s % 30}/svc{s}/r{r}" for s in range(services) for r in range(REPLICAS)]

    def install(generation: int) -> dict[str, Any]:
        contents = [resources(s, generation) for s in range(services)]
        return {
            name: source.cache.build(name, contents[i // REPLICAS], time.monotonic())
            for i, name in enumerate(names)
        }

    for name, snapshot in install(0).items():
        source.cache.set(name, snapshot)
    waiting = Waiting()
    sims = {name: Node(name, waiting) for name in names}

    async def synced() -> None:
        """Every node got its listeners, and the server has read every ACK."""
        await asyncio.wait_for(waiting.done.wait(), 600)
        while any(not n.requests.empty() for n in sims.values()) or any(
            not s.queue.empty() for s in server.streams.values()
        ):
            await asyncio.sleep(0.005)

    def desired() -> dict[str, str]:
        result = {}
        for name in names:
            snapshot = source.cache.get(name)
            assert snapshot is not None
            result[name] = snapshot.type_version(typeurls.LISTENER)
        return result

    waiting.expect(desired())
    cpu0 = time.process_time()
    tasks = []
    for node in sims.values():
        node.request(typeurls.CLUSTER)
        node.request(typeurls.LISTENER)
        tasks.append(asyncio.create_task(server.serve("sotw", node.stream(), node)))
    await synced()
    cold = time.process_time() - cpu0
    per_change = []
    for generation in range(1, changes + 1):
        built = install(generation)  # before the clock: the compile's and the cache's work
        waiting.expect(
            {name: snapshot.type_version(typeurls.LISTENER) for name, snapshot in built.items()}
        )
        cpu0 = time.process_time()
        for name, snapshot in built.items():
            source.cache.set(name, snapshot)
        await synced()
        per_change.append(time.process_time() - cpu0)
    for node in sims.values():
        node.requests.put_nowait(None)
    await asyncio.gather(*tasks)
    await server.stop()
    return {
        "nodes": len(names),
        "cold_us_per_node": cold * 1e6 / len(names),
        "change_us_per_node": statistics.median(per_change) * 1e6 / len(names),
        "changes_us_per_node": [round(c * 1e6 / len(names), 1) for c in per_change],
    }


def logging_quiet() -> None:
    import logging

    logging.getLogger("meshward").setLevel(logging.WARNING)  # as `--log-level info` minus lines


def child(nodes: int, changes: int) -> None:
    import gc

    gc.freeze()  # the control plane freezes its heap (meshward.xds.heap); do the same here
    print(json.dumps(asyncio.run(run(nodes, changes))))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Example: git archive BASE meshward | tar -x -C /tmp/base; "
        "python bench/xds_messages.py --baseline /tmp/base",
    )
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=6)
    add_arguments(parser)
    args = parser.parse_args()
    if args.nodes < 1 or args.changes < 1 or args.rounds < 1:
        parser.error("--nodes, --changes and --rounds must be at least 1")
    if args.child:
        child(args.nodes, args.changes)
        return
    child_args = ["--nodes", str(args.nodes), "--changes", str(args.changes)]
    runs = run_variants(parser, args, __file__, child_args, base_name="baseline")
    if args.json:
        return
    print(f"ADS server's own CPU per node (in-process streams, no gRPC), {args.nodes} nodes, "
          f"{args.rounds} round(s), median; load: {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'variant':>9} {'cold us/node':>12} {'change us/node':>14}")
    med = {}
    for name, results in runs.items():
        cold = statistics.median(r["cold_us_per_node"] for r in results)
        change = statistics.median(r["change_us_per_node"] for r in results)
        med[name] = (cold, change)
        print(f"{name:>9} {cold:12.0f} {change:14.0f}")
    if "baseline" in med:
        (c1, m1), (c0, m0) = med["this"], med["baseline"]
        print(f"this / baseline: cold {c1 / c0:.2f}, mesh-wide change {m1 / m0:.2f}")


if __name__ == "__main__":
    main()
