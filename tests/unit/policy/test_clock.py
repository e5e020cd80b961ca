"""policy/ reads no clock: every decision that depends on time takes `now` from its caller
(the CLI layer reads the clock and passes it)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from meshward import policy
from meshward.policy import cases, diff, evaluator, explain, lint

PACKAGE = Path(policy.__file__).parent


@pytest.mark.parametrize(
    "function",
    [
        evaluator.evaluate,
        explain.explain,
        diff.diff,
        lint.lint,
        cases.run_case,
        cases.run_cases,
    ],
    ids=lambda f: f.__qualname__,
)
def test_now_is_a_required_argument(function: object) -> None:
    assert callable(function)
    parameter = inspect.signature(function).parameters["now"]
    assert parameter.default is inspect.Parameter.empty
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY


def test_no_clock_read_outside_the_cli() -> None:
    clock = re.compile(r"datetime\.now\(|\btime\.(time|monotonic)\(|date\.today\(")
    readers = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "cli.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if clock.search(line)
    ]
    assert readers == []
