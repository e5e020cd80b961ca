"""The agent's main loop: obtain credentials, serve them over SDS, keep them fresh, keep Envoy up.

Order at start: credentials on disk that are still valid are used (a restarted agent needs no
new join token; it renews with them); otherwise the join token buys the first SVID. Then the SDS
socket opens and Envoy starts (or a running one is adopted). Then, once per tick:

- renewal when due: a new key, a CSR, ``Renew`` over mTLS with the current SVID. Due at
  ``renew_fraction`` ± ``jitter`` of the SVID's lifetime, measured from when it was issued (the
  CA backdates ``not_before`` against clock skew; that part does not count). A failure (control
  plane down, limit hit) keeps the current SVID served and retries with exponential backoff and
  jitter, never later than the SVID's expiry allows;
- the trust bundle polled every ``bundle_poll`` seconds: a change (CA rotation, grace over) is
  served at once, and the SVID renewed after two more polls, by when every other agent has the
  new bundle too and accepts an SVID from the new root;
- Envoy restarted with backoff if it died;
- ``Renew`` and the bundle polls share one mTLS connection while the credentials stay the same
  (:class:`~meshward.agent.certclient.CertChannel`): a handshake per poll would cost the control
  plane more than the polls themselves. New credentials close it; the next call dials with them;
- ``status.json`` rewritten when something changed (health: see :meth:`Agent.status`).

SIGTERM/SIGINT: drain Envoy's listeners, stop it, stop the SDS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meshward.agent.certclient import (
    BUNDLE,
    JOIN,
    RENEW,
    CertCallFailed,
    CertChannel,
    call,
    credentials_from_reply,
    mtls_context,
    server_only_context,
)
from meshward.agent.identity import Credentials, CredentialStore, make_csr, new_key
from meshward.certs import files
from meshward.certs.x509build import SKEW_BACKDATE
from meshward.errors import UserError

log = logging.getLogger("meshward.agent")

SDS_SOCKET, ADMIN_SOCKET, STATUS_FILE = "sds.sock", "admin.sock", "status.json"
MAX_SOCKET_PATH = 100
MIN_RENEW_INTERVAL = 1.0
MAX_RETRY = 30.0


@dataclass(frozen=True)
class AgentConfig:
    workload: str  # NS/NAME
    xds: str  # HOST:PORT: ADS, and Renew/Bundle over mTLS
    state_dir: Path
    spiffe_id: str
    server_identity: str
    instance: str = ""
    join: str | None = None  # HOST:PORT for Join (first contact)
    join_token: str | None = None
    root_cert_pem: bytes | None = None  # mesh roots that authenticate the control plane at join
    renew_fraction: float = 0.5
    jitter: float = 0.1
    bundle_poll: float = 30.0
    envoy: bool = True
    delta: bool = True  # DELTA_GRPC (incremental ADS), the default; False: SotW
    envoy_log_level: str = "warning"
    envoy_args: tuple[str, ...] = ()
    drain_seconds: float = 2.0
    health_listen: str | None = None  # HOST:PORT of the health endpoint (port 0: any)
    envoy_runtime: tuple[tuple[str, str], ...] = ()  # extra Envoy runtime keys (static layer)

    def __post_init__(self) -> None:
        if not 0.0 < self.renew_fraction < 1.0:
            raise UserError("--renew-fraction must be between 0 and 1")
        if not 0.0 <= self.jitter < min(self.renew_fraction, 1.0 - self.renew_fraction):
            raise UserError("--jitter must keep renewal inside the SVID's lifetime")


def renew_delay(credentials: Credentials, now: datetime, fraction: float, jitter: float,
                rng: random.Random) -> float:  # fmt: skip
    """Seconds from ``now`` until renewal (pure but for ``rng``)."""
    start = min(credentials.not_before + SKEW_BACKDATE, credentials.not_after)
    lifetime = (credentials.not_after - start).total_seconds()
    due = start + timedelta(seconds=lifetime * (fraction + rng.uniform(-jitter, jitter)))
    return max(MIN_RENEW_INTERVAL, (due - now).total_seconds())


class Agent:
    def __init__(self, config: AgentConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.store = CredentialStore(config.state_dir)
        self.rng = rng or random.Random()
        self.credentials: Credentials | None = None
        self.sds: Any = None
        self.supervisor: Any = None
        self.renew_at = 0.0  # monotonic
        self.retry = 0.0
        self.bundle_at = 0.0
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_renewal: datetime | None = None
        self.health: Any = None  # HealthServer with --health-listen
        self.state = "starting"
        self._status_written = ""
        self._channel: CertChannel | None = None  # Renew and Bundle, for self._channel_for
        self._channel_for: Credentials | None = None

    # -- credentials -----------------------------------------------------------------------------
    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _xds_channel(self, current: Credentials) -> CertChannel:
        """The mTLS channel for Renew and Bundle, kept open across calls while the credentials
        are the same and unexpired; new credentials (a renewal, a new bundle) get a new
        connection that presents them. Its TLS context is built once per credentials (it
        parses the key and every root): an expired SVID's calls, and a channel that redials
        after a failed connection, dial again with the same one."""
        if self._channel is not None and self._channel_for is current:
            if current.not_after <= self._now():
                self._channel.close()  # expired: a fresh connection per call, same context
            return self._channel
        self._close_channel()
        channel = CertChannel(
            self.config.xds,
            context=mtls_context(current.chain_pem, current.key_pem, current.bundle_pem),
            server_id=self.config.server_identity,
        )
        self._channel, self._channel_for = channel, current
        return channel

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._channel_for = None

    async def _obtain(self, method: str) -> Credentials:
        """A new key, a CSR, one call; the new credentials (saved, not yet served)."""
        cfg = self.config
        key = new_key()
        request: dict[str, Any] = {
            "workload": cfg.workload,
            "instance": cfg.instance,
            "csr": make_csr(key, cfg.spiffe_id).decode(),
        }
        if method == JOIN:
            assert cfg.join is not None and cfg.join_token and cfg.root_cert_pem
            request["token"] = cfg.join_token
            address = cfg.join
            context = server_only_context(cfg.root_cert_pem)
            reply = await call(address, method, request, context=context,
                               server_id=cfg.server_identity)  # fmt: skip
        else:
            current = self.credentials
            assert current is not None
            address = cfg.xds
            reply = await self._xds_channel(current).call(method, request)
        fresh = credentials_from_reply(key, reply, address, cfg.spiffe_id)
        self.store.save(fresh)
        return fresh

    def _schedule(self, credentials: Credentials) -> None:
        delay = renew_delay(credentials, self._now(), self.config.renew_fraction,
                            self.config.jitter, self.rng)  # fmt: skip
        self.renew_at = time.monotonic() + delay
        self.retry = 0.0

    async def initial_credentials(self) -> Credentials:
        """From disk if still valid, else by joining. UserError when neither is possible."""
        self.store.ensure()
        current = self.store.load()
        cfg = self.config
        if current is not None and current.not_after > self._now():
            if current.spiffe_id != cfg.spiffe_id:
                raise UserError(
                    f"{cfg.state_dir} holds an SVID for {current.spiffe_id}, not {cfg.spiffe_id}; "
                    "use another --dir"
                )
            log.info("resuming with the SVID on disk (serial %x, expires %s)",
                     current.serial, current.not_after.isoformat())  # fmt: skip
            self.credentials = current
            self._schedule(current)
            return current
        if not (cfg.join and cfg.join_token and cfg.root_cert_pem):
            why = "has expired" if current is not None else "does not exist yet"
            raise UserError(
                f"the SVID in {cfg.state_dir} {why}: first contact needs --join, "
                "--join-token-file and --root-cert (create a token with "
                "`meshward ca join-token --workload NS/NAME`)"
            )
        try:
            fresh = await self._obtain(JOIN)
        except CertCallFailed as exc:
            raise UserError(f"joining the mesh failed: {exc}") from None
        log.info("joined as %s (serial %x)", fresh.spiffe_id, fresh.serial)
        self.credentials = fresh
        self._schedule(fresh)
        return fresh

    async def _renew(self) -> None:
        try:
            fresh = await self._obtain(RENEW)
        except CertCallFailed as exc:
            self.failures += 1
            self.last_error = str(exc)[:500]
            self.retry = min(MAX_RETRY, max(1.0, self.retry * 2))
            wait = self.retry * self.rng.uniform(0.8, 1.2)
            log.warning("renewal failed (%s); keeping the current SVID, retrying in %.1fs",
                        self.last_error, wait)  # fmt: skip
            self.renew_at = time.monotonic() + wait
            return
        await self.sds.update(fresh)
        self.credentials = fresh
        self._close_channel()  # it presents the old SVID; the next call dials with the new one
        self.renewals += 1
        self.last_renewal = self._now()
        self.last_error = None
        self._schedule(fresh)
        log.info("SVID renewed (serial %x, expires %s)", fresh.serial, fresh.not_after.isoformat())

    async def _poll_bundle(self) -> None:
        current = self.credentials
        assert current is not None
        try:
            reply = await self._xds_channel(current).call(BUNDLE, {})
            bundle = str(reply["trust_bundle"]).encode()
        except (CertCallFailed, KeyError) as exc:
            log.info("trust bundle poll failed: %s", exc)
            return
        if bundle == current.bundle_pem:
            return
        try:
            updated = Credentials.build(current.key_pem, current.chain_pem, bundle, "new bundle")
        except UserError as exc:
            log.warning("ignoring an unusable trust bundle: %s", exc)
            return
        self.store.save_bundle(bundle)
        await self.sds.update(updated)
        self.credentials = updated
        self._close_channel()  # the next connection verifies the server against the new roots
        # Renew after every agent had two polls to learn the new roots.
        self.renew_at = min(self.renew_at, time.monotonic() + 2 * self.config.bundle_poll)
        log.info("trust bundle changed (%d bytes); renewing soon", len(bundle))

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        creds = self.credentials
        sup = self.supervisor
        return {
            "state": self.state,
            "pid": os.getpid(),
            "workload": self.config.workload,
            "spiffe_id": creds.spiffe_id if creds else None,
            "serial": f"{creds.serial:x}" if creds else None,
            "not_after": creds.not_after.isoformat() if creds else None,
            "expired": bool(creds and creds.not_after <= self._now()),
            "renewals": self.renewals,
            "last_renewal": self.last_renewal.isoformat() if self.last_renewal else None,
            "health": self.health.address if self.health else None,
            "renewal_failures": self.failures,
            "last_error": self.last_error,
            "sds": {"streams": self.sds.streams, "pushes": self.sds.pushes, "nacks": self.sds.nacks}
            if self.sds
            else None,
            "envoy": {
                "pid": sup.pid(),
                "running": sup.running(),
                "restarts": sup.restarts,
                "last_exit": sup.last_exit,
            }
            if sup
            else None,
        }

    def write_status(self) -> None:
        data = json.dumps(self.status(), sort_keys=True)
        if data != self._status_written:
            files.write_public(self.config.state_dir / STATUS_FILE, (data + "\n").encode())
            self._status_written = data

    # -- the loop --------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        from meshward.agent.bootstrap import render_agent_bootstrap
        from meshward.agent.envoyproc import Supervisor
        from meshward.agent.sds import SdsServer
        from meshward.xds.nodeid import NodeId
        from meshward.xds.service import split_address

        cfg = self.config
        sds_path = (cfg.state_dir / SDS_SOCKET).resolve()
        if len(str(sds_path)) > MAX_SOCKET_PATH:
            raise UserError(f"--dir {cfg.state_dir} is too long a path for a Unix socket")
        credentials = await self.initial_credentials()
        self.sds = SdsServer(credentials)
        await self.sds.start(sds_path)
        if cfg.health_listen:
            from meshward.agent.health import HealthServer

            self.health = HealthServer(self.status)
            try:
                address = await self.health.start(cfg.health_listen)
            except OSError as exc:
                await self.sds.stop()
                raise UserError(f"--health-listen {cfg.health_listen}: {exc.strerror}") from None
            log.info("health endpoint on http://%s/healthz", address)
        try:
            if cfg.envoy:
                namespace, name = cfg.workload.split("/")
                host, port = split_address(cfg.xds)
                bootstrap = render_agent_bootstrap(
                    NodeId(namespace, name, cfg.instance),
                    host,
                    port,
                    server_identity=cfg.server_identity,
                    sds_socket=str(sds_path),
                    admin_socket=str((cfg.state_dir / ADMIN_SOCKET).resolve()),
                    delta=cfg.delta,
                    runtime=dict(cfg.envoy_runtime),
                )
                self.supervisor = Supervisor(
                    bootstrap,
                    (cfg.state_dir / "envoy").resolve(),
                    log_level=cfg.envoy_log_level,
                    extra_args=cfg.envoy_args,
                    drain_seconds=cfg.drain_seconds,
                )
                if self.supervisor.adopt():
                    log.info("adopted the running Envoy (pid %s)", self.supervisor.pid())
                else:
                    self.supervisor.start()
            self.state = "serving"
            self.bundle_at = time.monotonic() + cfg.bundle_poll
            while not stop.is_set():
                now = time.monotonic()
                if now >= self.renew_at:
                    await self._renew()
                if now >= self.bundle_at:
                    self.bundle_at = now + cfg.bundle_poll
                    await self._poll_bundle()
                if self.supervisor is not None:
                    event = await asyncio.to_thread(self.supervisor.tick, time.monotonic())
                    if event:
                        log.warning("%s", event)
                if self.credentials and self.credentials.not_after <= self._now():
                    self.state = "expired"
                elif self.state == "expired":
                    self.state = "serving"
                self.write_status()
                wake = min(self.renew_at, self.bundle_at, time.monotonic() + 0.5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.05, wake - time.monotonic()))
        finally:
            self.state = "stopping"
            with contextlib.suppress(Exception):
                self.write_status()
            if self.supervisor is not None:
                await asyncio.to_thread(self.supervisor.drain_and_stop)
            if self.health is not None:
                await self.health.stop()
            await self.sds.stop()
            self._close_channel()
            self.state = "stopped"
            with contextlib.suppress(Exception):
                self.write_status()
