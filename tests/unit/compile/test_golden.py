"""Golden files: the compiled config of every workload in examples/, reviewed as diffs.

Regenerate after an intended change with ``MESHWARD_UPDATE_GOLDEN=1`` and review the diff:
    MESHWARD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/compile/test_golden.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshward.compile import CompileOptions, Endpoint, Mode, compile_mesh
from meshward.policy import load

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).parent / "golden"
NOW = datetime(2030, 1, 1, tzinfo=UTC)  # before every example expiry: emergency rules included
OPTIONS = {
    "xds": CompileOptions(
        mode=Mode.XDS,
        extauthz=Endpoint("127.0.0.1", 9191),
        otlp=Endpoint("127.0.0.1", 4317),
        flow_log_cluster="meshward-xds",  # as `meshward xds serve` compiles (flows on)
    ),
    "static": CompileOptions(mode=Mode.STATIC, extauthz=Endpoint("127.0.0.1", 9191)),
}
UPDATE = os.environ.get("MESHWARD_UPDATE_GOLDEN") == "1"


def _render(mode: str) -> dict[str, str]:
    compiled = compile_mesh(load([EXAMPLES]), OPTIONS[mode], now=NOW)
    return {
        f"{ref.replace('/', '_')}.{mode}.json": json.dumps(
            r.to_json() | {"policy_version": "<examples>"}, indent=1, sort_keys=True
        )
        + "\n"
        for ref, r in compiled.items()
    }


@pytest.mark.parametrize("mode", sorted(OPTIONS))
def test_examples_match_golden_files(mode: str) -> None:
    rendered = _render(mode)
    assert rendered, "examples/ declares no workload"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        for stale in GOLDEN.glob(f"*.{mode}.json"):
            if stale.name not in rendered:
                stale.unlink()
        for name, text in rendered.items():
            (GOLDEN / name).write_text(text)
    existing = {p.name for p in GOLDEN.glob(f"*.{mode}.json")}
    assert existing == set(rendered), (
        "golden files out of date (workloads added or removed); regenerate with "
        "MESHWARD_UPDATE_GOLDEN=1 and review the diff"
    )
    for name, text in sorted(rendered.items()):
        assert (GOLDEN / name).read_text() == text, (
            f"{name} differs from the compiler's output; if the change is intended, regenerate "
            "with MESHWARD_UPDATE_GOLDEN=1 and review the diff"
        )


_SCRIPT = """
import hashlib, sys
from datetime import UTC, datetime
from meshward.compile import CompileOptions, Endpoint, compile_mesh
from meshward.testing import synth
from meshward.policy import load
options = CompileOptions(extauthz=Endpoint("127.0.0.1", 9191), otlp=Endpoint("127.0.0.1", 4317))
now = datetime(2030, 1, 1, tzinfo=UTC)
digest = hashlib.sha256()
sets = [load([sys.argv[1]])] + [
    synth.random_policy_set(s, synth.Profile(jwt=True, custom=True, audit=True)) for s in range(8)
]
for ps in sets:
    for ref, resources in sorted(compile_mesh(ps, options, now=now).items()):
        digest.update(ref.encode() + resources.serialize())
print(digest.hexdigest())
"""


def test_output_is_byte_identical_across_processes() -> None:
    """Same input, same bytes: also under different hash seeds (set and dict order)."""
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(EXAMPLES)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests
