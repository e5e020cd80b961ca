"""Envoy's admin interface on a Unix socket, and the client Meshward's tools read it with.

Envoy's admin answers state-changing requests (``/runtime_modify``, ``/logging``,
``/drain_listeners``, ``/quitquitquit``) to whoever can connect, and ``/config_dump`` shows every
rule. On a TCP port that is every local process; on a Unix socket with mode 0600
(``admin.address.pipe {path, mode}``) it is only the sidecar's own user. Every bootstrap Meshward
writes puts admin there, and its tools talk HTTP over that socket (httpx's UDS transport).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Owner read/write only: other local users cannot connect to the admin socket.
ADMIN_SOCKET_MODE = 0o600
ADMIN_SOCKET_FILE = "admin.sock"
#: sockaddr_un.sun_path holds 108 bytes with the terminating NUL; Envoy refuses longer paths.
MAX_SOCKET_PATH = 107


def admin_pipe(path: str | Path, mode: int = ADMIN_SOCKET_MODE) -> dict[str, Any]:
    """A bootstrap's ``admin`` section: the admin on the Unix socket ``path`` with ``mode``."""
    text = str(path)
    if len(text.encode()) > MAX_SOCKET_PATH:
        raise ValueError(
            f"admin socket path {text!r} is longer than {MAX_SOCKET_PATH} bytes (a Unix socket "
            "limit); pick a shorter one"
        )
    return {"address": {"pipe": {"path": text, "mode": mode}}}


def admin_socket_of(config: dict[str, Any]) -> str | None:
    """The admin socket path of a bootstrap dict, or None when its admin is not a pipe."""
    pipe = ((config.get("admin") or {}).get("address") or {}).get("pipe")
    return str(pipe["path"]) if isinstance(pipe, dict) and pipe.get("path") else None


class AdminClient:
    """HTTP/1.1 to an Envoy admin socket. ``get`` returns (status, body); connection errors
    raise OSError (httpx's are translated), so callers handle one kind of failure."""

    def __init__(self, socket_path: str | Path, *, timeout: float = 5.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(
        self, path: str, *, method: str = "GET", timeout: float | None = None
    ) -> tuple[int, str]:
        import httpx

        transport = httpx.HTTPTransport(uds=self.socket_path)
        try:
            with httpx.Client(
                transport=transport,
                base_url="http://envoy-admin",
                timeout=self.timeout if timeout is None else timeout,
            ) as client:
                response = client.request(method, path)
                return response.status_code, response.text
        except httpx.TransportError as exc:
            raise OSError(f"Envoy admin at {self.socket_path}: {exc}") from exc

    def get(self, path: str, *, timeout: float | None = None) -> tuple[int, str]:
        return self.request(path, timeout=timeout)
