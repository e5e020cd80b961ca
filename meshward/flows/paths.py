"""Path templates: ids folded so that flows stay countable (pure).

``/orders/42`` and ``/orders/43`` are one flow, ``/orders/{*}``. A segment is an id when it is
a number, a UUID, a long hex string, or longer than :data:`MAX_SEGMENT`. The query string is
dropped; at most :data:`MAX_SEGMENTS` segments are kept (the rest fold to ``{**}``), so neither
a flood of distinct ids nor a very long path can grow the flow table beyond what the store's
own per-bucket cap allows.
"""

from __future__ import annotations

import re

ID = "{*}"
REST = "{**}"
MAX_SEGMENTS = 8
MAX_SEGMENT = 32
_ID_SEGMENT = re.compile(
    r"^(?:[0-9]+|[0-9a-fA-F]{8,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}|[A-Za-z0-9_-]*[0-9][A-Za-z0-9_-]*[0-9][A-Za-z0-9_-]*[0-9][A-Za-z0-9_-]*)$"
)


def template(path: str) -> str:
    """The flow's path template; '' stays '' (TCP and refused connections have no path)."""
    if not path:
        return ""
    path = path.split("?", 1)[0].split("#", 1)[0]
    segments = path.split("/")[1:] if path.startswith("/") else path.split("/")
    out: list[str] = []
    for i, segment in enumerate(segments):
        if i == MAX_SEGMENTS:
            out.append(REST)
            break
        if len(segment) > MAX_SEGMENT or _ID_SEGMENT.match(segment):
            out.append(ID)
        else:
            out.append(segment)
    return "/" + "/".join(out)
