"""Where the shared Istio conformance corpus lives, for the tests that run it.

The corpus is not vendored: it sits beside the repository (``<repo>/../shared/conformance/
istio-authz``), or wherever ``$MESHWARD_CONFORMANCE_DIR`` points. A missing corpus is a broken
checkout, and a gate that passes by not running is worse than one that fails, so the lookup
raises instead of letting tests skip."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "conformance" / "istio-authz"


class CorpusMissing(RuntimeError):
    """The conformance corpus is not where the checkout says it is."""


def conformance_corpus() -> Path:
    """The corpus directory (it holds at least one ``*.yaml``), or CorpusMissing naming where it
    was looked for and how to point elsewhere."""
    override = os.environ.get("MESHWARD_CONFORMANCE_DIR")
    corpus = Path(override) if override else DEFAULT_CORPUS
    if not corpus.is_dir() or not any(corpus.glob("*.yaml")):
        raise CorpusMissing(
            f"conformance corpus not found at {corpus}: check out `shared/` beside the repository "
            "(../shared/conformance/istio-authz) or set MESHWARD_CONFORMANCE_DIR"
        )
    return corpus
