"""`meshward policy ...`: the group, assembled in the CLI layer because its sub-commands come
from every layer: validate, explain, test and diff (here: they drive meshward.policy, and
validate also the compiler's checks), `compile` (meshward.compile.compile_cli), `suggest` from
observed flows (meshward.flows.suggest_cli), `history` and `rollback` of the control plane's
applied sets (meshward.xds.history_cli). meshward/policy itself stays pure: no argparse, no
printing, no clock."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from meshward.cliutil import add_json_flag, parse_workload_ref, port_number, print_json

RAW = argparse.RawDescriptionHelpFormatter


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Work with policy files: Meshward Workload and MeshConfig documents plus Istio "
        "AuthorizationPolicy, PeerAuthentication and RequestAuthentication "
        "(security.istio.io/v1 or v1beta1). PATH may be a file or a directory (read "
        "recursively, *.yaml and *.yml)."
    )
    sub = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", title="subcommands")
    _configure_validate(sub)
    _configure_explain(sub)
    _configure_test(sub)
    _configure_diff(sub)
    _configure_compile(sub)
    _configure_flows(sub)


def _configure_flows(sub: Any) -> None:
    """`policy suggest` (from observed flows) and `policy history|rollback` (the control
    plane's applied sets) live with the code they drive; imported when the parser is built."""
    from meshward.flows.suggest_cli import configure_suggest
    from meshward.xds.history_cli import configure_history, configure_rollback

    configure_suggest(sub)
    configure_history(sub)
    configure_rollback(sub)


def _configure_compile(sub: Any) -> None:
    """`policy compile` lives with the compiler; imported when the parser is built."""
    from meshward.compile.compile_cli import configure_compile

    configure_compile(sub)


def _now(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time such as 2030-01-31T18:00:00Z, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError("the time needs a zone, e.g. a trailing Z for UTC")
    return parsed.astimezone(UTC)


def _clock(args: argparse.Namespace) -> datetime:
    """`--now` if given, else the clock: the one place policy commands read it (policy/ is
    pure; its functions take `now`)."""
    now: datetime | None = getattr(args, "now", None)
    return now if now is not None else datetime.now(UTC)


def _add_now(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--now",
        type=_now,
        metavar="TIME",
        help="evaluate as of this RFC 3339 time (default: the current time); decides whether "
        "meshward.dev/expires-at emergency rules still apply",
    )


# --------------------------------------------------------------------------- validate


def _configure_validate(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="check policy files; list every error at once",
        description="Load and validate policy files. Every problem is listed with its file, "
        "document index and field path, including values that compile to something Envoy "
        "refuses (an RE2 program over the sidecars' limit): the control plane refuses such a "
        "set too. Warnings (lint) point at policy that loads but probably does not do what "
        "was meant.",
        epilog="examples:\n"
        "  meshward policy validate examples/\n"
        "  meshward policy validate policies/ --strict   # warnings fail too (CI)\n"
        "  meshward policy validate policies/ --envoy    # also `envoy --mode validate` each\n"
        "                                                # workload's compiled config (CI)\n\n"
        "exit status: 0 valid, 1 errors (or warnings with --strict, or Envoy refused a "
        "workload's config with --envoy)",
        formatter_class=RAW,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="policy file or directory")
    p.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    p.add_argument(
        "--envoy",
        action="store_true",
        help="compile every workload and run Envoy's own config validation (envoy --mode "
        "validate) on it; needs an Envoy binary (a few seconds per 16 workloads)",
    )
    _add_now(p)
    add_json_flag(p)
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from meshward.policy import PolicyError, load
    from meshward.policy.lint import lint

    try:
        policy_set = load(args.paths)
        _check_enforceable(policy_set)
    except PolicyError as exc:
        if args.json:
            print_json({"valid": False, "errors": [_problem(p) for p in exc.problems]})
        else:
            for problem in exc.problems:
                print(f"error: {problem}", file=sys.stderr)
            count = len(exc.problems)
            print(f"{count} error{'s' if count != 1 else ''}; nothing was loaded", file=sys.stderr)
        return 1
    warnings = lint(policy_set, now=_clock(args))
    counts = {
        "workloads": len(policy_set.workloads),
        "authorization_policies": len(policy_set.authorization_policies),
        "peer_authentications": len(policy_set.peer_authentications),
        "request_authentications": len(policy_set.request_authentications),
    }
    envoy = _envoy_verdicts(policy_set, args) if args.envoy else None
    refused = [v for v in envoy or [] if not v["ok"]]
    failed = bool(args.strict and warnings) or bool(refused)
    if args.json:
        print_json(
            {
                "valid": not failed,
                "version": policy_set.version,
                "counts": counts,
                "errors": [],
                "warnings": [_problem(w) for w in warnings],
                "audit_namespaces": sorted(policy_set.mesh.audit_namespaces),
                **({"envoy": envoy} if envoy is not None else {}),
            }
        )
    else:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for verdict in refused:
            print(
                f"error: Envoy refused {verdict['workload']}: {verdict['error']}", file=sys.stderr
            )
        summary = ", ".join(f"{n} {_noun(k, n)}" for k, n in counts.items())
        print(f"valid: {summary}")
        print(f"version: {policy_set.version}")
        if policy_set.mesh.audit_namespaces:
            audited = ", ".join(sorted(policy_set.mesh.audit_namespaces))
            print(f"audit mode (every policy dry-run, CUSTOM excepted): {audited}")
        if envoy is not None:
            print(f"envoy --mode validate: {len(envoy) - len(refused)}/{len(envoy)} workloads ok")
        if warnings:
            print(f"{len(warnings)} warning(s){' (--strict: failing)' if failed else ''}")
    return 1 if failed else 0


def _check_enforceable(policy_set: Any) -> None:
    """Raise PolicyError for values Envoy would refuse once compiled (the compiler's check)."""
    from meshward.compile.envoy_limits import check_policy_set

    check_policy_set(policy_set)


def _envoy_verdicts(policy_set: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from meshward.compile.envoy_check import validate_with_envoy

    now = _clock(args)
    return [
        {"workload": v.workload, "ok": v.ok, "error": v.error}
        for v in validate_with_envoy(policy_set, now)
    ]


def _noun(key: str, count: int) -> str:
    """``authorization_policies``, 1 -> ``authorization policy`` (not "policie")."""
    words = key.replace("_", " ")
    if count != 1:
        return words
    return words[:-3] + "y" if words.endswith("ies") else words[:-1]


def _problem(problem: Any) -> dict[str, Any]:
    return {
        "file": problem.file,
        "index": problem.index,
        "field": problem.field,
        "reason": problem.reason,
        "message": str(problem),
    }


# --------------------------------------------------------------------------- explain


def _checked(check: Any) -> Any:
    """An argparse type from a meshward.policy.cases check: its ValueError is a usage error
    (exit 2) naming the flag, the same words `policy test` uses for a bad case field."""

    def parse(value: str) -> Any:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__.removeprefix("check_")
    return parse


def _header(value: str) -> tuple[str, str]:
    from meshward.policy.cases import check_header

    name, sep, val = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    try:
        return check_header(name.strip(), val)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _claims(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--claims is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--claims must be a JSON object")
    return parsed


def _configure_explain(sub: Any) -> None:
    from meshward.policy.cases import check_ip, check_method, check_principal

    p = sub.add_parser(
        "explain",
        help="decide one request and show why",
        description="Evaluate one request to a workload exactly as the mesh would (Istio order: "
        "CUSTOM, DENY, ALLOW; path normalized as Envoy normalizes it) and show the decision, "
        "the deciding policy and rule, dry-run and audit results, and for every policy "
        "selecting the workload which rule matched or which field did not.",
        epilog="examples:\n"
        "  meshward policy explain examples/ --workload shop/orders \\\n"
        "      --source-principal cluster.local/ns/shop/sa/frontend --method POST --path /orders\n"
        "  meshward policy explain examples/ --workload shop/payments --source-workload \\\n"
        "      shop/orders --method POST --path /charge --claims "
        '\'{"iss":"https://auth.shop.example","sub":"alice","scope":"payments:write"}\' --json\n'
        "  meshward policy explain examples/ --workload shop/payments --source-workload \\\n"
        "      shop/orders --method POST --path /payments --token-invalid   # HTTP 401\n\n"
        "--json prints an object with decision (allow|deny), status (200|400|401|403), policy "
        "(ns/name or null), rule "
        "(index or null),\nreason, dry_run (would-be decisions), audit, and per-policy traces.",
        formatter_class=RAW,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="policy file or directory")
    p.add_argument(
        "--workload",
        required=True,
        type=parse_workload_ref,
        metavar="NS/NAME",
        help="the destination workload (declared in the policy files)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--source-principal",
        type=_checked(check_principal),
        metavar="P",
        help="the caller's identity: spiffe://TD/ns/NS/sa/SA or Istio's TD/ns/NS/sa/SA "
        "(default: a plaintext caller with no identity)",
    )
    who.add_argument(
        "--source-workload",
        type=parse_workload_ref,
        metavar="NS/NAME",
        help="the caller as a declared workload (its SPIFFE ID and address)",
    )
    p.add_argument(
        "--method",
        type=_checked(check_method),
        default="GET",
        metavar="M",
        help="HTTP method (default: GET)",
    )
    p.add_argument(
        "--path",
        default="/",
        metavar="P",
        help="raw request path, query allowed (default: /); normalized like Envoy",
    )
    p.add_argument(
        "--port",
        type=port_number,
        metavar="N",
        help="destination port (default: the workload's first port)",
    )
    p.add_argument("--host", metavar="H", help="Host/:authority (default: the workload's name)")
    p.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="K=V",
        help="a request header (repeatable)",
    )
    p.add_argument(
        "--source-ip", type=_checked(check_ip), metavar="IP", help="the caller's IP address"
    )
    p.add_argument("--sni", metavar="NAME", help="TLS SNI the caller sent")
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--claims",
        type=_claims,
        metavar="JSON",
        help="already-verified JWT claims; iss and sub form the request principal ISS/SUB "
        "(default: no token)",
    )
    token.add_argument(
        "--token-invalid",
        action="store_true",
        help="the request carries an end-user token that does not verify: HTTP 401 where a "
        "RequestAuthentication selects the workload (as Envoy's jwt_authn answers)",
    )
    _add_now(p)
    add_json_flag(p)
    p.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    from meshward.policy import load
    from meshward.policy.cases import build_request
    from meshward.policy.explain import explain

    policy_set = load(args.paths)
    workload, request = build_request(
        policy_set,
        destination="/".join(args.workload),
        source="/".join(args.source_workload) if args.source_workload else None,
        principal=args.source_principal,
        method=args.method,
        path=args.path,
        port=args.port,
        host=args.host,
        headers=dict(args.header),
        claims=args.claims,
        source_ip=args.source_ip,
        sni=args.sni,
    )
    result = explain(
        policy_set, workload, request, now=_clock(args), token_invalid=args.token_invalid
    )
    if args.json:
        print_json(result.to_json())
    else:
        caller = request.source_principal or "a plaintext caller"
        print(
            f"{caller} -> {workload.ref}:{request.destination_port} {request.method} {request.path}"
        )
        print(result.render())
    return 0


# --------------------------------------------------------------------------- test


def _configure_test(sub: Any) -> None:
    p = sub.add_parser(
        "test",
        help="run table-driven expectations against policy files (a CI gate)",
        description="Evaluate every case in CASES.yaml against the policy files and compare "
        "with its expectation. Any mismatch prints a diff and the command exits 1.",
        epilog="cases file:\n"
        "  apiVersion: meshward.dev/v1\n"
        "  kind: PolicyTests            # so it can live beside the policies\n"
        "  now: 2026-01-01T00:00:00Z    # optional clock for expires-at\n"
        "  cases:\n"
        "    - name: frontend may create orders\n"
        "      from: shop/frontend      # or principal: spiffe://...; neither = plaintext\n"
        "      to: shop/orders\n"
        "      method: POST\n"
        "      path: /orders\n"
        "      expect: allow            # allow | deny\n"
        "      policy: shop/orders-allow-frontend   # optional, 'none' for no policy\n"
        "  optional per case: port, host, headers, claims, sourceIp, sni, now, rule,\n"
        "  dryRunDenies (list of dry-run policies that would deny), audit\n\n"
        "example:\n"
        "  meshward policy test examples/ --cases examples/cases.yaml",
        formatter_class=RAW,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="policy file or directory")
    p.add_argument("--cases", required=True, metavar="CASES.yaml", help="the expectations")
    p.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    add_json_flag(p)
    p.set_defaults(func=_test)


def _test(args: argparse.Namespace) -> int:
    from meshward.policy import load
    from meshward.policy.cases import load_cases, run_cases

    policy_set = load(args.paths)
    cases = load_cases(args.cases)
    results = run_cases(policy_set, cases, now=datetime.now(UTC))
    failed = [r for r in results if not r.passed]
    if args.json:
        print_json(
            {
                "passed": len(results) - len(failed),
                "failed": len(failed),
                "version": policy_set.version,
                "cases": [
                    {
                        "name": r.case.name,
                        "passed": r.passed,
                        "decision": r.decision.verdict if r.decision else None,
                        "policy": r.decision.policy if r.decision else None,
                        "rule": r.decision.rule if r.decision else None,
                        "reason": r.decision.reason if r.decision else r.error,
                        "mismatches": list(r.mismatches),
                    }
                    for r in results
                ],
            }
        )
    else:
        for result in results:
            if not result.passed or not args.quiet:
                print(result.render())
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# --------------------------------------------------------------------------- diff


def _configure_diff(sub: Any) -> None:
    p = sub.add_parser(
        "diff",
        help="list workload-to-workload flows a policy change allows or denies",
        description="Compare two policy sets (files or directories) and list every "
        "caller -> destination flow whose decision changes, probing each destination's "
        "ports and the methods, paths and token claims its policies mention in either version.",
        epilog="example:\n"
        "  git worktree add /tmp/before HEAD~1\n"
        "  meshward policy diff /tmp/before/examples examples/ --exit-code",
        formatter_class=RAW,
    )
    p.add_argument("old", metavar="OLD", help="the policy set before (file or directory)")
    p.add_argument("new", metavar="NEW", help="the policy set after (file or directory)")
    p.add_argument(
        "--exit-code", action="store_true", help="exit 1 when any flow changes (like git diff)"
    )
    _add_now(p)
    add_json_flag(p)
    p.set_defaults(func=_diff)


def _diff(args: argparse.Namespace) -> int:
    from meshward.policy import load
    from meshward.policy.diff import diff

    result = diff(load([args.old]), load([args.new]), now=_clock(args))
    if args.json:
        print_json(
            {
                "version_before": result.version_before,
                "version_after": result.version_after,
                "added_workloads": list(result.added_workloads),
                "removed_workloads": list(result.removed_workloads),
                "changes": [c.to_json() for c in result.changes],
            }
        )
    else:
        if result.version_before == result.version_after:
            print(f"no change: both versions are {result.version_after}")
        for ref in result.added_workloads:
            print(f"+ workload {ref}")
        for ref in result.removed_workloads:
            print(f"- workload {ref}")
        for change in result.changes:
            print(change.render())
        if result.version_before != result.version_after and not result.changes:
            print("no probed flow changes decision")
        elif result.changes:
            closed = sum(1 for c in result.changes if c.before.allowed)
            print(f"{closed} flow(s) now denied, {len(result.changes) - closed} now allowed")
    return 1 if args.exit_code and result.changed else 0
