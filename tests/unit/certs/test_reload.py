"""CaReloader: a CA rotated on disk is picked up; a broken file never leaves a server CA-less."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshward.certs.ca import CertificateAuthority
from meshward.certs.reload import CaReloader

TD = "cluster.local"


def touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, (stat.st_atime + 5, stat.st_mtime + 5))  # mtime granularity is not ours


def test_a_rotation_on_disk_is_picked_up_once(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path, TD)
    reloader = CaReloader(tmp_path)
    assert reloader.reload(ca) is ca  # nothing changed since it was made
    on_disk = CertificateAuthority.load(tmp_path)
    on_disk.rotate()
    touch_later(tmp_path / "ca.json")
    reloaded = reloader.reload(ca)
    assert reloaded is not ca
    assert len(reloaded.generations) == len(ca.generations) + 1
    assert reloader.reload(reloaded) is reloaded  # the same change is not reloaded twice


def test_a_broken_file_keeps_the_loaded_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = CertificateAuthority.init(tmp_path, TD)
    reloader = CaReloader(tmp_path)
    (tmp_path / "ca.json").write_text("{not json")
    touch_later(tmp_path / "ca.json")
    assert reloader.reload(ca) is ca
    assert "keeping the loaded one" in caplog.text


def test_no_directory_or_no_file_means_no_reload(tmp_path: Path) -> None:
    ca = CertificateAuthority.ephemeral(TD)
    assert CaReloader(None).reload(ca) is ca
    assert CaReloader(tmp_path / "missing").reload(ca) is ca
