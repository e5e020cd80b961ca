"""Writing and reading CA material on disk without ever exposing or half-writing a key.

- A key file is created 0600 from the first byte (``O_CREAT|O_EXCL`` with mode 0600, then
  ``fchmod`` in case the umask is odd), never chmod-ed down after being written world-readable.
- Writes go to a temp file in the same directory, are fsync-ed, then appear under the final name
  in one step, so a crash leaves either the old file or the new one, never a torn key.
- Without ``overwrite`` the final step is ``link()``, which fails if the name exists: no race
  between "does it exist?" and "replace it" can clobber a key.
- Reading a key refuses group/world permissions: a CA key others can read is already compromised,
  and silently tightening it would hide that.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from meshward.errors import UserError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


def ensure_dir(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")


def write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``; refuse to replace unless ``overwrite``."""
    directory = path.parent
    if not overwrite and path.exists():
        raise UserError(f"{path} already exists; pass --force to overwrite it")
    tmp = directory / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UserError(f"{path} already exists; pass --force to overwrite it") from None
            os.unlink(tmp)
        _fsync_dir(directory)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    write_atomic(path, data, mode=PRIVATE_MODE, overwrite=overwrite)


def write_public(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    write_atomic(path, data, mode=PUBLIC_MODE, overwrite=overwrite)


def _fsync_dir(directory: Path) -> None:
    # The rename/link is durable only once the directory entry is; not every filesystem allows
    # opening a directory, and failing here after the data is safe would be worse than skipping.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_private_permissions(path: Path) -> None:
    """Raise a UserError if ``path`` is readable/writable by group or others."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    loose = stat.S_IMODE(st.st_mode) & 0o077
    if loose:
        raise UserError(
            f"refusing to use {path}: it is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); a private key must be 0600 — run "
            f"`chmod 600 {path}` if nobody else could have read it, otherwise re-create the CA"
        )


def read_private(path: Path) -> bytes:
    check_private_permissions(path)
    return read_bytes(path)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
