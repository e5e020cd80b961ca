"""How bench/xds_fleet.py prints its results: a table per ADS variant, the edits' timelines,
growth between sizes, and delta's figures as ratios of SotW's (medians over the rounds)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from meshward.xds.timeline import STAGES as TIMELINE


def median_of(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Each numeric figure's median over the rounds."""
    numeric = [k for k, v in rounds[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in rounds) for k in numeric}


def compare_modes(sizes: list[int], med: Mapping[tuple[int, str], Mapping[str, float]]) -> None:
    """Delta's figures as ratios of SotW's, size by size (same run, interleaved)."""
    print("delta vs SotW (ratio of medians, same run; < 1: delta is faster or smaller):")
    for n in sizes:
        d, s = med[n, "delta"], med[n, "sotw"]
        ratios = ", ".join(
            f"{label} {d[key] / s[key]:.2f}x" if s[key] else f"{label} n/a"
            for label, key in (
                ("cold start", "cold"), ("cold start server CPU", "cold_cpu"),
                ("one-policy edit", "one"), ("mesh-wide edit", "mesh"),
                ("server CPU per mesh-wide change", "mesh_cpu"),
                ("resources delivered by it", "mesh_resources"), ("stall", "stall"),
            )
        )  # fmt: skip
        print(f"{n:8d} services: {ratios}")


def report(
    topology: str, replicas: int, rounds: int, sizes: list[int], ads: str,
    results: dict[int, list[dict[str, Any]]], impl: str = "python",
) -> None:  # fmt: skip
    variant = "SotW" if ads == "sotw" else "delta"
    print(f"xDS at fleet scale ({topology}; replicas {replicas}; {rounds} round(s); {variant}; "
          f"simulated nodes in {'Node.js' if impl == 'node' else 'Python'}; "
          "control plane --secrets agent; simulated nodes as agent-run Envoys: no SDS over ADS, "
          "decode before ACK, follow EDS/RDS; edit times = the control plane's last recorded ACK "
          "of the change, from its /status?view=nodes, for simulated nodes and real Envoys alike)")  # fmt: skip
    print(f"{'services':>8} {'nodes':>6} {'cold s':>7} {'1-edit ms':>9} {'Envoy ms':>8} {'mesh s':>7} "
          f"{'Envoy s':>7} {'CPU/change s':>12} {'us/resource':>11} {'+KiB/node':>9} {'stall ms':>8} "
          f"{'/status s':>9} {'nodes s':>7} {'/metrics s':>10}")  # fmt: skip
    med = {n: median_of(rs) for n, rs in results.items()}
    for n in sizes:
        m = med[n]
        print(f"{m['services']:8.0f} {m['nodes']:6.0f} {m['cold']:7.1f} {m['one'] * 1000:9.0f} "
              f"{m['one_envoy'] * 1000:8.0f} {m['mesh']:7.2f} {m['mesh_envoy']:7.2f} "
              f"{m['mesh_cpu']:12.2f} {per_resource(m):11.1f} {(m['rss'] - m['rss0']) * 1024 / m['nodes']:9.0f} "
              f"{m['stall'] * 1000:8.0f} {m['status']:9.2f} {m['status_nodes']:7.2f} {m['metrics']:10.2f}")  # fmt: skip
        print(f"{'':8} one-policy edit: {m['one_nodes']:.0f} affected simulated nodes + "
              f"{m['one_envoys']:.0f} real Envoy(s), {m['one_touched']:.0f} simulated nodes got "
              f"anything, server CPU {m['one_cpu'] * 1000:.0f} ms; client-side (last route "
              f"received) one-policy {m['one_client'] * 1000:.0f} ms, mesh-wide "
              f"{m['mesh_client']:.2f} s (simulated nodes' processes busy "
              f"{m['mesh_nodes_cpu']:.1f} s of it); cold start: listening after {m['cold_listen']:.1f} s, "
              f"first compile done {m['cold_ready']:.1f} s, CPU: server {m['cold_cpu']:.1f} s + "
              f"compile worker {m['cold_cpu_compiler']:.1f} s, nodes' processes "
              f"{m['cold_cpu_nodes']:.1f} s; "
              f"{m['resources_cold']:.0f} resources delivered; RSS {m['rss0']:.0f} MiB compiled (streams held), "
              f"{m['rss']:.0f} MiB with every node connected ({m['rss'] / m['services']:.2f} MiB "
              f"per service), and the compile worker {m.get('rss_worker', math.nan):.0f} MiB "
              f"(the control plane: {m['rss'] + m.get('rss_worker', math.nan):.0f} MiB); "
              f"{m['envoys']:.0f} real Envoys; probe answers {m['probes']:.0f}")  # fmt: skip
        stages = ", ".join(
            f"{stage.replace('_', ' ')} {m['one_' + stage] * 1000:.0f}" for stage in TIMELINE
        )
        print(f"{'':8} one-policy edit timeline, ms after the write (control plane's records): "
              f"{stages}, last ACK {m['one'] * 1000:.0f}")  # fmt: skip
        stages = ", ".join(
            f"{stage.replace('_', ' ')} {m['mesh_' + stage] * 1000:.0f}" for stage in TIMELINE
        )
        print(f"{'':8} mesh-wide edit timeline, ms after the write: "
              f"{stages}, last ACK {m['mesh'] * 1000:.0f}; the probe's longest wait while it "
              f"compiled {m.get('stall_compile', math.nan) * 1000:.0f} ms, while it pushed and "
              f"read the ACKs {m.get('stall_fanout', math.nan) * 1000:.0f} ms")  # fmt: skip
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        print(f"growth {a} -> {b} services ({b / a:.1f}x): cold start {med[b]['cold'] / med[a]['cold']:.1f}x, "
              f"one-policy edit {med[b]['one'] / med[a]['one']:.1f}x, "
              f"mesh-wide edit {med[b]['mesh'] / med[a]['mesh']:.1f}x, server CPU per mesh-wide change "
              f"{med[b]['mesh_cpu'] / max(1e-9, med[a]['mesh_cpu']):.1f}x, per delivered resource "
              f"{per_resource(med[b]) / max(1e-9, per_resource(med[a])):.2f}x, cold start CPU "
              f"{med[b]['cold_cpu'] / max(1e-9, med[a]['cold_cpu']):.1f}x, per resource it "
              f"delivered {cold_per_resource(med[b]) / max(1e-9, cold_per_resource(med[a])):.2f}x "
              f"({cold_per_resource(med[a]):.1f} -> {cold_per_resource(med[b]):.1f} us)")  # fmt: skip


def per_resource(m: Mapping[str, float]) -> float:
    """Server CPU of the mesh-wide change per resource the simulated nodes received (us)."""
    return m["mesh_cpu"] * 1e6 / max(1.0, m["mesh_resources"])


def cold_per_resource(m: Mapping[str, float]) -> float:
    """Server CPU of the cold start per resource the simulated nodes received (us): every
    node's whole config, in SotW and delta alike (a delta mesh-wide change sends only what
    changed, so its per-resource figure above grows with what each node holds)."""
    return m["cold_cpu"] * 1e6 / max(1.0, m["resources_cold"])
