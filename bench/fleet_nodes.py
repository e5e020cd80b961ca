"""The simulated nodes of bench/xds_fleet.py: one process, many ADS streams, each an agent-run Envoy.

Started by xds_fleet.py through the test launcher (meshward.testing.processes.Launcher) and
driven over one TCP connection on 127.0.0.1 (JSON lines; its port in the ready file). Each node
behaves as an Envoy under `meshward agent` does on the wire: its ADS stream over mTLS with the
SVID its agent holds (pre-issued per service, replicas sharing it), CDS and LDS as wildcards,
then the EDS and RDS names the clusters and listeners reference, and no SDS from the control
plane (an agent-run Envoy gets its secrets from the agent's Unix socket); every response is
decoded (each resource unpacked to its type) before it is ACKed.

A fleet's nodes can be shared out over several such processes (``SHARD/COUNT``: this one runs
every COUNT-th node of work/nodes.json from the SHARD-th), so that the simulation's Python is not
held to one core while the control plane has the other; commands that name nodes act on this
process's own.

    python bench/fleet_nodes.py WORK ADS_PORT SERVER_IDENTITY READY_FILE [sotw|delta] [SHARD/COUNT]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

PROBE_NAME = "meshward-probe-route"
#: The probe's answers kept with their times (wall clock sent, seconds waited): ~50 a second
#: during a mesh-wide edit, so this covers minutes of one.
MAX_PROBE_WAITS = 20_000


def worker_main(
    work: Path, port: int, identity: str, ready_file: Path, delta: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> None:  # fmt: skip
    from google.protobuf import descriptor_pool, message_factory

    import meshward.compile.protos  # noqa: F401  (registers every type inside the resources)
    from meshward.certs.client_tls import client_ssl_context
    from meshward.testing.ads_client import AdsClient
    from meshward.xds import typeurls

    creds = work / "creds"
    roots = (creds / "ca.pem").read_bytes()
    nodes: list[str] = json.loads((work / "nodes.json").read_text())[shard[0] :: shard[1]]
    mine = set(nodes)
    contexts: dict[tuple[str, str], Any] = {}
    clients: list[AdsClient] = []
    tasks: list[asyncio.Task[None]] = []
    route_count: dict[str, int] = {}
    last_route: dict[str, float] = {}
    any_count: dict[str, int] = {}
    delivered = [0]
    marked: dict[str, Any] = {"routes": {}, "any": {}, "delivered": 0}
    probe: dict[str, Any] = {
        "on": False,
        "sent": 0.0,
        "max": 0.0,
        "answers": 0,
        "toggle": False,
        "sent_wall": 0.0,
        "name": PROBE_NAME,
        "waits": [],
    }
    # What an agent-run Envoy must hold before it serves (no SDS over ADS: the agent's socket).
    required = (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE)

    def decode(type_url: str, response: Any) -> str | None:
        """Decode every resource before ACKing, as Envoy does."""
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_url.split("/", 1)[1])
        cls = message_factory.GetMessageClass(descriptor)
        for item in response.resources:
            packed = item.resource if delta else item  # delta: a Resource wrapping the Any
            if not packed.Unpack(cls()):
                return f"cannot decode a {type_url}"
        return None

    # Kept up to date on each response, so the waits below poll a count, not every node: an
    # O(nodes) scan every few ms was a fifth of this process's CPU at 5,000 nodes.
    unconfigured: set[str] = set()
    waiting: set[str] = set()

    def on_response(client: AdsClient, type_url: str, response: Any) -> None:
        node = client.node_id
        any_count[node] = any_count.get(node, 0) + 1
        if node in unconfigured and configured(client):
            unconfigured.discard(node)
        delivered[0] += len(response.resources)
        if type_url == typeurls.ROUTE:
            route_count[node] = route_count.get(node, 0) + 1
            last_route[node] = time.time()
            waiting.discard(node)
        if type_url == typeurls.CLUSTER:  # follow EDS like Envoy: the clusters' service names
            names = sorted(
                n
                for name, packed in client.view(typeurls.CLUSTER).resources.items()
                if (n := eds_name(node, name, packed)) is not None
            )
            if tuple(names) != client.subscriptions.get(typeurls.ENDPOINT, ()):
                client.subscribe(typeurls.ENDPOINT, names)
        if (
            node.endswith("/probe")
            and type_url == typeurls.ROUTE
            and probe["sent"]
            and (not delta or probe["name"] in response.removed_resources)
        ):
            waited = time.monotonic() - probe["sent"]
            probe["max"] = max(probe["max"], waited)
            probe["answers"] += 1
            if len(probe["waits"]) < MAX_PROBE_WAITS:
                probe["waits"].append((probe["sent_wall"], waited))
            probe["sent"] = 0.0

    # (node, cluster) -> (the packed bytes, its EDS name): a cluster is decoded once per
    # content, as Envoy skips a resource whose content it already holds, not on every response.
    eds_names: dict[tuple[str, str], tuple[bytes, str | None]] = {}

    def eds_name(node: str, name: str, packed: Any) -> str | None:
        from envoy.config.cluster.v3 import cluster_pb2

        known = eds_names.get((node, name))
        if known is not None and known[0] == packed.value:
            return known[1]
        cluster = cluster_pb2.Cluster()
        packed.Unpack(cluster)
        found = (
            cluster.eds_cluster_config.service_name or cluster.name
            if cluster.HasField("eds_cluster_config")
            else None
        )
        eds_names[node, name] = (packed.value, found)
        return found

    def context(node: str) -> Any:
        ns, name = node.split("/")[:2]
        if (ns, name) not in contexts:
            d = creds / ns / name
            contexts[ns, name] = client_ssl_context(
                (d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes(), roots
            )
        return contexts[ns, name]

    def new_client(node: str) -> AdsClient:
        return AdsClient(
            "127.0.0.1", port, node, context(node), server_identity=identity, delta=delta,
            subscriptions={typeurls.CLUSTER: (), typeurls.LISTENER: ()},
            nack=decode, on_response=on_response, follow_routes=True,
        )  # fmt: skip

    def configured(c: AdsClient) -> bool:
        return all(c.view(t).responses for t in required) and (
            not c.subscriptions.get(typeurls.ENDPOINT) or bool(c.view(typeurls.ENDPOINT).responses)
        )

    failures: dict[str, int] = {}
    burst_start = [0.0]
    when: list[tuple[float, float, int]] = []

    async def again(client: AdsClient) -> None:
        """Reconnect after a failure, as Envoy does (its ADS backoff starts at 500 ms)."""
        while True:
            began = time.monotonic()
            await client.run()
            if client.error is None:
                return
            kind = f"{type(client.error).__name__}: {str(client.error)[:100]}"
            failures[kind] = failures.get(kind, 0) + 1
            # When (since the burst began), after how long a stream, and with what received.
            got = sum(1 for t in typeurls.ORDER if client.view(t).responses)
            when.append((round(began - burst_start[0], 1), round(time.monotonic() - began, 1), got))
            await asyncio.sleep(0.5)

    async def listening() -> float:
        """Wait until the ADS port takes connections (the server may still be starting: a
        restarted control plane's fleet is already there, and connects the moment it can)."""
        deadline = time.monotonic() + 900
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the ADS port never opened") from None
                await asyncio.sleep(0.01)
                continue
            writer.close()
            return time.time()

    async def connect(retry: bool = False, wait: bool = False) -> dict[str, Any]:
        listening_wall = await listening() if wait else time.time()
        burst_start[0] = time.monotonic()
        unconfigured.update(nodes)
        for node in nodes:
            client = new_client(node)
            clients.append(client)
            tasks.append(asyncio.create_task(again(client) if retry else client.run()))
            await asyncio.sleep(0)  # a burst, as a fleet reconnecting to a restarted server
        start = time.monotonic()
        polls = 0
        while unconfigured:
            polls += 1
            failed = [c for c in clients if c.error is not None] if polls % 10 == 0 else []
            if failed and not retry:
                raise RuntimeError(f"{len(failed)} clients failed: {failed[0].error!r}")
            if time.monotonic() - start > 900:
                raise TimeoutError("clients did not all get their config")
            await asyncio.sleep(0.02)
        return {
            "all_configured_wall": time.time(),
            "listening_wall": listening_wall,
            "resources": delivered[0],
            "failures": failures,
            "failure_times": sorted(when)[:: max(1, len(when) // 40)],
        }

    async def wait(targets: list[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        waiting.clear()
        waiting.update(n for n in targets if route_count.get(n, 0) <= marked["routes"].get(n, 0))
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(targets) - len(waiting)} of {len(targets)} nodes updated"
                )
            await asyncio.sleep(0.005)
        return {
            "last_wall": max((last_route[n] for n in targets), default=0.0),
            "resources": delivered[0] - marked["delivered"],
        }

    async def prober(client: AdsClient) -> None:
        """SotW: the route subscription with and without a name that does not exist, in turn
        (every SotW request is answered). Delta: a new such name each time, the previous one
        unsubscribed (delta answers a subscribed name that does not exist in
        removed_resources, and an unsubscribe not at all)."""
        serial = 0
        while probe["on"]:
            if not probe["sent"]:
                probe["toggle"] = not probe["toggle"]
                names = [
                    n
                    for n in client.subscriptions.get(typeurls.ROUTE, ())
                    if not n.startswith(PROBE_NAME)
                ]
                serial += 1
                probe["name"] = f"{PROBE_NAME}-{serial}" if delta else PROBE_NAME
                if delta or probe["toggle"]:
                    names.append(probe["name"])
                probe["sent"], probe["sent_wall"] = time.monotonic(), time.time()
                client.subscribe(typeurls.ROUTE, names)
            else:
                waited = time.monotonic() - probe["sent"]
                probe["max"] = max(probe["max"], waited)
                if delta and probe["name"] not in client.subscriptions.get(typeurls.ROUTE, ()):
                    # The client re-subscribed its routes for a new listener and dropped the
                    # name: no answer will come. The wait so far is kept (a lower bound on it),
                    # and the next probe starts now.
                    if len(probe["waits"]) < MAX_PROBE_WAITS:
                        probe["waits"].append((probe["sent_wall"], waited))
                    probe["sent"] = 0.0
                    continue
            await asyncio.sleep(0.01)

    async def command(line: str, state: dict[str, Any]) -> dict[str, Any]:
        name, _, rest = line.partition(" ")
        if name == "connect":  # [retry] [listening]: wait for the port to open first
            options = rest.split()
            return await connect(retry="retry" in options, wait="listening" in options)
        if name == "mark":
            marked.update(routes=dict(route_count), any=dict(any_count), delivered=delivered[0])
            return {"marked": True}
        if name == "wait":  # the targets this process runs
            targets_json, _, timeout = rest.rpartition(" ")
            targets = [n for n in json.loads(targets_json) if n in mine]
            return await wait(targets, float(timeout))
        if name == "touched":
            return {"nodes": sum(1 for n, c in any_count.items() if c > marked["any"].get(n, 0))}
        if name == "probe" and rest == "on":
            first = nodes[0].split("/")
            client = new_client(f"{first[0]}/{first[1]}/probe")
            tasks.append(asyncio.create_task(client.run()))
            start = time.monotonic()
            while not configured(client):
                if time.monotonic() - start > 120:
                    raise TimeoutError("the probe got no config")
                await asyncio.sleep(0.01)
            probe.update(on=True, max=0.0, answers=0, sent=0.0, waits=[])
            state["probe"] = asyncio.create_task(prober(client))
            return {"probing": True}
        if name == "probe" and rest == "off":
            probe["on"] = False
            if state.get("probe") is not None:
                await state["probe"]
            waits = list(probe["waits"])
            if probe["sent"]:  # still unanswered: it waited until now
                waits.append((probe["sent_wall"], time.monotonic() - probe["sent"]))
            return {"max_stall": probe["max"], "answers": probe["answers"], "waits": waits}
        return {"error": f"unknown command {line}"}

    async def serve() -> None:
        # Every SVID loaded before the ready file, as the Node.js nodes do: the agent holds it
        # before its Envoy connects, so loading it is no part of a cold start (~5 s of this
        # process's CPU at 5,005 nodes when it was done in the burst).
        for node in nodes:
            context(node)
        done = asyncio.Event()

        async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state: dict[str, Any] = {}
            while True:
                line = (await reader.readline()).decode().strip()
                if not line or line == "quit":
                    writer.write(b'{"bye": true}\n')
                    await writer.drain()
                    break
                try:
                    answer = await command(line, state)
                except Exception as exc:
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
            writer.close()
            done.set()

        # "wait" lists every node id (5,000: ~100 KB on one line)
        server = await asyncio.start_server(control, "127.0.0.1", 0, limit=1 << 24)
        control_port = server.sockets[0].getsockname()[1]
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"control": control_port}))
        tmp.replace(ready_file)
        await done.wait()
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(serve())


def _shard(text: str) -> tuple[int, int] | None:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        return None
    return int(index), int(count)


if __name__ == "__main__":
    mode = sys.argv[5] if len(sys.argv) > 5 else "sotw"
    shard = _shard(sys.argv[6]) if len(sys.argv) > 6 else (0, 1)
    if not 5 <= len(sys.argv) <= 7 or mode not in ("sotw", "delta") or shard is None:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    worker_main(
        Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]),
        delta=mode == "delta", shard=shard,
    )  # fmt: skip
