"""The flow store: records aggregated per time bucket into flows, kept in SQL, bounded.

A flow is (bucket, source, destination, port, method, path template, decision, policy#rule,
dry-run verdicts) with a count, first/last seen and sample trace ids. Denials are also kept one
by one (bounded) so ``meshward denials --trace ID`` finds one.

Bounds, each with a flood test (tests/unit/flows/test_store.py):
- memory: at most ``max_pending`` flows wait for the next flush; more are counted as dropped.
- cardinality: per (bucket, source, destination, port) at most ``max_paths`` path templates;
  further paths fold into ``{other}`` (unknown callers already fold into ``unknown``).
- disk: rows older than ``max_age`` go, and at most ``max_rows`` flows and ``max_denials``
  denials are kept (oldest first out), at every flush.

SQLAlchemy Core: one schema and one query code for SQLite (default: one file in the control
plane's state directory) and PostgreSQL (``postgresql://...``, replicas sharing one store).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from meshward.errors import UserError
from meshward.flows.records import DENY, FlowRecord

OTHER_PATH = "{other}"
DEFAULT_BUCKET_SECONDS = 60
RETAIN_EVERY_SECONDS = 30  # retention runs at most this often (and after a big batch)

metadata = sa.MetaData()
flows_table = sa.Table(
    "meshward_flows",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("bucket", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(512), nullable=False),
    sa.Column("destination", sa.String(512), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("method", sa.String(32), nullable=False),
    sa.Column("path", sa.String(256), nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("policy", sa.String(256), nullable=False),
    sa.Column("dry_run", sa.String(256), nullable=False),
    sa.Column("reason", sa.String(256), nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("duration_ms_sum", sa.BigInteger, nullable=False),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("first_trace_id", sa.String(32), nullable=False),
    sa.Column("last_trace_id", sa.String(32), nullable=False),
    sa.UniqueConstraint(
        "bucket", "source", "destination", "port", "method", "path", "decision", "policy",
        "dry_run", name="meshward_flows_key",
    ),
)  # fmt: skip
KEY = ("bucket", "source", "destination", "port", "method", "path", "decision", "policy", "dry_run")
denials_table = sa.Table(
    "meshward_denials",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False, index=True),
    sa.Column("source", sa.String(512), nullable=False),
    sa.Column("source_principal", sa.String(256), nullable=False),
    sa.Column("destination", sa.String(512), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("method", sa.String(32), nullable=False),
    sa.Column("path", sa.String(256), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("reason", sa.String(256), nullable=False),
    sa.Column("policy", sa.String(256), nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
)


@dataclass
class _Agg:
    count: int
    duration_ms_sum: int
    first_seen: float
    last_seen: float
    first_trace_id: str
    last_trace_id: str
    reason: str


@dataclass
class StoreCounters:
    records: int = 0
    dropped_pending: int = 0  # flows not stored: the pending table was full
    folded_paths: int = 0  # records whose path folded into {other}
    dropped_denials: int = 0
    flush_errors: int = 0
    deleted_rows: int = 0


@dataclass
class StoreLimits:
    bucket_seconds: int = DEFAULT_BUCKET_SECONDS
    max_age_seconds: float = 7 * 24 * 3600
    max_rows: int = 200_000
    max_denials: int = 20_000
    max_pending: int = 10_000
    max_paths: int = 200  # path templates per (bucket, source, destination, port)

    def __post_init__(self) -> None:
        for name in ("bucket_seconds", "max_age_seconds", "max_rows", "max_denials",
                     "max_pending", "max_paths"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")


def engine_for(url: str) -> sa.Engine:
    """``sqlite:///path``, a plain file path (SQLite) or ``postgresql://...`` (psycopg 3)."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if not url.startswith(("sqlite://", "postgresql+psycopg://")):
        raise UserError(f"--flows-db {url.split('://')[0]}://...: use a file path or postgresql://")
    try:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})

            @sa.event.listens_for(engine, "connect")
            def _wal(connection: Any, _: Any) -> None:  # readers do not block the writer
                connection.execute("PRAGMA journal_mode=WAL")

            return engine
        return sa.create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise UserError(f"--flows-db: {exc}") from None


def _ts(value: datetime) -> float:
    return value.timestamp()


@dataclass
class FlowStore:
    """``add`` (cheap, in memory) from the collector; ``flush`` (SQL, off the event loop)."""

    engine: sa.Engine
    limits: StoreLimits = field(default_factory=StoreLimits)
    counters: StoreCounters = field(default_factory=StoreCounters)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[Any, ...], _Agg] = {}
        self._denials: list[FlowRecord] = []
        self._paths: dict[tuple[Any, ...], set[str]] = {}
        self._paths_bucket = -1
        self._retained_at = float("-inf")
        metadata.create_all(self.engine)

    @classmethod
    def open(cls, url: str, limits: StoreLimits | None = None) -> FlowStore:
        return cls(engine_for(url), limits or StoreLimits())

    # -- in memory -----------------------------------------------------------------------------
    def add(self, records: Iterable[FlowRecord]) -> None:
        with self._lock:
            for record in records:
                self._add(record)

    def _add(self, r: FlowRecord) -> None:
        self.counters.records += 1
        now = _ts(r.time)
        bucket = int(now // self.limits.bucket_seconds) * self.limits.bucket_seconds
        if bucket > self._paths_bucket:  # a new bucket: the per-pair path sets start over
            self._paths.clear()
            self._paths_bucket = bucket
        path, method = r.path, r.method
        pair = (bucket, r.source, r.destination, r.port)
        seen = self._paths.get(pair)
        if seen is None:
            if len(self._paths) >= self.limits.max_pending:
                self._paths.clear()
            seen = self._paths[pair] = set()
        if path not in seen:
            if len(seen) >= self.limits.max_paths:
                path, method = OTHER_PATH, "*"
                self.counters.folded_paths += 1
            else:
                seen.add(path)
        key = (bucket, r.source, r.destination, r.port, method, path, r.decision, r.policy,
               r.dry_run)  # fmt: skip
        agg = self._pending.get(key)
        if agg is None:
            if len(self._pending) >= self.limits.max_pending:
                self.counters.dropped_pending += 1
                return
            self._pending[key] = _Agg(1, r.duration_ms, now, now, r.trace_id, r.trace_id, r.reason)
        else:
            agg.count += 1
            agg.duration_ms_sum += r.duration_ms
            agg.first_seen = min(agg.first_seen, now)
            if now >= agg.last_seen:
                agg.last_seen = now
                agg.last_trace_id = r.trace_id or agg.last_trace_id
            agg.first_trace_id = agg.first_trace_id or r.trace_id
        if r.decision == DENY:
            if len(self._denials) >= self.limits.max_pending:
                self.counters.dropped_denials += 1
            else:
                self._denials.append(r)

    # -- SQL -----------------------------------------------------------------------------------
    def _insert(self) -> Any:
        return (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(
            flows_table
        )

    def flush(self, now: datetime | None = None) -> int:
        """Write pending flows and denials, then apply retention; the number of flows written.
        On a database error the batch is dropped (counted): the collector never blocks."""
        with self._lock:
            pending, self._pending = self._pending, {}
            denials, self._denials = self._denials, []
        now = now or datetime.now(UTC)
        retain = _ts(now) - self._retained_at >= RETAIN_EVERY_SECONDS
        if not pending and not denials and not retain:
            return 0
        try:
            with self.engine.begin() as conn:
                if pending:
                    rows = [
                        {**dict(zip(KEY, key, strict=True)), "count": a.count,
                         "duration_ms_sum": a.duration_ms_sum, "first_seen": a.first_seen,
                         "last_seen": a.last_seen, "first_trace_id": a.first_trace_id,
                         "last_trace_id": a.last_trace_id, "reason": a.reason}
                        for key, a in pending.items()
                    ]  # fmt: skip
                    stmt = self._insert()
                    t = flows_table.c
                    stmt = stmt.on_conflict_do_update(
                        index_elements=list(KEY),
                        set_={
                            "count": t.count + stmt.excluded.count,
                            "duration_ms_sum": t.duration_ms_sum + stmt.excluded.duration_ms_sum,
                            "first_seen": sa.func.least(t.first_seen, stmt.excluded.first_seen)
                            if self.engine.dialect.name == "postgresql"
                            else sa.func.min(t.first_seen, stmt.excluded.first_seen),
                            "last_seen": sa.func.greatest(t.last_seen, stmt.excluded.last_seen)
                            if self.engine.dialect.name == "postgresql"
                            else sa.func.max(t.last_seen, stmt.excluded.last_seen),
                            "last_trace_id": stmt.excluded.last_trace_id,
                        },
                    )
                    conn.execute(stmt, rows)
                if denials:
                    conn.execute(
                        denials_table.insert(),
                        [
                            {"time": _ts(d.time), "source": d.source,
                             "source_principal": d.source_principal,
                             "destination": d.destination, "port": d.port, "method": d.method,
                             "path": d.path, "status": d.status, "reason": d.reason,
                             "policy": d.policy, "trace_id": d.trace_id, "kind": d.kind}
                            for d in denials
                        ],
                    )  # fmt: skip
                if retain or len(pending) + len(denials) >= self.limits.max_pending // 2:
                    self._retain(conn, _ts(now))
                    self._retained_at = _ts(now)
        except sa.exc.SQLAlchemyError:
            self.counters.flush_errors += 1
            raise
        return len(pending)

    def _retain(self, conn: sa.Connection, now: float) -> None:
        cutoff = now - self.limits.max_age_seconds
        deleted = conn.execute(flows_table.delete().where(flows_table.c.last_seen < cutoff))
        deleted_d = conn.execute(denials_table.delete().where(denials_table.c.time < cutoff))
        total = deleted.rowcount + deleted_d.rowcount
        for table, limit in ((flows_table, self.limits.max_rows),
                             (denials_table, self.limits.max_denials)):  # fmt: skip
            rows = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            if rows > limit:
                oldest = (
                    sa.select(table.c.id).order_by(table.c.id).limit(rows - limit).scalar_subquery()
                )
                total += conn.execute(table.delete().where(table.c.id.in_(oldest))).rowcount
        self.counters.deleted_rows += max(0, total)

    def row_counts(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            flows = conn.execute(sa.select(sa.func.count()).select_from(flows_table)).scalar_one()
            den = conn.execute(sa.select(sa.func.count()).select_from(denials_table)).scalar_one()
        return int(flows), int(den)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        self.engine.dispose()
