"""`meshward policy suggest`: least-privilege AuthorizationPolicies from the flows the control
plane observed (``GET /flows/observed``) and the policy set it serves (``GET /policy``).

Thin: fetch -> :func:`meshward.flows.suggest.suggest` (pure) -> coverage and would-deny
(:mod:`meshward.flows.suggest_check`) -> files in --out, checked like `meshward policy validate`
does (loads, and passes the compiler's Envoy-limit check) -> a report, or ``--json``.
Exit status: 0 written and every used flow is allowed by the suggestion; 1 the control plane is
unreachable, the output does not validate, or coverage is below 100 %; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshward.cliutil import add_json_flag, admin_get, duration, print_json
from meshward.errors import UserError

HEADER = "# Suggested by `meshward policy suggest`"

EPILOG = """\
examples:
  meshward policy suggest --xds 127.0.0.1:15011 --out suggested/
  meshward policy suggest --xds 127.0.0.1:15011 --since 24h --namespace shop --out suggested/
  meshward policy suggest --xds 127.0.0.1:15011 --out policy/ --mode enforce --json

The loop: run with no AuthorizationPolicy (mTLS on, nothing denied) and let traffic flow; run
this; review the files; copy them into the policy directory in dry-run (the default: evaluated
and logged, never enforced); watch `meshward flows --xds ... --decision allow` for dry-run
would-denies; when there are none, rerun with --mode enforce (or delete the annotation).

Per workload, one AuthorizationPolicy allowing exactly what was observed ALLOWED: each caller as
a principal (a namespace only when every workload of it was seen with the same access), its
ports, methods and paths; ids in paths are already folded by the flow store (/orders/42 and
/orders/43 are /orders/{*}), nothing else is generalized. Denied flows are never read.
The report shows coverage (every observed flow replayed through the suggestion: 100 % must be
allowed), what the suggestion would deny that the current policy allows, flows it could not
express without widening (unknown or plaintext callers, paths the store folded into {other}),
and where the evidence is thin (flows seen once, a short window, callers seen only recently).
A workload nobody was observed calling (in --namespace, when given) gets allow-nothing (an ALLOW
policy without rules: every caller denied) and a no-callers warning, since a workload no policy
selects is open to every caller. Not when the control plane sent only part of the flows.
exit status: 0 written, 100 % coverage; 1 unreachable, invalid output or coverage below 100 %.
"""


def _get(address: str, path: str, params: dict[str, str], timeout: float) -> bytes:
    return admin_get(
        address, path, params, timeout,
        missing="this control plane collects no flows (started with --flows-db off?)"
        if path.startswith("/flows") else "",
    )  # fmt: skip


def current_policy(address: str, timeout: float) -> Any:
    """The policy set the control plane serves (parsed here: its version must match)."""
    from meshward.policy import PolicyError, parse

    text = _get(address, "/policy", {}, timeout).decode()
    first = text.split("\n", 1)[0]
    try:
        policy_set = parse({f"{address}/policy": text})
    except PolicyError as exc:
        raise UserError(f"{address}/policy does not load here: {exc}") from None
    if not first.endswith(policy_set.version):
        raise UserError(f"{address}/policy: version mismatch ({first!r} vs {policy_set.version})")
    return policy_set


def run(args: argparse.Namespace) -> int:
    from meshward.flows.suggest import Mode, ObservedFlow, suggest
    from meshward.flows.suggest_check import coverage, existing_allows, files, would_deny
    from meshward.xds.status_cli import default_admin

    address = args.xds or default_admin()
    now = datetime.now(UTC)
    since = now - args.since if args.since is not None else None
    policy_set = current_policy(address, args.timeout)
    if args.namespace and not any(w.namespace == args.namespace for w in policy_set.workloads):
        raise UserError(f"--namespace {args.namespace}: no workload of the policy set is in it")
    params = {"since": str(since.timestamp())} if since is not None else {}
    if args.namespace:
        params["namespace"] = args.namespace
    try:
        data = json.loads(_get(address, "/flows/observed", params, args.timeout))
        flows = [ObservedFlow.from_json(row) for row in data["rows"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{address}/flows/observed: unreadable answer ({exc})") from None
    mode = Mode(args.mode)
    truncated = bool(data.get("truncated"))
    suggestion = suggest(
        policy_set,
        flows,
        now=now,
        since=since,
        namespace=args.namespace,
        mode=mode,
        close_uncalled=not truncated,  # part of the flows: a workload's callers may be missing
    )
    cover = coverage(policy_set, suggestion, now=now)
    closing = would_deny(policy_set, suggestion, now=now)
    replaced = existing_allows(policy_set, suggestion)
    replacing = would_deny(policy_set, suggestion, now=now, replacing=True) if replaced else None
    written = _write(Path(args.out), files(suggestion))
    problem = _validate(policy_set, {p.ref for p in suggestion.policies}, written)
    report = {
        "xds": address,
        "policy_version": policy_set.version,
        "mode": mode.value,
        "window": {"start": _iso(suggestion.window[0]), "end": _iso(suggestion.window[1])},
        "flows_read": len(flows),
        "flows_truncated": truncated,
        "files": [
            {
                "file": str(path),
                "workload": ref,
                "rules": len(p.rules),
                "allow_nothing": ref in suggestion.closed,
            }
            for path, ref, p in zip(written, suggestion.workloads, suggestion.policies, strict=True)
        ],
        "closed": list(suggestion.closed),
        "coverage": cover.to_json(),
        "would_deny": {
            "changes": [c.to_json() for c in closing.changes],
            "truncated": closing.truncated,
        },
        "replaces": list(replaced),
        "would_deny_replacing": None
        if replacing is None
        else {
            "changes": [c.to_json() for c in replacing.changes],
            "truncated": replacing.truncated,
        },
        "skipped": [n.to_json() for n in suggestion.skipped],
        "warnings": [n.to_json() for n in suggestion.warnings],
        "valid": problem is None,
        "validation_error": problem,
    }
    if args.json:
        print_json(report)
    else:
        _print(report, suggestion, closing, replacing)
    return 0 if problem is None and cover.allowed == cover.total else 1


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _write(out: Path, texts: dict[str, str]) -> list[Path]:
    """Each file atomically; a file there that this command did not write is never replaced."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, text in texts.items():
        path = out / f"suggested-{name}"
        if path.exists():
            try:
                head = path.read_text(errors="replace")[: len(HEADER)]
            except OSError as exc:
                raise UserError(f"cannot read {path}: {exc}") from None
            if head != HEADER:
                raise UserError(f"{path} exists and was not written by `policy suggest`: not "
                                "replacing it (choose another --out)")  # fmt: skip
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _validate(policy_set: Any, refs: set[str], written: list[Path]) -> str | None:
    """The written files load beside the current set (less the policies they replace) and
    pass the compiler's Envoy-limit check, as `meshward policy validate` requires."""
    from meshward.compile.envoy_limits import check_policy_set
    from meshward.policy import PolicyError, PolicySet, parse

    rest = PolicySet.create(
        mesh=policy_set.mesh,
        workloads=policy_set.workloads,
        authorization_policies=[p for p in policy_set.authorization_policies if p.ref not in refs],
        peer_authentications=policy_set.peer_authentications,
        request_authentications=policy_set.request_authentications,
    )
    texts = {"(the current policy set)": rest.dump()}
    for path in written:
        texts[str(path)] = path.read_text()
    try:
        check_policy_set(parse(texts))
    except PolicyError as exc:
        return str(exc)
    return None


def _print(report: dict[str, Any], suggestion: Any, closing: Any, replacing: Any) -> None:
    files = report["files"]
    window = report["window"]
    print(
        f"{len(files)} AuthorizationPolicy file(s) ({report['mode']}) from "
        f"{len(suggestion.used)} allowed flow(s) observed {window['start']} .. {window['end']}:"
    )
    for f in files:
        what = (
            "allow nothing: no caller observed" if f["allow_nothing"] else f"{f['rules']} rule(s)"
        )
        print(f"  {f['file']}  ({f['workload']}, {what})")
    if report["flows_truncated"]:
        print("WARNING: the control plane sent only part of the flows (over its row limit)")
    cov = report["coverage"]
    print(f"coverage: {cov['allowed']}/{cov['flows']} observed allowed flows allowed by the "
          f"suggestion ({cov['percent']}%)")  # fmt: skip
    for d in cov["denied"]:
        print(f"  NOT ALLOWED: {d['flow']}: {d['reason']}")
    print("valid: yes" if report["valid"] else f"valid: NO\n{report['validation_error']}")
    _print_closing("would deny once enforced (allowed by the current policy)", closing)
    if replacing is not None:
        print(f"note: {', '.join(report['replaces'])} already allow(s) traffic to these "
              "workloads; ALLOW policies add up, so next to them the suggestion narrows "
              "nothing.")  # fmt: skip
        _print_closing("would deny if it replaced them", replacing)
    if suggestion.skipped:
        print(f"skipped (not expressible without widening): {len(suggestion.skipped)}")
        for n in suggestion.skipped:
            print(f"  [{n.kind}] {n.flow}: {n.message}" if n.flow else f"  [{n.kind}] {n.message}")
    if suggestion.warnings:
        print(f"thin evidence: {len(suggestion.warnings)} warning(s)")
        for n in suggestion.warnings:
            print(f"  [{n.kind}] {n.flow}: {n.message}" if n.flow else f"  [{n.kind}] {n.message}")


def _print_closing(title: str, closing: Any) -> None:
    pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for c in closing.changes:
        pairs[(c.source, c.destination)].append(f"{c.probe.method} :{c.probe.port}{c.probe.path}")
    more = " (truncated)" if closing.truncated else ""
    print(f"{title}: {len(closing.changes)} probe(s) on {len(pairs)} caller -> workload "
          f"pair(s){more}")  # fmt: skip
    for (src, dst), probes in sorted(pairs.items()):
        shown = ", ".join(probes[:4]) + (f", +{len(probes) - 4}" if len(probes) > 4 else "")
        print(f"  {src} -> {dst}: {shown}")


def configure_suggest(sub: Any) -> None:
    from meshward.xds.status_cli import add_admin_flags

    p = sub.add_parser(
        "suggest",
        help="least-privilege AuthorizationPolicies from observed allowed flows",
        description="Write, per workload, the AuthorizationPolicy that allows exactly the "
        "flows the control plane observed ALLOWED, and report coverage, what it would deny "
        "and where the evidence is thin.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_admin_flags(p)
    p.add_argument("--since", type=duration, metavar="DURATION",
                   help="only flows seen in this window, e.g. 24h, 7d (default: all kept)")  # fmt: skip
    p.add_argument("--namespace", metavar="NS", help="only workloads (callees) in NS")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where to write suggested-<ns>.<workload>.yaml (created if missing)")  # fmt: skip
    p.add_argument("--mode", choices=["dry-run", "enforce"], default="dry-run",
                   help="dry-run (default): annotated istio.io/dry-run, evaluated and logged "
                        "but never enforced; enforce: no annotation")  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=run)
