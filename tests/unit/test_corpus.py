"""The conformance corpus is found beside the repository, and its absence fails loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshward.testing import corpus


def test_found_beside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHWARD_CONFORMANCE_DIR", raising=False)
    found = corpus.conformance_corpus()
    assert found == corpus.REPO_ROOT.parent / "shared" / "conformance" / "istio-authz"
    assert (corpus.REPO_ROOT / "pyproject.toml").is_file()  # REPO_ROOT is the checkout
    assert any(found.glob("*.yaml"))


@pytest.mark.parametrize("make", [lambda p: p / "absent", lambda p: p])  # missing; no *.yaml
def test_missing_corpus_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object
) -> None:
    assert callable(make)
    monkeypatch.setenv("MESHWARD_CONFORMANCE_DIR", str(make(tmp_path)))
    with pytest.raises(corpus.CorpusMissing, match="MESHWARD_CONFORMANCE_DIR"):
        corpus.conformance_corpus()
