"""Join tokens: the one-time, short-lived credential a node agent presents on first contact.

A node has no certificate before its first SVID, so something else must prove which workload it
runs. A join token is ``mwjoin1.<payload>.<mac>`` (base64url): the payload names the workload
(``NS/NAME``), a random token id and the expiry; the MAC is HMAC-SHA256 under a secret kept in
the CA directory (``join-token.key``, 0600, created on first use). HMAC rather than a signature:
the only verifier is the control plane, which holds the CA directory anyway, and a symmetric MAC
cannot be confused with anything the CA signs for workloads.

Single use is state, not a property of the token: :class:`UsedTokens` records spent ids in
``join-tokens-used.log`` in the control plane's state directory (appended and fsync-ed before
the SVID is returned), so a restart does not re-enable them. An id is kept until its token
expires (after that the token is refused as expired anyway), so the file is bounded by the
number of tokens minted within one maximum TTL, and capped at :data:`MAX_USED`.

Verification is pure: ``now`` is an argument. Every refusal is a :class:`JoinRefused` whose
``reason`` is a short label (``expired``, ``used``, ``wrong-workload``, ``bad-signature``,
``malformed``) and whose message says what to do.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from meshward.certs import files
from meshward.certs.lifetime import as_utc
from meshward.errors import UserError

PREFIX = "mwjoin1"
KEY_FILE = "join-token.key"
USED_FILE = "join-tokens-used.log"
MAX_TOKEN_TTL = timedelta(hours=24)
MIN_TOKEN_TTL = timedelta(seconds=1)
MAX_TOKEN_BYTES = 1024
MAX_USED = 100_000
PRUNE_EVERY = 1024  # appends between two passes that drop expired ids
_KEY_BYTES = 32

EXPIRED, USED, WRONG_WORKLOAD, BAD_SIGNATURE, MALFORMED = (
    "expired",
    "used",
    "wrong-workload",
    "bad-signature",
    "malformed",
)


class JoinRefused(UserError):
    """A join token that must not be honoured; ``reason`` labels why (logs, metrics, tests)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class JoinClaims:
    token_id: str
    workload: str  # NS/NAME
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_key(ca_dir: Path) -> bytes:
    """The MAC key in ``ca_dir`` (created 0600 on first use; refused if group/world-readable)."""
    path = Path(ca_dir) / KEY_FILE
    if not path.exists():
        files.ensure_dir(Path(ca_dir))
        try:
            files.write_private(path, secrets.token_bytes(_KEY_BYTES), overwrite=False)
        except UserError:
            if not path.exists():  # not a lost race with another writer
                raise
    key = files.read_private(path)
    if len(key) != _KEY_BYTES:
        raise UserError(f"{path} is corrupt (expected {_KEY_BYTES} bytes); delete it to re-create")
    return key


@functools.lru_cache(maxsize=4)
def _keyed(key: bytes) -> Any:
    """The HMAC keyed once (a control plane has one join key): each token's MAC is a copy of
    it, which skips OpenSSL's digest lookup and key setup per token (in the control plane's
    process those showed as ~15% of a join's handler time; a copy costs microseconds)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(key: bytes, payload: str) -> str:
    mac = _keyed(key).copy()
    mac.update(f"{PREFIX}.{payload}".encode())
    return _b64(mac.digest())


def mint(key: bytes, workload: str, *, ttl: timedelta, now: datetime | None = None) -> str:
    """A new token for ``workload`` (NS/NAME), valid for ``ttl`` from ``now``."""
    if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise UserError(
            f"join token TTL must be between 1s and 24h (it is a first-contact credential, "
            f"used within minutes), got {ttl}"
        )
    at = as_utc(now)
    claims = {
        "v": 1,
        "id": secrets.token_hex(16),
        "workload": workload,
        "exp": int((at + ttl).timestamp()),
    }
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{PREFIX}.{payload}.{_mac(key, payload)}"


def verify(key: bytes, token: str, *, workload: str, now: datetime | None = None) -> JoinClaims:
    """The claims of a genuine, unexpired token for ``workload``; JoinRefused otherwise.

    Order matters for what the caller learns: the MAC is checked before anything in the payload
    is believed, so a forged token only ever hears "bad signature"."""
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise JoinRefused(MALFORMED, "join token is too long to be one; nothing was issued")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise JoinRefused(
            MALFORMED,
            f"not a Meshward join token (expected {PREFIX}.<payload>.<mac>); create one with "
            "`meshward ca join-token --workload NS/NAME`",
        )
    payload, mac = parts[1], parts[2]
    if not hmac.compare_digest(_mac(key, payload), mac):
        raise JoinRefused(
            BAD_SIGNATURE,
            "join token signature does not verify: it was edited, or minted for another CA; "
            "nothing was issued",
        )
    try:
        claims = json.loads(_unb64(payload))
        token_id, bound, exp = str(claims["id"]), str(claims["workload"]), int(claims["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise JoinRefused(
            MALFORMED, "join token payload is malformed; nothing was issued"
        ) from None
    at = as_utc(now)
    expires_at = datetime.fromtimestamp(exp, tz=at.tzinfo)
    if at >= expires_at:
        raise JoinRefused(
            EXPIRED,
            f"join token expired at {expires_at.isoformat(timespec='seconds')}; create a new one "
            "with `meshward ca join-token`",
        )
    if bound != workload:
        raise JoinRefused(
            WRONG_WORKLOAD,
            f"join token is for workload {bound}, not {workload}; nothing was issued",
        )
    return JoinClaims(token_id, bound, expires_at)


class UsedTokens:
    """Spent token ids, persisted in ``directory`` so a restarted control plane refuses them.

    The file is an append-only log, one ``<token id> <expiry epoch>`` line per spent token,
    fsync-ed before the SVID is returned: O(1) per join however many tokens are recorded. It is
    compacted (rewritten atomically with the live entries) when it holds more than twice as many
    lines as live entries. A torn last line (a crash mid-append) is ignored: the join it records
    was never answered. Any other malformed content fails closed. Not thread-safe: the
    certificate service calls it from its event loop only; :meth:`commit` batches the joins
    in flight into one fsync done in a worker thread (group commit), the token being reserved
    in memory meanwhile so a concurrent reuse is refused.
    """

    def __init__(self, directory: Path, *, max_entries: int = MAX_USED) -> None:
        self.path = Path(directory) / USED_FILE
        self.max_entries = max_entries
        self._lines = 0
        self._since_prune = 0
        self._used: dict[str, float] = self._load()
        self._pending: list[tuple[bytes, Any]] = []  # (line, future) awaiting the next fsync
        self._flushing = False
        self._compact_due = False

    def _corrupt(self) -> UserError:
        # Failing open here would re-enable every spent token: refuse to start instead.
        return UserError(
            f"{self.path} is unreadable or corrupt; spent join tokens cannot be told apart. "
            "Restore it, or delete it only if every token minted in the last 24h is expired"
        )

    def _load(self) -> dict[str, float]:
        if not self.path.exists():
            return {}
        try:
            files.check_private_permissions(self.path)
            data = self.path.read_bytes().decode()
        except (OSError, UnicodeDecodeError):
            raise self._corrupt() from None
        lines = data.split("\n")
        if lines and lines[-1] != "":
            lines = lines[:-1]  # torn final append: never answered
        used: dict[str, float] = {}
        for line in lines:
            if not line:
                continue
            token_id, _, exp = line.partition(" ")
            try:
                used[token_id] = float(exp)
            except ValueError:
                raise self._corrupt() from None
            if not token_id:
                raise self._corrupt()
        self._lines = len(used)
        return used

    def check(self, claims: JoinClaims) -> None:
        """Raise JoinRefused(USED) if the token was spent already."""
        if claims.token_id in self._used:
            raise JoinRefused(
                USED,
                "join token was already used (they are single use); create a new one with "
                "`meshward ca join-token`, or restart the agent with its state directory, "
                "which renews with its current SVID",
            )

    def consume(self, claims: JoinClaims, now: datetime) -> None:
        """Mark the token spent (durably) or raise JoinRefused(USED)."""
        line = self.reserve(claims, now)
        try:
            self._persist([line])
        except BaseException:
            self.release(claims)
            raise

    def reserve(self, claims: JoinClaims, now: datetime) -> bytes:
        """Mark the token spent in memory (from here on a second join with it is refused, even
        while this one is in flight) or raise JoinRefused(USED); return the log line that must
        be durable (:meth:`commit`) before the SVID leaves."""
        self.check(claims)
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY or len(self._used) >= self.max_entries:
            self.prune(now)
        if len(self._used) >= self.max_entries:
            raise JoinRefused(
                USED, "too many join tokens in flight; try again once some have expired"
            )
        expiry = claims.expires_at.timestamp()
        self._used[claims.token_id] = expiry
        return f"{claims.token_id} {expiry:.0f}\n".encode()

    def release(self, claims: JoinClaims) -> None:
        """Undo :meth:`reserve` for a join that failed before anything was issued."""
        self._used.pop(claims.token_id, None)

    async def commit(self, line: bytes) -> None:
        """Make ``line`` durable, batched with every other join in flight: one write and one
        fsync per batch, in a worker thread, so the event loop keeps serving meanwhile. Returns
        only once the line is on disk (a crash after that cannot re-enable the token); raises
        UserError if it cannot be written."""
        import asyncio

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((line, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        import asyncio

        try:
            while self._pending:
                batch, self._pending = self._pending, []
                # Decided on the loop, where _used changes; done in the thread, where (being
                # the only writer of the file) a rename cannot race an append.
                snapshot = (
                    "".join(f"{k} {v:.0f}\n" for k, v in self._used.items()).encode()
                    if self._compact_due
                    else None
                )
                self._compact_due = False
                try:
                    await asyncio.to_thread(
                        self._write_batch, [line for line, _ in batch], snapshot
                    )
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(
                                exc if isinstance(exc, Exception) else UserError(str(exc))
                            )
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._flushing = False

    def _write_batch(self, lines: list[bytes], snapshot: bytes | None) -> None:
        if snapshot is not None:  # the live entries, this batch's included
            files.ensure_dir(self.path.parent)
            files.write_private(self.path, snapshot, overwrite=True)
            self._lines = snapshot.count(b"\n")
        else:
            self._persist(lines)

    def _persist(self, lines: list[bytes]) -> None:
        self._append(b"".join(lines))
        self._lines += len(lines)

    def prune(self, now: datetime) -> None:
        """Forget ids whose token expired (refused as expired anyway); compact the log when
        most of its lines are such ids."""
        stamp = as_utc(now).timestamp()
        self._used = {k: v for k, v in self._used.items() if v > stamp}
        self._since_prune = 0
        if self._lines > 2 * len(self._used):
            if self._flushing:
                self._compact_due = True  # the flusher does it, after its write in flight
            else:
                self._compact()

    def _append(self, line: bytes) -> None:
        files.ensure_dir(self.path.parent)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, files.PRIVATE_MODE)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise UserError(
                f"cannot record a spent join token in {self.path}: {exc.strerror}"
            ) from None

    def _compact(self) -> None:
        data = "".join(f"{k} {v:.0f}\n" for k, v in self._used.items()).encode()
        files.ensure_dir(self.path.parent)
        files.write_private(self.path, data, overwrite=True)
        self._lines = len(self._used)

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._used

    def __len__(self) -> int:
        return len(self._used)


def read_token_file(path: Path) -> str:
    """A token from a file an operator (or provisioning) wrote; clear errors, no traceback."""
    try:
        if os.stat(path).st_size > MAX_TOKEN_BYTES:
            raise UserError(f"{path} is too large to hold a join token")
        return Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read join token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} does not hold a join token (not text)") from None
