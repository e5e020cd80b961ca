"""Bounds on what Meshward writes to disk and exports: clipped fields and size-rotated files.

Why: a request is attacker-controlled (a 16 KiB path, a long reason quoting it), and every
denial, dry-run or span writes part of it somewhere. Without bounds, 7,500 denied 15 KB-path
requests made a 368 MB decision log (issue 13). So every field written is clipped with a visible
marker, and every file rotates by size with a fixed number of backups, which caps the bytes it
can ever hold at ``max_bytes`` in total. Rotation is Python's maintained
``logging.handlers.RotatingFileHandler``.
"""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_FIELD_CHARS = 1024  # one logged field (a path, a reason, a header)
DEFAULT_LOG_BYTES = 64 * 1024 * 1024  # one log's total on disk: current file + backups
DEFAULT_LOG_BACKUPS = 3
MARKER = "...[truncated {} chars]"


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text``, or its first ``limit`` characters and a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + MARKER.format(len(text) - limit)


def clip_fields(fields: Mapping[str, Any], limit: int = MAX_FIELD_CHARS) -> dict[str, Any]:
    """Every string (and string in a list or tuple) of ``fields`` clipped to ``limit``."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str):
            out[key] = clip(value, limit)
        elif isinstance(value, list | tuple):
            out[key] = [clip(v, limit) if isinstance(v, str) else v for v in value[:64]]
        else:
            out[key] = value
    return out


def rotating_handler(
    path: Path, max_bytes: int = DEFAULT_LOG_BYTES, backups: int = DEFAULT_LOG_BACKUPS
) -> logging.handlers.RotatingFileHandler:
    """Append to ``path``; past ``max_bytes / (backups + 1)`` it becomes ``path.1`` (``path.2``
    ...) and the oldest is deleted, so ``path`` and its backups never hold more than
    ``max_bytes`` together (plus one line)."""
    if max_bytes < 1024:
        raise ValueError("a log's size limit must be at least 1 KiB")
    if backups < 1:
        raise ValueError("keep at least one rotated file")
    path.parent.mkdir(parents=True, exist_ok=True)
    return logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes // (backups + 1), backupCount=backups, encoding="utf-8"
    )


def rotated_files(path: Path, backups: int = DEFAULT_LOG_BACKUPS) -> list[Path]:
    """``path`` and its existing backups, oldest first: what a reader reads, in order."""
    older = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)]
    return [p for p in (*older, path) if p.exists()]


def read_rotated(path: Path | str | None, backups: int = DEFAULT_LOG_BACKUPS) -> str:
    """The text of ``path`` and its backups, oldest first ("" if none can be read, or when no
    path is configured: a component without that log)."""
    if not path:
        return ""
    parts = []
    for file in rotated_files(Path(path), backups):
        try:
            parts.append(file.read_text(errors="replace"))
        except OSError:
            continue
    return "".join(part if part.endswith("\n") or not part else part + "\n" for part in parts)


__all__ = [
    "DEFAULT_LOG_BACKUPS",
    "DEFAULT_LOG_BYTES",
    "MAX_FIELD_CHARS",
    "clip",
    "clip_fields",
    "read_rotated",
    "rotated_files",
    "rotating_handler",
]
