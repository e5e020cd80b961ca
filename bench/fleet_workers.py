"""The simulated nodes' processes of bench/xds_fleet.py (bench/fleet_nodes.py), driven over
local TCP connections with JSON lines.

One Python process decodes, ACKs and handshakes at ~6 ms of CPU per node: at 5,005 nodes a
single process is busy ~30 s of a cold start, its one core the floor of the figure while the
control plane's other core idles. :class:`NodeFleet` shares the nodes out over several
processes and answers each command as one process would (merged answers), so what a cold start
measures is the machine's two cores, not one process of the simulation.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

from meshward.testing.bench_server import process_cpu
from meshward.testing.processes import Launcher

NODES_SCRIPT = Path(__file__).with_name("fleet_nodes.py")


class Worker:
    """One simulated nodes' process (bench/fleet_nodes.py)."""

    def __init__(
        self, work: Path, launcher: Launcher, name: str, server: Any, ads: str = "sotw",
        shard: tuple[int, int] = (0, 1),
    ) -> None:  # fmt: skip
        """``server``: its ``ads_port`` and ``identity`` (a Server, or a Target);
        ``ads``: the nodes' ADS variant, "sotw" or "delta"; ``shard``: (index, count) of the
        nodes in work/nodes.json this process runs."""
        ready = work / f"{name}.ready.json"
        argv = [sys.executable, str(NODES_SCRIPT), str(work), str(server.ads_port),
                server.identity, str(ready), ads, f"{shard[0]}/{shard[1]}"]  # fmt: skip
        info = launcher.start(name, argv, ready_path=ready, timeout=120)
        self.name = name
        self.ads = ads
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
        name: str = "nodes",
    ) -> None:  # fmt: skip
        self.ads = ads
        self.workers: list[Worker] = []
        try:
            for i in range(processes):
                self.workers.append(Worker(work, launcher, f"{name}{i}", server, ads,
                                           (i, processes)))  # fmt: skip
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
