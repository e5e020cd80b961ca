"""meshward.testing.waiting.wait_until: the one polling helper of the integration tests."""

from __future__ import annotations

import itertools

import pytest

from meshward.testing.waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    counter = itertools.count()
    assert wait_until(lambda: [n for n in [next(counter)] if n >= 3], 5, interval=0.001) == [3]


def test_tolerated_errors_mean_not_yet_and_are_named_on_timeout() -> None:
    calls = itertools.count()

    def check() -> bool:
        if next(calls) < 2:
            raise ConnectionRefusedError("starting")
        return True

    assert wait_until(check, 5, interval=0.001, tolerate=(OSError,)) is True
    with pytest.raises(AssertionError, match=r"waiting for the server \(last error: down\)"):
        wait_until(lambda: (_ for _ in ()).throw(OSError("down")), 0.05, "the server",
                   interval=0.01, tolerate=(OSError,))  # fmt: skip


def test_other_errors_propagate_at_once_and_a_false_check_times_out() -> None:
    empty: dict[str, int] = {}
    with pytest.raises(KeyError):
        wait_until(lambda: empty["missing"], 5)
    with pytest.raises(AssertionError, match=r"timed out after 0\.05s waiting for nothing"):
        wait_until(lambda: 0, 0.05, "nothing", interval=0.01)
