"""The simulated nodes' processes of bench/xds_fleet.py (bench/fleet_nodes.py), driven over
local TCP connections with JSON lines.

One Python process decodes, ACKs and handshakes at ~6 ms of CPU per node: at 5,005 nodes a
single process is busy ~30 s of a cold start, its one core the floor of the figure while the
control plane's other core idles. :class:`NodeFleet` shares the nodes out over several
processes and answers each command as one process would (merged answers), so what a cold start
measures is the machine's two cores, not one process of the simulation.

Either implementation of the nodes runs behind the same protocol: ``python`` (bench/fleet_nodes.py)
or ``node`` (bench/fleet_js/fleet_nodes.js and ads_client.js: the same nodes on the wire, with OpenSSL and nghttp2
under Node.js instead of Python's `ssl` and grpclib), whose message types
come from a FileDescriptorSet exported here from the Python side's descriptor pool
(:func:`write_descriptors`), so no .proto file is kept twice.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from meshward.testing.bench_server import process_cpu
from meshward.testing.processes import Launcher

NODES_SCRIPT = Path(__file__).with_name("fleet_nodes.py")
JS_DIR = Path(__file__).with_name("fleet_js")
JS_NODES_SCRIPT = JS_DIR / "fleet_nodes.js"
IMPLS = ("python", "node")
#: What a node decodes or encodes: the ADS messages, every resource type a response carries
#: (SDS's too: a node that subscribed to it by mistake still decodes it), and the HTTP
#: connection manager inside listeners (its RDS names). Their files' dependencies come along.
DESCRIPTOR_TYPES = (
    "envoy.service.discovery.v3.DiscoveryRequest",
    "envoy.service.discovery.v3.DeltaDiscoveryResponse",
    "envoy.config.cluster.v3.Cluster",
    "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "envoy.config.listener.v3.Listener",
    "envoy.config.route.v3.RouteConfiguration",
    "envoy.extensions.transport_sockets.tls.v3.Secret",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
)


def write_descriptors(path: Path) -> None:
    """The FileDescriptorSet the Node.js nodes load (WORK/descriptors.pb): the files defining
    :data:`DESCRIPTOR_TYPES` and everything they import, dependencies first, from the same
    descriptor pool (the installed envoy pb2 modules) the control plane encodes with."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    import meshward.compile.protos  # noqa: F401  (registers every type inside the resources)

    pool = descriptor_pool.Default()
    found = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: Any) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        found.file.add().ParseFromString(file.serialized_pb)

    for name in DESCRIPTOR_TYPES:
        add(pool.FindMessageTypeByName(name).file)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(found.SerializeToString())
    tmp.replace(path)


def nodes_argv(impl: str, work: Path) -> list[str]:
    """The command line's start for ``impl``'s nodes; for ``node``, its descriptors written
    into ``work`` first (once) and its npm dependencies checked."""
    if impl == "python":
        return [sys.executable, str(NODES_SCRIPT)]
    if impl != "node":
        raise ValueError(f"nodes implementation: one of {IMPLS}, not {impl!r}")
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("--nodes-impl node: no `node` on PATH (Node.js 20 or later)")
    if not (JS_DIR / "node_modules" / "protobufjs").is_dir():
        raise RuntimeError(f"--nodes-impl node: run `make fleet-js` (npm ci in {JS_DIR}) first")
    if not (work / "descriptors.pb").exists():
        write_descriptors(work / "descriptors.pb")
    return [node, str(JS_NODES_SCRIPT)]


class Worker:
    """One simulated nodes' process (bench/fleet_nodes.py, or bench/fleet_js/fleet_nodes.js)."""

    def __init__(
        self, work: Path, launcher: Launcher, name: str, server: Any, ads: str = "sotw",
        shard: tuple[int, int] = (0, 1), impl: str = "python",
    ) -> None:  # fmt: skip
        """``server``: its ``ads_port`` and ``identity`` (a Server, or a Target);
        ``ads``: the nodes' ADS variant, "sotw" or "delta"; ``shard``: (index, count) of the
        nodes in work/nodes.json this process runs; ``impl``: "python" or "node"."""
        ready = work / f"{name}.ready.json"
        argv = [*nodes_argv(impl, work), str(work), str(server.ads_port),
                server.identity, str(ready), ads, f"{shard[0]}/{shard[1]}"]  # fmt: skip
        info = launcher.start(name, argv, ready_path=ready, timeout=120)
        self.name = name
        self.ads = ads
        self.impl = impl
        pid = launcher[name].pid
        assert pid is not None
        self.pid = pid
        self.sock = socket.create_connection(("127.0.0.1", int(info["control"])))
        self.file = self.sock.makefile("rw", encoding="utf-8")

    def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        return self.answer(command)

    def send(self, command: str) -> None:
        self.file.write(command + "\n")
        self.file.flush()

    def answer(self, command: str = "") -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise RuntimeError(f"{self.name} died on {command[:80]!r}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}")
        return answer

    def cpu_seconds(self) -> float:
        return process_cpu(self.pid)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit")
        self.sock.close()


class NodeFleet:
    """Every simulated node, over ``processes`` worker processes: the same commands as one
    :class:`Worker`, sent to each process at once and their answers merged."""

    def __init__(
        self, work: Path, launcher: Launcher, server: Any, ads: str, processes: int,
        name: str = "nodes", impl: str = "python",
    ) -> None:  # fmt: skip
        self.ads = ads
        self.impl = impl
        self.workers: list[Worker] = []
        try:
            for i in range(processes):
                self.workers.append(Worker(work, launcher, f"{name}{i}", server, ads,
                                           (i, processes), impl))  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        return self.answer(command)

    def send(self, command: str) -> None:
        for worker in self.workers:
            worker.send(command)

    def answer(self, command: str = "") -> dict[str, Any]:
        return merge_answers([worker.answer(command) for worker in self.workers])

    def cpu_seconds(self) -> float:
        """The CPU every process of the simulation has used."""
        return sum(worker.cpu_seconds() for worker in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def merge_answers(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer as a single process would give it: the first moment for ``listening_wall``,
    the last for every other ``*_wall``; counts summed; per-kind counts summed by kind; lists
    joined in order."""
    merged: dict[str, Any] = {}
    for answer in answers:
        for key, value in answer.items():
            if key not in merged:
                merged[key] = value
            elif key == "listening_wall":
                merged[key] = min(merged[key], value)
            elif key.endswith("_wall"):
                merged[key] = max(merged[key], value)
            elif isinstance(value, bool):
                merged[key] = merged[key] and value
            elif isinstance(value, (int, float)):
                merged[key] += value
            elif isinstance(value, dict):
                merged[key] = {k: merged[key].get(k, 0) + value.get(k, 0)
                               for k in {*merged[key], *value}}  # fmt: skip
            elif isinstance(value, list):
                merged[key] = sorted([*merged[key], *value])
    return merged
