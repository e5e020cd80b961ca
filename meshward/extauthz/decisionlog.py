"""The decision log: one JSON line per denial, dry-run result and AUDIT match (optionally per
allow), each with the trace id, so an operator goes from a log line to the trace and back.
``meshward denials`` reads these lines.

Bounded (issue 13): every field is clipped to MAX_FIELD_CHARS with a marker, and the file
rotates by size (``decisions.jsonl`` -> ``.1`` ... ``.3``) so it and its backups never hold
more than ``max_bytes``: a flood of denied 15 KB-path requests cannot fill the disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshward.telemetry import JsonFormatter
from meshward.telemetry.limits import (
    DEFAULT_LOG_BACKUPS,
    DEFAULT_LOG_BYTES,
    clip,
    clip_fields,
    rotating_handler,
)

if TYPE_CHECKING:
    from meshward.extauthz.authorizer import CheckResult

LOGGER = "meshward.extauthz.decision"
log = logging.getLogger(LOGGER)


def open_decision_log(
    path: Path | None, *, max_bytes: int = DEFAULT_LOG_BYTES, backups: int = DEFAULT_LOG_BACKUPS
) -> None:
    """Send decision lines to ``path`` (appended; created if missing; rotated by size, at most
    ``max_bytes`` with its backups) instead of the server log."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if getattr(handler, "_meshward_decisions", False):
            logger.removeHandler(handler)
            handler.close()
    if path is None:
        logger.propagate = True
        return
    handler = rotating_handler(path, max_bytes, backups)
    handler.setFormatter(JsonFormatter())
    handler._meshward_decisions = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def _fields(result: CheckResult, trace_id: str) -> dict[str, Any]:
    return clip_fields(
        {
            "event": "decision",
            "decision": result.decision,
            "status": result.http_status,
            "workload": result.workload,
            "policy": result.policy,
            "rule": result.rule,
            "reason": result.reason,
            "code": result.code or None,
            "source_principal": result.source_principal,
            "user": result.user,
            "method": result.method,
            "path": result.path,
            "cache": None if result.cache_hit is None else ("hit" if result.cache_hit else "miss"),
            "policy_version": result.policy_version[:12],
            "trace_id": trace_id,
            "source": "extauthz",
        }
    )


def record(result: CheckResult, trace_id: str, *, log_allows: bool = False) -> None:
    """Write the lines this result calls for (cheap no-op for a plain allow)."""
    if not result.allowed:
        log.warning("denied: %s", clip(result.reason), extra=_fields(result, trace_id))
    elif log_allows:
        log.info("allowed", extra=_fields(result, trace_id))
    for dry in result.dry_run:
        if dry.matched or dry.would_deny:
            fields = _fields(result, trace_id)
            fields.update(
                event="dry-run",
                dry_run_policy=clip(dry.policy),
                dry_run_action=str(dry.action),
                dry_run_rule=dry.rule,
                would_deny=dry.would_deny,
            )
            log.info(
                "dry-run %s %s",
                dry.policy,
                "would deny" if dry.would_deny else "matched",
                extra=fields,
            )
    if result.audit_policies:
        fields = _fields(result, trace_id)
        fields.update(event="audit", audit_policies=[clip(p) for p in result.audit_policies[:64]])
        log.info("audit", extra=fields)
