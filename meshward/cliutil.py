"""Small helpers shared by every command group, so output conventions stay uniform."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import http.client
import ipaddress
import json
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

from meshward.errors import UserError


class Parser(argparse.ArgumentParser):
    """The parser class of every `meshward` command (subcommands inherit it from their parent).

    argparse reads an argument starting with ``-`` as an option unless it looks like a plain
    negative number, so ``--grace -5m`` failed with "expected one argument" before the duration
    parser could say what is wrong. Here anything starting with ``-`` and a digit is a value
    (no Meshward option looks like that), and the flag's own type check gives the clear error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON on stdout instead of text"
    )


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def silence_closed_pipe() -> None:
    """After EPIPE (``meshward ... --json | head``): point stdout and stderr at /dev/null so
    the interpreter's final flush of what is still buffered cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        # not a real file (captured in tests): nothing is left to flush to a pipe
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def parse_workload_ref(value: str) -> tuple[str, str]:
    """`NS/NAME` -> (ns, name); argparse turns the ValueError into a usage error (exit 2)."""
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME, got {value!r}")
    return namespace, name


def port_number(value: str) -> int:
    """A TCP port, 1-65535 (argparse usage error otherwise), refused in the words the policy
    loader and `policy test` cases use: ``99999 is not a port number (1-65535)``."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


N = TypeVar("N", int, float)


def number(value: str, kind: Callable[[str], N], ok: Callable[[N], bool], rule: str) -> N:
    """A numeric flag's value, or argparse's usage error (exit 2) in the same words for every
    flag: ``expected a whole number, got 'ten'`` / ``expected a number, got 'x'``, or ``<rule>,
    got <value>`` when ``ok`` refuses it (NaN compares false, so it is refused too)."""
    try:
        parsed = kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not ok(parsed):
        raise argparse.ArgumentTypeError(f"{rule}, got {parsed if kind is int else repr(value)}")
    return parsed


def non_negative_int(value: str) -> int:
    return number(value, int, lambda n: n >= 0, "must be 0 or more")


def positive_int(value: str) -> int:
    return number(value, int, lambda n: n >= 1, "must be at least 1")


def positive_float(value: str) -> float:
    return number(value, float, lambda n: 0 < n < math.inf, "must be a positive number")


def _is_host_port(value: str, lowest_port: int) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and lowest_port <= int(port) <= 65535)


def host_port(value: str) -> str:
    """HOST:PORT to connect to, a port 1-65535 (argparse usage error otherwise)."""
    if not _is_host_port(value, 1):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r} (e.g. 127.0.0.1:4317)")
    return value


def listen_address(value: str) -> str:
    """HOST:PORT to listen on, a port 0-65535 (0: the system picks a free one)."""
    if not _is_host_port(value, 0):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT, got {value!r} (e.g. 127.0.0.1:15010; port 0: any free port)"
        )
    return value


def non_negative_float(value: str) -> float:
    return number(value, float, lambda n: 0 <= n < math.inf, "must be 0 or more")


def ip_address(value: str) -> str:
    """An IPv4 or IPv6 address (no port, no CIDR), normalized."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an IP address (e.g. 10.0.0.7 or fd00::7)"
        ) from None


def duration(value: str) -> timedelta:
    """A flag's DURATION (``90s``, ``30m``, ``1h30m``, ``7d``); argparse shows the reason."""
    from meshward.certs.duration import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def did_you_mean(word: str, options: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` when ``word`` is close to one of ``options``, else ``""``."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def admin_get(
    address: str, path: str, params: dict[str, str], timeout: float, *, missing: str = ""
) -> bytes:
    """One GET on a control plane's admin address (``/flows``, ``/history``, ``/policy`` ...);
    every failure is a UserError that says what to do, never a traceback. ``missing``: what a
    404 means for ``path`` (e.g. the control plane keeps no flows)."""
    base = address if "://" in address else f"http://{address}"
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        with urllib.request.urlopen(f"{base.rstrip('/')}{path}{query}", timeout=timeout) as r:
            body: bytes = r.read()
            return body
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()[:300]
        if exc.code == 404 and missing:
            detail = missing
        raise UserError(f"{address}{path}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"cannot read {path} from {address}: {reason}; pass the admin address printed by "
            "`meshward xds serve` (default 127.0.0.1:15011)"
        ) from None
