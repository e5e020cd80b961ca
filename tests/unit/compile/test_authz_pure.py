"""meshward.compile.authz (plan -> builder -> generators) is pure: no clock, no I/O, no
randomness, no process-global state, so the same policies give the same filters in every
process (the control plane, ``meshward policy compile`` and the tests)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from meshward.compile import authz

PACKAGE = Path(authz.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))
IMPURE_MODULES = {
    "asyncio", "os", "pathlib", "random", "secrets", "socket", "subprocess", "sys", "threading",
    "time", "urllib", "uuid",
}  # fmt: skip
IMPURE_CALLS = {"open", "print", "input", "now", "utcnow", "today", "getenv"}


def test_the_pipeline_modules_are_all_there() -> None:
    names = {p.stem for p in MODULES}
    assert {"placement", "builder", "http_rbac", "tcp_rbac", "ext_authz", "jwt_authn"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_is_pure_and_small(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) < 700
    found: list[str] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in IMPURE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in IMPURE_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in IMPURE_CALLS:
                found.append(f"{name}() at line {node.lineno}")
        elif isinstance(node, ast.Global):
            found.append(f"global at line {node.lineno}")
    assert found == [], f"{path.name}: {found}"
