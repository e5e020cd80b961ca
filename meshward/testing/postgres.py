"""A throwaway PostgreSQL server for tests (Debian's ``postgresql`` package): initdb in a
temporary directory, listening on 127.0.0.1 and a free port only, trust authentication for the
``postgres`` role, stopped and removed at exit. As root it runs as the ``postgres`` system user
(PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshward.net import free_port


class PostgresUnavailable(RuntimeError):
    pass


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise PostgresUnavailable(f"{name} not found (install Debian's postgresql package)")
    return candidates[-1]


@contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[str]:
    """Yield ``postgresql://postgres@127.0.0.1:PORT/postgres`` for a fresh server."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    prefix: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and no 'postgres' user to run as") from None
        prefix = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="meshward-pg-"))
    data, sockets = base / "data", base / "run"
    sockets.mkdir()
    if owner is not None:
        for path in (base, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = free_port()
    run = dict(capture_output=True, text=True, timeout=timeout, check=False)
    started = False
    try:
        out = subprocess.run(
            [*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--no-sync"], **run,
        )  # type: ignore[call-overload]  # fmt: skip
        if out.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {out.stderr.strip()[-500:]}")
        options = f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off"
        out = subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w",
             "-t", str(int(timeout)), "start"], **run,
        )  # type: ignore[call-overload]  # fmt: skip
        if out.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl start failed: {out.stderr.strip()[-500:]}")
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], **run)  # type: ignore[call-overload]
        shutil.rmtree(base, ignore_errors=True)
