"""In-process benchmarks' A/B of two trees: each run a child process of the same script, its
``meshward`` package taken from this checkout or from another tree (``--baseline DIR``, e.g. a
``git archive`` of the base commit), the variants interleaved round by round so that a loaded
machine's drift falls on both alike."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def check_baseline(baseline: str | None) -> str | None:
    """Why ``--baseline`` cannot be used, or None."""
    if baseline and not (Path(baseline) / "meshward").is_dir():
        return f"--baseline {baseline}: no meshward package in it"
    return None


def run_child(script: str, args: list[str], root: str | None) -> dict[str, Any]:
    """``script --child ARGS`` with ``root``'s meshward first on the path (None: this
    checkout's); its last line of output, a JSON object."""
    env = dict(os.environ)
    if root:
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, script, "--child", *args],
        env=env, check=True, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def interleaved(
    variants: dict[str, str | None], rounds: int, one: Callable[[str | None], dict[str, Any]],
    as_json: bool,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Every variant once per round, in turn; with ``as_json`` each run printed as it ends."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, root in variants.items():
            found = one(root)
            results[name].append(found)
            if as_json:
                print(json.dumps({"variant": name, **found}), flush=True)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every such bench takes: rounds, the baseline tree, JSON output, and the
    hidden ``--child`` its own runs are started with."""
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="a directory holding the meshward package to compare")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run_variants(
    parser: argparse.ArgumentParser, args: argparse.Namespace, script: str, child_args: list[str],
    base_name: str = "base",
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """This checkout (``this``) and, with ``--baseline``, that tree (``base_name``), each run
    ``args.rounds`` times as ``script --child CHILD_ARGS``, interleaved."""
    if (why := check_baseline(args.baseline)) is not None:
        parser.error(why)
    variants = {"this": None, **({base_name: args.baseline} if args.baseline else {})}
    return interleaved(
        variants, args.rounds, lambda root: run_child(script, child_args, root), args.json
    )
