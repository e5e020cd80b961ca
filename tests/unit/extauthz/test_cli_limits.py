"""`meshward extauthz serve` limit flags: sizes parse with units, nonsense is a usage error (exit
2, one line), and --help teaches the limits."""

from __future__ import annotations

import argparse

import pytest

from meshward.cli import main
from meshward.extauthz.cli import byte_size


def test_sizes_with_units() -> None:
    assert byte_size("65536") == 65536
    assert byte_size("512KiB") == 512 * 1024
    assert byte_size("64MiB") == byte_size("64m") == 64 << 20
    assert byte_size("1GiB") == 1 << 30
    for bad in ("", "-5", "12XB", "1.5MiB", "100"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)


def test_bad_limits_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--cache-bytes", "--decision-log-max-bytes"):
        with pytest.raises(SystemExit) as exited:
            main(["extauthz", "serve", "--policy", "examples", "--ca", ".", flag, "lots"])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "expected a size like 65536" in err and "Traceback" not in err


def test_help_teaches_the_limits_and_the_doors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["extauthz", "serve", "--help"])
    out = capsys.readouterr().out
    for text in ("--cache-bytes", "--decision-log-max-bytes", "--tls-dir", "--ca", "mTLS only",
                 "only about its own", "denialDetails: verbose", "[truncated N chars]"):  # fmt: skip
        assert text in out, text


def test_workers_default_to_the_cores_this_process_may_use() -> None:
    import os

    from meshward.extauthz.cli import default_workers

    assert default_workers() == len(os.sched_getaffinity(0)) >= 1


def test_trace_sampling_flags_refuse_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value, message in (
        ("--trace-sample-ratio", "1.5", "must be within [0, 1]"),
        ("--trace-sample-ratio", "half", "expected a number, got 'half'"),
        ("--max-spans-per-second", "-3", "--max-spans-per-second"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["extauthz", "serve", "--policy", "examples", "--ca", ".", flag, value])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["extauthz", "serve", "--help"])
    assert "share of decision-cache hits that get a span" in capsys.readouterr().out


def test_seconds_flags_refuse_what_is_not_a_finite_non_negative_number(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """They share cliutil.non_negative_float (a copy here let 'nan' and 'inf' through as a
    cache TTL, and answered 'abc' with argparse's generic 'invalid ... value')."""
    for flag in ("--cache-ttl", "--jwt-leeway", "--jwks-timeout", "--poll-interval"):
        for value, message in (
            ("-1", "must be 0 or more, got '-1'"),
            ("nan", "must be 0 or more, got 'nan'"),
            ("inf", "must be 0 or more, got 'inf'"),
            ("soon", "expected a number, got 'soon'"),
        ):
            with pytest.raises(SystemExit) as exited:
                main(["extauthz", "serve", "--policy", "examples", "--ca", ".", flag, value])
            assert exited.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {flag}: {message}" in err and "Traceback" not in err
