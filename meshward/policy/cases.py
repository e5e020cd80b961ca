"""Table-driven policy expectations (`meshward policy test`): a CI gate that fails with a diff
when a policy change flips a decision someone wrote down.

A cases file is YAML with ``kind: PolicyTests`` (so it can sit beside the policies it tests;
the loader skips it)::

    apiVersion: meshward.dev/v1
    kind: PolicyTests
    now: 2026-01-01T00:00:00Z        # optional clock for expiry, per file or per case
    cases:
      - name: frontend may create orders
        to: shop/orders              # destination workload
        from: shop/frontend          # caller workload (its SPIFFE ID); or `principal:`;
                                     # neither means a plaintext caller
        method: POST                 # default GET
        path: /orders                # default /
        port: 8080                   # default: the destination's first port
        claims: {iss: ..., sub: ...} # verified JWT claims; omit for no token
        expect: allow                # allow | deny
        policy: shop/orders-allow    # optional: the deciding policy ("none": no policy)
        rule: 0                      # optional
        dryRunDenies: [shop/x]       # optional: dry-run policies that would deny (exact set)
        audit: false                 # optional
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from meshward.policy.errors import PolicyError, Problem
from meshward.policy.evaluator import evaluate
from meshward.policy.loader import MESHWARD_API_VERSION
from meshward.policy.model import Decision, Request, Workload
from meshward.policy.policyset import PolicySet

CASE_FIELDS = (
    "name",
    "to",
    "from",
    "principal",
    "method",
    "path",
    "port",
    "host",
    "headers",
    "claims",
    "sourceIp",
    "sni",
    "now",
    "expect",
    "policy",
    "rule",
    "dryRunDenies",
    "audit",
)


# What a mesh caller's identity looks like: Istio's TD/ns/NS/sa/SA, optionally spiffe://-prefixed.
_PRINCIPAL = re.compile(r"(?:spiffe://)?[a-z0-9._-]+/ns/[A-Za-z0-9._-]+/sa/[A-Za-z0-9._-]+")
# RFC 9110 5.6.2 token: what a method and a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_principal(value: str) -> str:
    """A caller identity as `explain`/`test` take it; ValueError saying what it should be."""
    if _PRINCIPAL.fullmatch(value) is None:
        raise ValueError(
            f"{value!r} is not a mesh identity: expected spiffe://TRUST_DOMAIN/ns/NS/sa/SA or "
            "TRUST_DOMAIN/ns/NS/sa/SA (e.g. cluster.local/ns/shop/sa/frontend); to call as a "
            "declared workload, name it as NS/NAME instead (--source-workload, or from:)"
        )
    return value


def check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (e.g. 10.0.0.7 or fd00::7)") from None


def check_port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{value!r} is not a port number (1-65535)")
    return value


def check_method(value: str) -> str:
    if _TOKEN.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not an HTTP method (a token such as GET or POST)")
    return value


def check_header(name: str, value: str) -> tuple[str, str]:
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"header name {name!r} is not an HTTP token (e.g. x-request-id)")
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"header {name!r}: a value must not hold CR, LF or NUL")
    return name.lower(), value


DOC_FIELDS = ("apiVersion", "kind", "metadata", "now", "cases")


def _did_you_mean(key: object, fields: Sequence[str]) -> str:
    """`` (did you mean 'sourceIp'?)`` for a near miss (case-insensitively too: ``sourceip``),
    else the list of fields, so a typo in a case is fixed without opening the docs."""
    text = str(key)
    by_lower = {f.lower(): f for f in fields}
    close = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {by_lower[close[0]]!r}?)"
    return f" (expected one of: {', '.join(fields)})"


@dataclass(frozen=True)
class Case:
    name: str
    to: str
    expect: str  # "allow" | "deny"
    source: str | None = None  # workload ref
    principal: str | None = None  # full SPIFFE URI
    method: str = "GET"
    path: str = "/"
    port: int | None = None
    host: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    claims: Mapping[str, Any] | None = None
    source_ip: str | None = None
    sni: str | None = None
    now: datetime | None = None
    policy: str | None = None
    expect_policy: bool = False  # whether `policy` was given (None is a valid expectation)
    rule: int | None = None
    dry_run_denies: tuple[str, ...] | None = None
    audit: bool | None = None
    where: str = ""

    def build(self, policy_set: PolicySet) -> tuple[Workload, Request]:
        """The destination workload and the request this case describes."""
        return build_request(
            policy_set,
            destination=self.to,
            source=self.source,
            principal=self.principal,
            method=self.method,
            path=self.path,
            port=self.port,
            host=self.host,
            headers=self.headers,
            claims=self.claims,
            source_ip=self.source_ip,
            sni=self.sni,
        )


def build_request(
    policy_set: PolicySet,
    *,
    destination: str,
    source: str | None = None,
    principal: str | None = None,
    method: str = "GET",
    path: str = "/",
    port: int | None = None,
    host: str | None = None,
    headers: Mapping[str, str] | None = None,
    claims: Mapping[str, Any] | None = None,
    source_ip: str | None = None,
    sni: str | None = None,
) -> tuple[Workload, Request]:
    """Shared by `explain`, `test` and `diff`: names resolve against the policy set, the port
    defaults to the destination's first port and the host to the destination's name."""
    from meshward.errors import UserError

    try:
        if principal is not None:
            check_principal(principal)
        if source_ip is not None:
            source_ip = check_ip(source_ip)
        if port is not None:
            check_port(port)
        check_method(method)
        headers = dict(check_header(k, v) for k, v in (headers or {}).items())
    except ValueError as exc:
        raise UserError(str(exc)) from None
    workload = policy_set.workload(destination)
    if workload is None:
        raise UserError(f"unknown workload {destination!r}{_known(policy_set, destination)}")
    td = policy_set.mesh.trust_domain
    if source is not None:
        caller = policy_set.workload(source)
        if caller is None:
            raise UserError(
                f"unknown source workload {source!r}{_known(policy_set, source)}; "
                "declare it as a Workload"
            )
        principal = caller.spiffe_id(td)
        source_ip = source_ip or caller.address
    elif principal is not None and not principal.startswith("spiffe://"):
        principal = "spiffe://" + principal
    if port is None:
        port = workload.ports[0].port if workload.ports else 0
    return workload, Request(
        method=method,
        path=path,
        host=workload.name if host is None else host,
        destination_port=port,
        source_principal=principal,
        source_ip=source_ip,
        destination_ip=workload.address,
        headers={k.lower(): v for k, v in (headers or {}).items()},
        claims=dict(claims) if claims is not None else None,
        sni=sni,
    )


def _known(policy_set: PolicySet, ref: str) -> str:
    refs = [w.ref for w in policy_set.workloads]
    close = difflib.get_close_matches(ref, refs, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f" ({hint}known: {', '.join(refs) or 'none declared'})"


@dataclass(frozen=True)
class CaseResult:
    case: Case
    decision: Decision | None
    mismatches: tuple[str, ...]
    error: str | None = None

    @property
    def passed(self) -> bool:
        return not self.mismatches and self.error is None

    def render(self) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'} {self.case.name}"
        if self.passed:
            return head
        lines = [f"{head}  ({self.case.where})"]
        if self.error:
            lines.append(f"    error: {self.error}")
        lines.extend(f"    {m}" for m in self.mismatches)
        return "\n".join(lines)


def load_cases(path: str | Path) -> tuple[Case, ...]:
    from meshward.errors import UserError

    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"cases file {file} does not exist (--cases CASES.yaml)") from None
    except IsADirectoryError:
        raise UserError(f"cases file {file} is a directory; --cases takes one YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise UserError(f"cannot read cases file {file}: {reason}") from None
    return parse_cases(file, text)


def parse_cases(file: str, text: str) -> tuple[Case, ...]:
    problems: list[Problem] = []
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise PolicyError(
            [Problem(file, 0, "", f"invalid YAML: {exc}")], where="the cases file"
        ) from exc
    cases: list[Case] = []
    for index, doc in enumerate(docs, start=1):

        def err(field: str, reason: str, index: int = index) -> None:
            problems.append(Problem(file, index, field, reason))

        if not isinstance(doc, dict) or doc.get("kind") != "PolicyTests":
            err("kind", "expected a PolicyTests document (kind: PolicyTests)")
            continue
        if doc.get("apiVersion") != MESHWARD_API_VERSION:
            err("apiVersion", f"expected {MESHWARD_API_VERSION}")
        for key in doc:
            if key not in DOC_FIELDS:
                err(str(key), f"unknown field{_did_you_mean(key, DOC_FIELDS)}")
        default_now = _time(doc.get("now"), "now", err)
        raw_cases = doc.get("cases")
        if not isinstance(raw_cases, list) or not raw_cases:
            err("cases", "expected a non-empty list of cases")
            continue
        for i, raw in enumerate(raw_cases):
            case = _case(raw, f"cases[{i}]", err, default_now, f"{file}#{index} cases[{i}]")
            if case is not None:
                cases.append(case)
    if problems:
        raise PolicyError(problems, where="the cases file")
    return tuple(cases)


def _time(value: Any, field: str, err: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).upper())
        except ValueError:
            err(field, f"{value!r} is not an RFC 3339 timestamp")
            return None
    if parsed.tzinfo is None:
        err(field, "needs a time zone (e.g. a trailing Z)")
        return None
    return parsed.astimezone(UTC)


def _case(raw: Any, path: str, err: Any, default_now: datetime | None, where: str) -> Case | None:
    if not isinstance(raw, dict):
        err(path, "expected a mapping")
        return None
    bad = False
    for key in raw:
        if key not in CASE_FIELDS:
            err(f"{path}.{key}", f"unknown field{_did_you_mean(key, CASE_FIELDS)}")
            bad = True

    def text(key: str, *, required: bool = False) -> str | None:
        nonlocal bad
        value = raw.get(key)
        if value is None:
            if required:
                err(f"{path}.{key}", "required")
                bad = True
            return None
        if not isinstance(value, str):
            err(f"{path}.{key}", "expected a string")
            bad = True
            return None
        return value

    to = text("to", required=True)
    expect = text("expect", required=True)
    if expect is not None and expect not in ("allow", "deny"):
        err(f"{path}.expect", 'expected "allow" or "deny"')
        bad = True
    if raw.get("from") is not None and raw.get("principal") is not None:
        err(path, "set either from (a workload) or principal, not both")
        bad = True
    port = raw.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
        err(f"{path}.port", "expected a port number")
        bad = True
    rule = raw.get("rule")
    if rule is not None and (not isinstance(rule, int) or isinstance(rule, bool)):
        err(f"{path}.rule", "expected a rule index")
        bad = True
    for key in ("headers", "claims"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            err(f"{path}.{key}", "expected a mapping")
            bad = True
    dry = raw.get("dryRunDenies")
    if dry is not None and (not isinstance(dry, list) or not all(isinstance(d, str) for d in dry)):
        err(f"{path}.dryRunDenies", "expected a list of policy refs (ns/name)")
        bad = True
    audit = raw.get("audit")
    if audit is not None and not isinstance(audit, bool):
        err(f"{path}.audit", "expected true or false")
        bad = True
    policy = text("policy")
    when = _time(raw.get("now"), f"{path}.now", err) or default_now
    name = text("name") or f"{path}"
    source, principal = text("from"), text("principal")
    method, req_path, host = text("method"), text("path"), text("host")
    source_ip, sni = text("sourceIp"), text("sni")
    checks: tuple[tuple[str, object, Callable[[Any], object]], ...] = (
        ("principal", principal, check_principal),
        ("sourceIp", source_ip, check_ip),
        ("method", method, check_method),
        ("port", port if type(port) is int else None, check_port),
    )
    for key, value, check in checks:
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                err(f"{path}.{key}", str(exc))
                bad = True
    if bad or to is None or expect is None:
        return None
    return Case(
        name=name,
        to=to,
        expect=expect,
        source=source,
        principal=principal,
        method=method or "GET",
        path=req_path or "/",
        port=port,
        host=host,
        headers={str(k): str(v) for k, v in (raw.get("headers") or {}).items()},
        claims=raw.get("claims"),
        source_ip=source_ip,
        sni=sni,
        now=when,
        policy=None if policy in (None, "none") else policy,
        expect_policy="policy" in raw,
        rule=rule,
        dry_run_denies=tuple(sorted(dry)) if dry is not None else None,
        audit=audit,
        where=where,
    )


def run_case(policy_set: PolicySet, case: Case, *, now: datetime) -> CaseResult:
    """Run one case at its own ``now:`` if it names one, else at ``now`` (the caller's clock)."""
    from meshward.errors import UserError

    try:
        workload, request = case.build(policy_set)
    except UserError as exc:
        return CaseResult(case, None, (), str(exc))
    decision = evaluate(policy_set, workload, request, now=case.now or now)
    mismatches: list[str] = []

    def check(what: str, expected: object, actual: object) -> None:
        if expected != actual:
            mismatches.append(f"{what}: - expected {expected!r}")
            mismatches.append(f"{' ' * len(what)}  + actual   {actual!r}")

    check("decision", case.expect, decision.verdict)
    if case.expect_policy:
        check("policy", case.policy, decision.policy)
    if case.rule is not None:
        check("rule", case.rule, decision.rule)
    if case.dry_run_denies is not None:
        actual = tuple(sorted(r.policy for r in decision.dry_run if r.would_deny))
        check("dry-run denies", list(case.dry_run_denies), list(actual))
    if case.audit is not None:
        check("audit", case.audit, decision.audit)
    if mismatches:
        mismatches.append(f"reason: {decision.reason}")
    return CaseResult(case, decision, tuple(mismatches))


def run_cases(policy_set: PolicySet, cases: Sequence[Case], *, now: datetime) -> list[CaseResult]:
    return [run_case(policy_set, c, now=now) for c in cases]
