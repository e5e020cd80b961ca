"""meshward.net.free_port: ports outside the kernel's ephemeral range, not handed out twice."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from meshward import net


def test_free_port_stays_in_its_range_and_walks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHWARD_PORT_RANGE", "23000-23040")
    monkeypatch.setattr(net, "_cursor", None)
    ports = [net.free_port() for _ in range(20)]
    assert all(23000 <= p < 23040 for p in ports)
    assert len(set(ports)) == len(ports)  # a port handed out is not handed out again soon


def test_a_bound_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHWARD_PORT_RANGE", "23100-23103")
    monkeypatch.setattr(net, "_cursor", 23100)
    with socket.socket() as held:
        held.bind((net.LOOPBACK, 23100))
        held.listen()
        assert [net.free_port() for _ in range(3)] == [23101, 23102, 23101]


def test_a_full_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHWARD_PORT_RANGE", "23200-23201")
    monkeypatch.setattr(net, "_cursor", None)
    with socket.socket() as held:
        held.bind((net.LOOPBACK, 23200))
        with pytest.raises(OSError, match="no free loopback port in 23200-23201"):
            net.free_port()


@pytest.mark.parametrize("spec", ["", "junk", "30000-20000", "80-90", "20000-70000"])
def test_a_bad_range_falls_back_to_the_default(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv("MESHWARD_PORT_RANGE", spec)
    assert net.port_range() == net.DEFAULT_PORT_RANGE
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert net.DEFAULT_PORT_RANGE[1] <= int(ephemeral[0])
