"""Per-node status and drift, as plain data (the admin endpoint serves it as JSON).

Drift: a type the node subscribed to whose ACKed version differs from the desired version for
longer than the threshold, measured from the later of "the content changed" and "the stream
asked for it". A fresh change that is still being pushed is *pending*, not drift; a NACKed
change (the node kept its last good version) is drift once the threshold passes, which is what
an operator needs to see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from meshward.xds import typeurls
from meshward.xds.protocol import Nack, TypeState
from meshward.xds.snapshot import Snapshot

DEFAULT_DRIFT_THRESHOLD = 10.0  # seconds


@dataclass(frozen=True)
class TypeStatus:
    type_url: str
    desired: str
    sent: str
    acked: str
    in_sync: bool
    out_of_sync_for: float  # seconds; 0 when in sync
    drift: bool
    pushes: int
    nacks: int
    rejected: tuple[str, ...]
    last_nack: Nack | None
    acked_at: float = 0.0  # monotonic time of the last ACK (0: none yet)

    def as_dict(self, wall_offset: float) -> dict[str, Any]:
        return {
            "type": typeurls.short(self.type_url),
            "desired": self.desired,
            "sent": self.sent,
            "acked": self.acked,
            "in_sync": self.in_sync,
            "out_of_sync_seconds": round(self.out_of_sync_for, 3),
            "drift": self.drift,
            "pushes": self.pushes,
            "nacks": self.nacks,
            "rejected": list(self.rejected),
            "last_nack": nack_dict(self.last_nack, wall_offset),
            "acked_at": iso(self.acked_at + wall_offset) if self.acked_at else None,
        }


def nack_dict(nack: Nack | None, wall_offset: float) -> dict[str, Any] | None:
    if nack is None:
        return None
    return {
        "version": nack.version,
        "resources": list(nack.resources),
        "whole_response": nack.whole_response,
        "error": nack.error,
        "at": iso(nack.at + wall_offset),
    }


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def type_status(
    st: TypeState, snapshot: Snapshot | None, now: float, threshold: float
) -> TypeStatus:
    desired = snapshot.type_version(st.type_url) if snapshot else ""
    in_sync = st.acked_version == desired
    since = max(snapshot.changed_at(st.type_url) if snapshot else 0.0, st.requested_at)
    behind = 0.0 if in_sync else max(0.0, now - since)
    return TypeStatus(
        type_url=st.type_url,
        desired=desired,
        sent=st.sent_version,
        acked=st.acked_version,
        in_sync=in_sync,
        out_of_sync_for=behind,
        drift=not in_sync and behind > threshold,
        pushes=st.pushes,
        nacks=st.nacks,
        rejected=tuple(sorted(st.rejected)),
        last_nack=st.last_nack,
        acked_at=st.acked_at,
    )


def stream_types(
    states: Mapping[str, TypeState], snapshot: Snapshot | None, now: float, threshold: float
) -> list[TypeStatus]:
    ordered = [*typeurls.ORDER, *sorted(t for t in states if t not in typeurls.ORDER)]
    return [
        type_status(states[t], snapshot, now, threshold)
        for t in ordered
        if t in states and states[t].requested
    ]


def drifting(statuses: Iterable[TypeStatus]) -> bool:
    return any(s.drift for s in statuses)


def stream_flags(
    states: Mapping[str, TypeState], snapshot: Snapshot | None, now: float, threshold: float
) -> tuple[bool, bool, bool]:
    """(in sync, drifting, not enforcing) for one stream: what :func:`stream_types`,
    :func:`drifting` and meshward.xds.enforcement.not_enforced say, without building the
    per-type documents (the summary reads every stream of the fleet)."""
    in_sync, drift, rejected = True, False, False
    for type_url, st in states.items():
        if not st.requested:
            continue
        desired = snapshot.type_version(type_url) if snapshot else ""
        if st.acked_version == desired:
            continue
        in_sync = False
        since = max(snapshot.changed_at(type_url) if snapshot else 0.0, st.requested_at)
        drift = drift or max(0.0, now - since) > threshold
        rejected = rejected or (type_url != typeurls.SECRET and bool(st.rejected))
    return in_sync, drift, rejected


# ---- the fleet at a glance (``GET /status``'s default view) ---------------------------------

ATTENTION_LIMIT = 20  # nodes listed by name in the summary; the rest are counted


@dataclass
class FleetCounts:
    """Counts over every node, built in one pass from per-stream flags: the recomputation the
    server's event-kept counts (meshward.xds.fleetcounts.FleetTable, what `/status` serves) are
    property-tested against. O(nodes) per read, so not served."""

    nodes: int = 0
    connected: int = 0
    in_sync: int = 0
    pending: int = 0  # out of sync, within the drift threshold
    drifting: int = 0
    not_enforced: int = 0
    streams_sotw: int = 0
    streams_delta: int = 0
    attention: list[dict[str, Any]] | None = None
    attention_total: int = 0
    # Per node, whether it drifts (the metrics' per-node gauge); None: not collected.
    drift: dict[str, bool] | None = None

    def add(
        self,
        node: str,
        streams: Iterable[tuple[str, tuple[bool, bool, bool]]],
        *,
        compile_failed: bool = False,
    ) -> None:
        """One node: its streams as (mode, :func:`stream_flags`); ``compile_failed``: its
        workload did not compile, so a connected node runs its last good config, not the
        policy set in force (not enforced, as the per-node view says)."""
        self.nodes += 1
        modes = list(streams)
        if self.drift is not None:
            self.drift[node] = any(flags[1] for _, flags in modes)
        if not modes:
            return
        self.connected += 1
        reasons: list[str] = ["not enforced"] if compile_failed else []
        synced = True
        for mode, (in_sync, drift, rejected) in modes:
            if mode == "delta":
                self.streams_delta += 1
            else:
                self.streams_sotw += 1
            synced = synced and in_sync
            if drift and "drift" not in reasons:
                reasons.append("drift")
            if rejected and "not enforced" not in reasons:
                reasons.append("not enforced")
        if synced:
            self.in_sync += 1
        elif "drift" in reasons:
            self.drifting += 1
        else:
            self.pending += 1
        if "not enforced" in reasons:
            self.not_enforced += 1
        if reasons:
            self.attention_total += 1
            listed = self.attention if self.attention is not None else []
            if len(listed) < ATTENTION_LIMIT:
                listed.append({"node": node, "problems": reasons})
            self.attention = listed

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.nodes,
            "connected": self.connected,
            "disconnected": self.nodes - self.connected,
            "in_sync": self.in_sync,
            "pending": self.pending,
            "drifting": self.drifting,
            "not_enforced": self.not_enforced,
            "streams": {"sotw": self.streams_sotw, "delta": self.streams_delta},
            "attention": self.attention or [],
            "attention_total": self.attention_total,
        }
