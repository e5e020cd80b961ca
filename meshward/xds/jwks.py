"""The control plane's JWKS fetcher: every ``jwksUri`` of the policy set, fetched and cached here
and inlined into the sidecars' jwt_authn providers (meshward.compile.authz.jwt_authn).

Why here: sidecars then need no route to the identity provider, compile stays pure (the
documents are data passed in, ``CompileOptions.jwks``), and a key rotation is one fetch and one
push instead of a fetch per sidecar.

- ``file://`` is read from disk, ``http(s)://`` fetched with httpx (timeout, no redirects, at
  most :data:`MAX_DOCUMENT_BYTES`); a document must be a JWKS object with at least one key;
- every URI is refetched every ``refresh_interval`` (default 300 s, Envoy's own default for
  remote JWKS); a failed fetch is retried after ``retry_interval`` and KEEPS the last good
  keys (tokens signed with them keep verifying); the failure is in ``status()`` (the admin
  /status ``jwks`` section) and in metrics until a fetch succeeds;
- bounded: at most :data:`MAX_URIS` URIs are fetched (the rest are reported, never fetched: their
  issuers verify nothing, fail closed); state of URIs no longer in the policy is dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from meshward.policy import PolicySet

log = logging.getLogger("meshward.xds.jwks")

MAX_URIS = 64
MAX_DOCUMENT_BYTES = 1 << 20
DEFAULT_TIMEOUT = 3.0
DEFAULT_REFRESH_INTERVAL = 300.0
DEFAULT_RETRY_INTERVAL = 10.0

Fetcher = Callable[[str, float], bytes]


def jwks_uris(policy: PolicySet) -> list[str]:
    """Every ``jwksUri`` of the set's RequestAuthentications, sorted, without duplicates."""
    return sorted(
        {
            rule.jwks_uri
            for ra in policy.request_authentications
            for rule in ra.jwt_rules
            if rule.jwks_uri is not None
        }
    )


def fetch(uri: str, timeout: float) -> bytes:
    """One JWKS document: file:// from disk, http(s):// over HTTP; at most
    :data:`MAX_DOCUMENT_BYTES`. Raises on anything else."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        with Path(urllib.parse.unquote(parsed.path)).open("rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    elif parsed.scheme in ("http", "https"):
        chunks: list[bytes] = []
        size = 0
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as client,
            client.stream("GET", uri, headers={"accept": "application/json"}) as response,
        ):
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOCUMENT_BYTES:
                    raise ValueError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
                chunks.append(chunk)
        data = b"".join(chunks)
    else:
        raise ValueError(f"unsupported scheme {parsed.scheme!r} (use file://, http:// or https://)")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
    return data


def check_jwks(data: bytes) -> str:
    """The document as text when it is a JWKS object with at least one key; else ValueError."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS: expected {"keys": [...]}')
    if not doc["keys"]:
        raise ValueError("the JWKS holds no key")
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


@dataclass
class _Entry:
    document: str | None = None  # last good, canonical JSON
    fetched_at: float | None = None  # monotonic, last success
    attempted_at: float | None = None  # monotonic, last attempt
    error: str | None = None  # last attempt's failure (None: it succeeded)
    failures: int = 0


class JwksCache:
    """Last good JWKS per URI. ``refresh`` blocks (call it off the event loop); ``documents``
    is an immutable snapshot for the compiler."""

    def __init__(
        self,
        *,
        fetcher: Fetcher = fetch,
        timeout: float = DEFAULT_TIMEOUT,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetcher = fetcher
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self.retry_interval = retry_interval
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._skipped: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self.documents: dict[str, str] = {}  # replaced whole on change, never mutated
        self.fetches: dict[str, int] = {"ok": 0, "error": 0}
        self.on_fetch: Callable[[str], None] | None = None  # metrics hook: result

    def _due(self, entry: _Entry, now: float) -> bool:
        if entry.attempted_at is None:
            return True
        wait = self.retry_interval if entry.error is not None else self.refresh_interval
        return now - entry.attempted_at >= wait

    def refresh(self, uris: Iterable[str]) -> bool:
        """Fetch the URIs that are due; True when the documents changed (push again)."""
        wanted = sorted(set(uris))
        with self._lock:
            self._skipped = tuple(wanted[MAX_URIS:])
            if self._skipped:
                log.warning(
                    "%d jwksUri(s) over the limit of %d are not fetched (their tokens fail): %s",
                    len(self._skipped), MAX_URIS, ", ".join(self._skipped[:3]),
                )  # fmt: skip
            wanted = wanted[:MAX_URIS]
            for gone in set(self._entries) - set(wanted):
                del self._entries[gone]
            for uri in wanted:
                entry = self._entries.setdefault(uri, _Entry())
                now = self._clock()
                if not self._due(entry, now):
                    continue
                entry.attempted_at = now
                try:
                    document = check_jwks(self._fetcher(uri, self.timeout))
                except Exception as exc:  # keep the last good keys
                    entry.error = f"{type(exc).__name__}: {exc}"[:300]
                    entry.failures += 1
                    self._count("error")
                    log.warning(
                        "JWKS fetch from %s failed (%s); %s",
                        uri, entry.error,
                        "keeping the last good keys" if entry.document else "no keys yet",
                    )  # fmt: skip
                    continue
                entry.error = None
                entry.fetched_at = now
                if entry.document != document:
                    log.info("JWKS from %s %s", uri, "changed" if entry.document else "fetched")
                entry.document = document
                self._count("ok")
            documents = {uri: e.document for uri, e in sorted(self._entries.items()) if e.document}
            changed = documents != self.documents
            if changed:
                self.documents = documents
            return changed

    def _count(self, result: str) -> None:
        self.fetches[result] += 1
        if self.on_fetch is not None:
            self.on_fetch(result)

    def seconds_until_due(self) -> float:
        """Until the next URI is due (at most the refresh interval)."""
        now = self._clock()
        with self._lock:
            waits = [self.refresh_interval]
            for entry in self._entries.values():
                if entry.attempted_at is None:
                    return 0.0
                wait = self.retry_interval if entry.error is not None else self.refresh_interval
                waits.append(entry.attempted_at + wait - now)
        return max(0.0, min(waits))

    def status(self) -> dict[str, Any]:
        """Per URI: whether keys are served, when fetched, the last error (admin /status)."""
        now = self._clock()
        with self._lock:
            uris = {
                uri: {
                    "keys": e.document is not None,
                    "age_seconds": round(now - e.fetched_at, 1) if e.fetched_at else None,
                    "error": e.error,
                    "failures": e.failures,
                }
                for uri, e in sorted(self._entries.items())
            }
            return {
                "uris": uris,
                "failing": sorted(u for u, s in uris.items() if s["error"]),
                "not_fetched_over_limit": list(self._skipped),
                "fetches": dict(self.fetches),
            }
