"""`meshward demo`: the README's main command. Start the shop mesh on 127.0.0.1, run the tour,
print who decided what, stop everything (or keep it running to poke at)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from meshward.cliutil import host_port, non_negative_float, positive_float
from meshward.errors import UserError
from meshward.lifecycle import on_stop_signals

DESCRIPTION = """\
Run the whole product on this machine: a fresh CA, the control plane (`meshward xds serve`),
ext_authz (`meshward extauthz serve`) and the shop from examples/ (frontend, orders, payments,
inventory, scraper), each app behind its own Envoy sidecar, all as processes on 127.0.0.1 with
ports picked at run time. Then a scripted tour calls between the services the way apps do (to
the caller's sidecar, which brings the caller's mTLS identity) and prints, per call, the
expected and actual outcome, who decided (Envoy RBAC, ext_authz or mTLS), the policy and rule,
and the trace id; then edits a policy live, shows the same call denied, and reverts it; then
adds a CUSTOM policy that ext_authz decides (a cache hit on the repeat), and removes it.
Exit status 0 only if every expectation held."""

EPILOG = """\
examples:
  meshward demo                                  # start, tour, stop (state in a temp dir)
  meshward demo --keep-running                   # ... and leave the mesh up to curl it
  meshward demo --state /tmp/mw --json           # keep logs in /tmp/mw, results as JSON
  meshward demo --otlp-endpoint 127.0.0.1:4317   # every span (Envoy + Meshward) to Jaeger
  meshward demo --attach sidecar-config/tour.json   # only the tour, against a running mesh
  meshward demo --chapter least-privilege        # policy from observed traffic, on its own mesh
  meshward denials                               # denials of the running (last) demo

state directory: policies/ (a copy of examples/: edit it while --keep-running and watch the
sidecars follow), ca/, sidecars/<name>.<ns>/ (bootstrap, envoy.log, access.log),
logs/ (one per process, decisions.jsonl from ext_authz), traces.jsonl (spans, when no
--otlp-endpoint), state.json (where everything is; read by `meshward denials`).
Without --state the temp dir is removed at exit unless something failed."""


def _say(out: TextIO) -> Any:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    return say


def _interrupt() -> None:
    """`kill <pid>` stops the mesh as cleanly as Ctrl-C does, and Ctrl-C works even when the
    shell started us with SIGINT ignored (a background job)."""
    raise KeyboardInterrupt


def _tracer(endpoint: str) -> tuple[Any, Any]:
    from meshward.telemetry import setup_tracing

    provider = setup_tracing("meshward-demo-tour", endpoint, schedule_delay_millis=500)
    return provider, provider.get_tracer("meshward.demo.tour")


def _shutdown(provider: Any) -> None:
    if hasattr(provider, "shutdown"):
        with contextlib.suppress(Exception):
            provider.shutdown()


def _print_result(result: Any, args: argparse.Namespace, out: TextIO) -> None:
    from meshward.demo.report import render

    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        print("", file=out)
        print(render(result), file=out, flush=True)


def _usage(state: Any) -> str:
    """How to use a running mesh: the outbound ports, status, metrics, logs."""
    lines = [
        "",
        "The mesh keeps running. Call a service the way an app would (via its caller's sidecar):",
    ]
    fe = state.workloads.get("shop/frontend")
    if fe is not None and "shop/orders:8080" in fe.outbound:
        lines.append(
            f"  curl -s http://{fe.outbound['shop/orders:8080']}/orders/42      # frontend -> orders: allowed"
        )
        lines.append(
            f"  curl -s -X DELETE http://{fe.outbound['shop/orders:8080']}/orders/42   # denied by Envoy RBAC"
        )
    orders = state.workloads.get("shop/orders")
    if orders is not None and "shop/payments:8080" in orders.outbound:
        lines.append(
            f"  curl -s -X POST http://{orders.outbound['shop/payments:8080']}/payments  # no JWT: denied by ext_authz"
        )
    lines.append("outbound listeners (caller -> callee: address):")
    for _ref, w in sorted(state.workloads.items()):
        targets = ", ".join(
            f"{k.split('/')[1].split(':')[0]} {v}" for k, v in sorted(w.outbound.items())
        )
        lines.append(f"  {w.name:10} {targets}")
    lines.append(
        f"control plane: {state.xds_admin}/status  {state.xds_admin}/metrics   (meshward status --xds {state.xds_admin.removeprefix('http://') if state.xds_admin else ''})"
    )
    if state.extauthz_metrics:
        lines.append(f"ext_authz:     {state.extauthz_metrics}/metrics")
    lines.append(
        "sidecar admin (Unix sockets, 0600; curl --unix-socket SOCKET http://envoy/ready):"
    )
    lines.extend(f"  {w.name:10} {w.admin}" for w in state.workloads.values() if w.admin)
    lines.append(f"policies:      {state.policy_dir}  (edit them: changes are pushed live)")
    lines.append(
        "denials:       meshward denials   (add --since 5m, --workload shop/payments, --json)"
    )
    if state.otlp:
        lines.append(f"traces:        sent to {state.otlp}")
    elif state.trace_file:
        lines.append(
            f"traces:        {state.trace_file} (pass --otlp-endpoint to send them to Jaeger)"
        )
    lines.append("Press Ctrl-C to stop everything.")
    return "\n".join(lines)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.attach:
        return _attach(args)
    from meshward.demo import state as demo_state
    from meshward.demo.topology import DemoMesh, MeshOptions, find_examples
    from meshward.demo.tour import Runner

    out = sys.stderr if args.json else sys.stdout
    say = _say(out)
    examples = find_examples(args.examples)
    temporary = args.state is None
    state_dir = (
        Path(tempfile.mkdtemp(prefix="meshward-demo-")) if temporary else Path(args.state).resolve()
    )
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--state {args.state}: cannot use it as a directory: {exc.strerror}"
        ) from None
    say(f"meshward demo: state in {state_dir}")
    options = MeshOptions(
        state_dir=state_dir,
        examples=examples,
        otlp_endpoint=args.otlp_endpoint,
        timeout=args.timeout,
        tune_tracing=True,
    )
    failed = True
    provider: Any = None
    try:
        with on_stop_signals(_interrupt), DemoMesh(options, out=out) as mesh:
            assert mesh.state is not None
            demo_state.record_last(state_dir)
            provider, tracer = _tracer(mesh.state.otlp or mesh.otlp_endpoint)
            runner = Runner(
                mesh.state,
                tracer=tracer,
                progress=say,
                check_alive=mesh.supervisor.check_alive,
                each_call=args.json,  # without --json the table follows at once
            )
            say("")
            say(
                "meshward demo: the tour (each call goes app -> its sidecar -> mTLS -> callee's sidecar)"
            )
            result = runner.run()
            _shutdown(provider)
            provider = None
            _print_result(result, args, out)
            failed = not result.ok
            if args.keep_running:
                say(_usage(mesh.state))
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        mesh.supervisor.check_alive()
                        time.sleep(0.5)
                say("meshward demo: stopping")
    except KeyboardInterrupt:
        say("meshward demo: interrupted; every process stopped")
        failed = False  # nothing went wrong; do not keep the temp dir for it
        raise
    finally:
        if provider is not None:
            _shutdown(provider)
        if temporary and not failed:
            shutil.rmtree(state_dir, ignore_errors=True)
            demo_state.forget_last(state_dir)
            say(f"meshward demo: stopped; removed {state_dir} (--state DIR keeps it)")
        elif temporary:
            say(f"meshward demo: kept {state_dir} for its logs (remove it when done)")
    if failed:
        say("meshward demo: some expectations did not hold (see above)")
        return 1
    return 0


def _attach(args: argparse.Namespace) -> int:
    """Only the tour, against a mesh somebody else started (docker-compose's `tour` service)."""
    from meshward.demo import state as demo_state
    from meshward.demo.tour import Runner

    out = sys.stderr if args.json else sys.stdout
    state = demo_state.load(Path(args.attach))
    provider, tracer = _tracer(args.otlp_endpoint) if args.otlp_endpoint else (None, None)
    runner = Runner(state, tracer=tracer, progress=_say(out), each_call=args.json)
    if args.wait > 0:
        _wait_for_mesh(state, args.wait, _say(out))
    try:
        result = runner.run()
    finally:
        _shutdown(provider)
    _print_result(result, args, out)
    return 0 if result.ok else 1


def _wait_for_mesh(state: Any, timeout: float, say: Any) -> None:
    """docker-compose starts everything at once: wait until every sidecar has its config."""
    from meshward.demo import status_poll

    deadline = time.monotonic() + timeout
    lagging = ["no answer yet"]
    say(f"[wait ] control plane at {state.xds_admin}: every sidecar in sync ...")
    while time.monotonic() < deadline:
        try:
            lagging = status_poll.lagging(
                status_poll.fetch_status(state.xds_admin), sorted(state.workloads)
            )
        except OSError as exc:
            lagging = [str(exc)]
        if not lagging:
            say("[ready] mesh")
            return
        time.sleep(0.5)
    raise UserError(f"the mesh did not converge in {timeout:.0f}s: {'; '.join(lagging[:4])}")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--state", metavar="DIR",
                        help="keep certificates, policies, logs and state.json in DIR (reused: "
                             "wiped and refilled each run; default: a temp dir removed at exit)")  # fmt: skip
    parser.add_argument("--keep-running", action="store_true",
                        help="after the tour, leave the mesh up (prints how to curl it) until Ctrl-C")  # fmt: skip
    parser.add_argument("--otlp-endpoint", type=host_port, metavar="HOST:PORT",
                        help="send every trace (Envoy's and Meshward's) to this OTLP/gRPC "
                             "collector, e.g. Jaeger's 127.0.0.1:4317 (default: kept in "
                             "<state>/traces.jsonl)")  # fmt: skip
    parser.add_argument("--json", action="store_true",
                        help="print the tour's results as JSON on stdout (progress goes to stderr)")  # fmt: skip
    parser.add_argument("--examples", metavar="DIR",
                        help="the shop policies and demo keys (default: the checkout's examples/)")  # fmt: skip
    parser.add_argument("--timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="how long each component may take to become ready (default: %(default)s)")  # fmt: skip
    parser.add_argument("--attach", metavar="STATE",
                        help="start nothing: run the tour against the mesh described by STATE "
                             "(a state.json, e.g. sidecar-config/tour.json in docker-compose)")  # fmt: skip
    parser.add_argument("--wait", type=non_negative_float, default=0.0, metavar="SECONDS",
                        help="with --attach: first wait up to SECONDS for every sidecar to be in "
                             "sync (default: do not wait)")  # fmt: skip
    from meshward.demo.tour_leastpriv_run import add_chapter_flag, dispatch

    add_chapter_flag(parser)  # --chapter least-privilege: a chapter of its own (own module)
    parser.set_defaults(func=dispatch)
