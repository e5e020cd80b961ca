"""`meshward`: the one entry point. Each command group lives beside the code it drives
(`<package>/cli.py`); a group that spans packages is assembled here, in the CLI layer above them
all (`meshward/cli/policy.py`: `meshward policy`; `meshward/cli/xds.py`: `meshward xds` with
the flow collector).

A group module exposes ``configure(parser)``: it adds its subcommands and sets ``func`` (a
callable taking the parsed namespace and returning an exit code) on each. This file only wires
groups together and owns the exit-code contract: 0 ok, 1 user error (one line on stderr, no
traceback), 2 usage error, 141 when the reader of stdout went away (``| head``: quietly, as
a process killed by SIGPIPE would).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from meshward import __version__
from meshward.cliutil import Parser, silence_closed_pipe
from meshward.errors import UserError

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE

# (command, module that configures it, one-line help). Modules are imported only to build the
# parser; they keep heavy imports (grpc, protos) inside their handlers so `--help` stays fast.
GROUPS: tuple[tuple[str, str, str], ...] = (
    (
        "policy",
        "meshward.cli.policy",
        "validate, explain, test, diff and compile policy files; suggest, history, rollback",
    ),
    (
        "ca",
        "meshward.certs.cli",
        "the built-in CA: init, issue, inspect and rotate SPIFFE identities",
    ),
    ("xds", "meshward.cli.xds", "the control plane: serve ADS (SotW + delta), sign nodes' CSRs"),
    ("extauthz", "meshward.extauthz.cli", "serve Envoy's ext_authz Check for L7 / end-user rules"),
    (
        "bootstrap",
        "meshward.agent.bootstrap_cli",
        "key, SVID and Envoy bootstrap for an Envoy you run yourself (no agent)",
    ),
    (
        "agent",
        "meshward.agent.cli",
        "the node agent: key on the node, SVID by CSR, SDS to Envoy, Envoy supervised",
    ),
    (
        "status",
        "meshward.xds.status_cli",
        "per-node applied versions, NACKs, drift and cert expiry",
    ),
    ("denials", "meshward.demo.denials_cli", "list recent denials (fleet-wide with --xds)"),
    ("flows", "meshward.flows.cli", "the fleet's flows: who called whom, and what was decided"),
    (
        "report",
        "meshward.flows.report_cli",
        "reachability, blast radius, unused rules, compliance; --html draws the service graph",
    ),
    ("demo", "meshward.demo.cli", "run the local mesh and its scripted tour on 127.0.0.1"),
    ("doctor", "meshward.doctor", "check this installation: Envoy binary, protos, telemetry"),
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="meshward",
        description=(
            "Meshward gives Envoy sidecars identity-based micro-segmentation: every workload gets "
            "a SPIFFE identity and short-lived certificates, every hop is mTLS, and every request "
            "is checked against least-privilege policy written as Istio-compatible YAML."
        ),
        epilog=(
            "Start with `meshward demo` to see a whole mesh run on this machine, or "
            "`meshward policy validate examples/` to check a policy set. "
            "Every command takes --help."
        ),
    )
    parser.add_argument("--version", action="version", version=f"meshward {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module_name, help_text in GROUPS:
        sub = commands.add_parser(
            name, help=help_text, description=help_text[:1].upper() + help_text[1:] + "."
        )
        module = importlib.import_module(module_name)
        module.configure(sub)
        if sub.get_default("func") is None:
            sub.set_defaults(func=_print_help(sub))
    return parser


def _print_help(parser: argparse.ArgumentParser) -> Handler:
    """A group called without a subcommand is a usage error: show what it offers."""

    def handler(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Output piped into a reader that stops early (``| head``) ends the
    command quietly, whichever command printed: the EPIPE is caught here, once, not in every
    handler, and stdout is flushed here so the error cannot surface later at interpreter exit."""
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        silence_closed_pipe()
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help, --version, usage errors: what they printed must reach the pipe
        sys.stdout.flush()
        raise
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except UserError as exc:
        print(f"meshward: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("meshward: interrupted", file=sys.stderr)
        return 130
