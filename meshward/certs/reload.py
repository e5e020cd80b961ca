"""Following a CA that changes on disk (``meshward ca rotate`` run while a server is up)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("meshward.certs")


class CaReloader:
    """Reloads the CA when its ``ca.json`` changes on disk; a CA that fails to load is logged
    and the loaded one kept (never no CA)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._mtime = self._stamp()

    def _stamp(self) -> float | None:
        if self.directory is None:
            return None
        try:
            return (self.directory / "ca.json").stat().st_mtime
        except OSError:
            return None

    def reload(self, ca: Any) -> Any:
        """The CA to use from now on: ``ca`` itself unless the file changed since last seen."""
        mtime = self._stamp()
        if mtime is None or mtime == self._mtime:
            return ca
        self._mtime = mtime
        from meshward.certs.ca import CertificateAuthority

        assert self.directory is not None  # a stamp was read from it
        try:
            loaded = CertificateAuthority.load(self.directory)
        except Exception:
            log.exception("reloading the CA from %s failed; keeping the loaded one", self.directory)
            return ca
        log.info("CA in %s changed on disk: reloaded", self.directory)
        return loaded
