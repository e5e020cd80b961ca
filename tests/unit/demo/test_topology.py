from __future__ import annotations

from pathlib import Path

import pytest

from meshward.demo.topology import MARKER, claim, find_examples
from meshward.errors import UserError


def test_claim_refuses_a_directory_holding_other_files(tmp_path: Path) -> None:
    """--state is wiped and refilled: never someone's project directory."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "policies").mkdir()
    with pytest.raises(UserError, match="holds other files"):
        claim(tmp_path / "mine")
    assert (tmp_path / "mine" / "policies").is_dir()
    claim(tmp_path / "new")
    assert (tmp_path / "new" / MARKER).exists()
    (tmp_path / "new" / "logs").mkdir()
    claim(tmp_path / "new")  # a directory the demo used before is fine


def test_find_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (find_examples() / "payments.yaml").is_file()
    with pytest.raises(UserError, match=r"no workloads\.yaml"):
        find_examples(tmp_path)
    (tmp_path / "workloads.yaml").write_text("")
    assert find_examples(tmp_path) == tmp_path
    monkeypatch.setenv("MESHWARD_EXAMPLES", str(tmp_path))
    assert find_examples() == tmp_path
