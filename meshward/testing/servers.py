"""The control plane and ext_authz of a :class:`~meshward.testing.mesh.Mesh` as real processes.

``meshward xds serve`` (nodes bring their own keys) and ``meshward extauthz serve`` run as
children of the one launcher, so a test can SIGKILL one and start it again, and the demo runs
what an operator runs.
Every address is picked at run time on 127.0.0.1: the control plane binds port 0 for ADS, admin
and join and says where in its ready file; ext_authz's listen port is picked just before it
starts (the control plane's command line names it, and both start at once). Once a server has
told where it listens, its command line is pinned to those addresses, so a restarted server
comes back where its clients (sidecars, agents, the control plane) already point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshward.testing.processes import Component, Launcher, meshward_argv, read_ready
from meshward.testing.status_poll import fetch_status

XDS, EXTAUTHZ = "xds", "extauthz"


def pin(argv: Sequence[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced by ``value`` (appended when absent)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == flag:
            out[i + 1] = value
            return out
    return [*out, flag, value]


class ServerProcesses:
    """``meshward xds serve`` and (optionally) ``meshward extauthz serve`` for one mesh.

    ``xds_args``/``extauthz_args`` are the mesh-specific flags; the addresses, the policy
    directory, the CA and the ready files are added here. ``extauthz_args`` None: no ext_authz.
    """

    def __init__(
        self,
        launcher: Launcher,
        run_dir: Path,
        *,
        policy_dir: Path,
        ca_dir: Path,
        bindings_file: Path,
        xds_args: Sequence[str] = (),
        xds_env: Mapping[str, str] | None = None,
        extauthz_args: Sequence[str] | None = None,
        extauthz_env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        from meshward.net import free_port

        self.launcher = launcher
        self.run_dir = run_dir
        self.timeout = timeout
        self.xds_ready = run_dir / "xds.json"
        self.extauthz_ready = run_dir / "extauthz.json"
        self.xds_env = dict(xds_env or {})
        self.extauthz_env = dict(extauthz_env or {})
        self.xds_info: dict[str, Any] = {}
        self.extauthz_info: dict[str, Any] = {}
        self.extauthz_port = 0
        self.extauthz_argv: list[str] | None = None
        if extauthz_args is not None:
            self.extauthz_port = free_port()
            self.extauthz_argv = meshward_argv(
                "extauthz", "serve",
                "--policy", str(policy_dir),
                "--listen", f"127.0.0.1:{self.extauthz_port}",
                *extauthz_args,
                "--ready-file", str(self.extauthz_ready),
            )  # fmt: skip
        self.xds_argv = meshward_argv(
            "xds", "serve",
            "--policy", str(policy_dir),
            "--ca", str(ca_dir),
            "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0",
            "--bindings", str(bindings_file),
            *(["--extauthz", self.extauthz_address] if self.extauthz_argv else []),
            *xds_args,
            # sidecars run under `meshward agent`: keys stay with them (the only mode), first SVID
            # by join token on this port
            "--join-listen", "127.0.0.1:0",
            "--ready-file", str(self.xds_ready),
        )  # fmt: skip

    # -- addresses ------------------------------------------------------------------------------
    @property
    def ads(self) -> str:
        return str(self.xds_info["ads"])

    @property
    def join(self) -> str:
        return str(self.xds_info["join"])

    @property
    def admin_url(self) -> str:
        return str(self.xds_info["admin"])

    @property
    def extauthz_address(self) -> str:
        return f"127.0.0.1:{self.extauthz_port}"

    @property
    def extauthz_metrics(self) -> str | None:
        """``host:port`` of ext_authz's metrics (as it last announced), None without them."""
        metrics = self.extauthz_info.get("metrics")
        return str(metrics) if metrics else None

    # -- lifecycle ------------------------------------------------------------------------------
    def launch(self) -> None:
        """Start ext_authz and the control plane at once (no waiting)."""
        if self.extauthz_argv is not None:
            self.launch_extauthz()
        self.launch_xds()

    def launch_xds(self) -> Component:
        return self.launcher.launch(
            XDS,
            self.xds_argv,
            ready_path=self.xds_ready,
            env=self.xds_env,
            timeout=self.timeout,
            what="control plane",
        )

    def launch_extauthz(self) -> Component:
        assert self.extauthz_argv is not None, "this mesh runs no ext_authz"
        return self.launcher.launch(
            EXTAUTHZ,
            self.extauthz_argv,
            ready_path=self.extauthz_ready,
            env=self.extauthz_env,
            timeout=self.timeout,
            what=f"ext_authz on {self.extauthz_address}",
        )

    def wait(self, names: Sequence[str] = (XDS,)) -> None:
        """Wait for ``names``, then pin their command lines to the addresses they bound."""
        self.launcher.wait_ready(list(names))
        if XDS in names:
            self.xds_info = read_ready(self.xds_ready) or {}
            argv = pin(self.xds_argv, "--listen", self.ads)
            argv = pin(argv, "--admin", self.admin_url.removeprefix("http://").rstrip("/"))
            self.xds_argv = pin(argv, "--join-listen", self.join)
        if EXTAUTHZ in names and self.extauthz_argv is not None:
            self.extauthz_info = read_ready(self.extauthz_ready) or {}
            if self.extauthz_metrics:
                self.extauthz_argv = pin(
                    self.extauthz_argv, "--metrics-listen", self.extauthz_metrics
                )

    def start(self, name: str, *, wait: bool = True) -> None:
        """(Re)start ``name`` (``xds`` or ``extauthz``) where it listened before."""
        if name == XDS:
            self.launch_xds()
        elif name == EXTAUTHZ:
            self.launch_extauthz()
        else:
            raise ValueError(f"no server {name!r}: {XDS!r} or {EXTAUTHZ!r}")
        if wait:
            self.wait((name,))

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (no goodbye to anyone) and reap it."""
        self.launcher.kill(name)

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        return self.launcher.stop(name, timeout)

    def status(self) -> dict[str, Any]:
        return fetch_status(self.admin_url)


__all__ = ["EXTAUTHZ", "XDS", "ServerProcesses", "pin"]
