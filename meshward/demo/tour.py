"""The scripted tour: the calls (data), and a runner that makes them and says who decided each.

Calls are made the way an application would make them: to the caller's own sidecar (its
outbound listener for the callee), which opens mTLS with the caller's SVID, so the callee's
sidecar sees the caller's real identity. Each call carries its own ``x-request-id`` and W3C
``traceparent``; the runner finds the callee's access-log line by request id and, through the
trace id, the ext_authz decision-log lines (meshward.flows.evidence), then judges the result
against the expectation (pure: :func:`judge`).

The runner needs only a :class:`~meshward.demo.state.DemoState`, so the same tour runs against
the local demo and the docker-compose topology.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshward.demo import status_poll
from meshward.demo.state import DemoState
from meshward.flows import evidence
from meshward.flows.evidence import EXTAUTHZ, MTLS, NO_ROUTE, RBAC
from meshward.telemetry.limits import read_rotated

ALLOW, DENY = "allow", "deny"
NONE = "none"  # expected policy: no rule matched
CACHE_MISS, CACHE_HIT, NOT_ASKED = "miss", "hit", "not asked"  # ext_authz, per request
LIVE_EDIT_FILE = "tour-live-edit.yaml"
CUSTOM_EDIT_FILE = "tour-custom.yaml"


def _drain_seconds() -> float:
    """Envoy's --drain-time-s as the demo's sidecars run (meshward.xds.bootstrap.ENVOY_ARGS)."""
    from meshward.xds.bootstrap import ENVOY_ARGS

    args = list(ENVOY_ARGS)
    return float(args[args.index("--drain-time-s") + 1]) if "--drain-time-s" in args else 5.0


LISTENER_SETTLE = _drain_seconds() + 1.0


@dataclass(frozen=True)
class Call:
    section: str
    source: str | None  # "ns/name"; None: a client without a sidecar (plaintext)
    target: str
    method: str
    path: str
    expect: str  # ALLOW or DENY
    decider: str | None = None  # expected: evidence.RBAC, EXTAUTHZ or MTLS
    policy: str | None = None  # expected deciding policy "ns/name", or NONE
    rule: int | None = None
    scope: str | None = None  # send an end-user JWT with this scope
    would_deny: tuple[str, ...] | None = None  # expected dry-run would-denies (None: unchecked)
    note: str = ""
    # expected ext_authz involvement, from its metadata in the callee's access log: CACHE_MISS
    # (it evaluated the policy), CACHE_HIT (its decision cache answered), NOT_ASKED; None: unchecked
    extauthz: str | None = None

    @property
    def who(self) -> str:
        source = self.source.split("/")[1] if self.source else "(no sidecar)"
        return f"{source} -> {self.target.split('/')[1]}"

    @property
    def request(self) -> str:
        return f"{self.method} {self.path}" + (f" [JWT {self.scope}]" if self.scope else "")


@dataclass(frozen=True)
class PolicyEdit:
    section: str
    title: str
    file: str
    content: str | None  # None: remove the file (revert)
    # Seconds to wait once every sidecar ACKed: an edit that adds or removes ext_authz
    # replaces the listener, and a connection opened before (the caller's sidecar pools them)
    # keeps the old filter chain until Envoy's drain time closes it.
    settle: float = 0.0


Step = Call | PolicyEdit

LIVE_DENY = """\
# Written by the demo tour's live edit into the demo's copy of the policies; removed again.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: orders-deny-frontend-post
  namespace: shop
spec:
  selector:
    matchLabels:
      app: orders
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/frontend"]
      to:
        - operation:
            methods: ["POST"]
"""

CUSTOM_COSTS = """\
# Written by the demo tour into the demo's copy of the policies; removed again.
# Supplier costs need an external approval service (action: CUSTOM). Meshward sends the
# requests these rules match, and only those, to its ext_authz service, which asks the provider
# named here; the demo runs no such provider, so ext_authz denies them (fail closed) and caches
# the decision.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: inventory-costs-need-approval
  namespace: shop
spec:
  selector:
    matchLabels:
      app: inventory
  action: CUSTOM
  provider:
    name: cost-approvals
  rules:
    - to:
        - operation:
            paths: ["/inventory/costs", "/inventory/costs/*"]
"""

FE, ORD, PAY, INV, SCR = (
    "shop/frontend",
    "shop/orders",
    "shop/payments",
    "shop/inventory",
    "shop/scraper",
)
S_ORDERS = "orders: the frontend may read and create orders, nothing else"
S_PAY = (
    "payments: orders may charge only for an end user holding payments:write "
    "(Envoy: jwt_authn + RBAC)"
)
S_ADMIN = "payments /admin: nobody, whatever their token or path tricks"
S_INV = "inventory: read-only to orders"
S_SCRAPER = "scraper: GET /metrics everywhere; a dry-run tightening reports what it would break"
S_EMERGENCY = "emergency allow with an expiry (meshward.dev/expires-at 2099-12-31T23:59:59Z)"
S_REFUSED = "refused before any HTTP: STRICT mTLS, and no route where no policy could allow"
S_LIVE = "live policy edit: deny frontend -> orders POST, then revert"
S_CUSTOM = (
    "CUSTOM policy: ext_authz decides only what its rules match, and caches (inventory costs)"
)
COSTS_POLICY = "shop/inventory-costs-need-approval"

TOUR: tuple[Step, ...] = (
    Call(S_ORDERS, FE, ORD, "GET", "/orders/42", ALLOW, RBAC, "shop/orders-allow-frontend", 0),
    Call(S_ORDERS, FE, ORD, "POST", "/orders", ALLOW, RBAC, "shop/orders-allow-frontend", 0),
    Call(S_ORDERS, FE, ORD, "DELETE", "/orders/42", DENY, RBAC, NONE),
    Call(S_PAY, ORD, PAY, "POST", "/payments", ALLOW, RBAC,
         "shop/payments-allow-orders-with-user", 0, scope="payments:write",
         note="jwt_authn verified the token; RBAC matched iss, sub and scope in its payload"),
    Call(S_PAY, ORD, PAY, "POST", "/payments", DENY, RBAC, NONE,
         note="no end-user token: no request principal"),
    Call(S_PAY, ORD, PAY, "POST", "/payments", DENY, RBAC, NONE, scope="payments:read",
         note="token lacks payments:write"),
    Call(S_ADMIN, ORD, PAY, "POST", "/admin", DENY, RBAC, "shop/payments-deny-admin", 0,
         scope="payments:write", note="a valid token does not open /admin"),
    Call(S_ADMIN, ORD, PAY, "POST", "/payments/../admin/users", DENY, RBAC,
         "shop/payments-deny-admin", 0, note="dot-segments are normalized before RBAC matches"),
    Call(S_ADMIN, SCR, PAY, "GET", "/admin", DENY, RBAC, "shop/payments-deny-admin", 0,
         would_deny=("shop/payments-deny-scraper",)),
    Call(S_INV, ORD, INV, "GET", "/inventory/sku-123", ALLOW, RBAC,
         "shop/inventory-allow-orders-read", 0),
    Call(S_INV, ORD, INV, "POST", "/inventory/sku-123", DENY, RBAC, NONE),
    *(
        Call(S_SCRAPER, SCR, target, "GET", "/metrics", ALLOW, RBAC,
             "shop/shop-allow-scraper-metrics", 0,
             would_deny=("shop/payments-deny-scraper",) if target == PAY else ())
        for target in (FE, ORD, INV, PAY)
    ),
    Call(S_EMERGENCY, FE, INV, "GET", "/inventory/sku-123", ALLOW, RBAC,
         "shop/inventory-emergency-allow-frontend", 0,
         note="stops applying by itself at the expiry"),
    Call(S_REFUSED, None, ORD, "GET", "/orders", DENY, MTLS,
         note="a client without a sidecar has no certificate"),
    Call(S_REFUSED, FE, PAY, "GET", "/payments", DENY, NO_ROUTE,
         note="no policy lets the frontend call payments, so its sidecar has no listener for it"),
    Call(S_LIVE, FE, ORD, "POST", "/orders", ALLOW, RBAC, "shop/orders-allow-frontend", 0,
         note="before the edit"),
    PolicyEdit(S_LIVE, "add DENY shop/orders-deny-frontend-post (frontend, POST)", LIVE_EDIT_FILE,
               LIVE_DENY),
    Call(S_LIVE, FE, ORD, "POST", "/orders", DENY, RBAC, "shop/orders-deny-frontend-post", 0,
         note="after the edit converged (a route update: open connections see it at once)"),
    Call(S_LIVE, FE, ORD, "GET", "/orders/42", ALLOW, RBAC, "shop/orders-allow-frontend", 0,
         note="GET is untouched"),
    PolicyEdit(S_LIVE, "revert: remove shop/orders-deny-frontend-post", LIVE_EDIT_FILE, None),
    Call(S_LIVE, FE, ORD, "POST", "/orders", ALLOW, RBAC, "shop/orders-allow-frontend", 0,
         note="after the revert converged"),
    Call(S_CUSTOM, ORD, INV, "GET", "/inventory/costs/sku-123", ALLOW, RBAC,
         "shop/inventory-allow-orders-read", 0, extauthz=NOT_ASKED, note="before the edit"),
    PolicyEdit(S_CUSTOM, f"add CUSTOM {COSTS_POLICY} (/inventory/costs*: provider cost-approvals)",
               CUSTOM_EDIT_FILE, CUSTOM_COSTS, settle=LISTENER_SETTLE),
    Call(S_CUSTOM, ORD, INV, "GET", "/inventory/costs/sku-123", DENY, EXTAUTHZ, COSTS_POLICY, 0,
         extauthz=CACHE_MISS,
         note="ext_authz evaluated it: no provider cost-approvals answers, so it denies "
              "(fail closed)"),
    Call(S_CUSTOM, ORD, INV, "GET", "/inventory/costs/sku-123", DENY, EXTAUTHZ, COSTS_POLICY, 0,
         extauthz=CACHE_HIT, note="the repeat: ext_authz's decision cache answered"),
    Call(S_CUSTOM, ORD, INV, "GET", "/inventory/sku-123", ALLOW, RBAC,
         "shop/inventory-allow-orders-read", 0, extauthz=NOT_ASKED,
         note="no CUSTOM rule matches: Envoy decides alone, ext_authz is never asked"),
    PolicyEdit(S_CUSTOM, f"revert: remove {COSTS_POLICY}", CUSTOM_EDIT_FILE, None,
               settle=LISTENER_SETTLE),
    Call(S_CUSTOM, ORD, INV, "GET", "/inventory/costs/sku-123", ALLOW, RBAC,
         "shop/inventory-allow-orders-read", 0, extauthz=NOT_ASKED,
         note="after the revert: no ext_authz on inventory at all"),
)  # fmt: skip


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallResult:
    index: int
    call: Call
    status: int
    actual: str
    decider: str
    policy: str | None
    rule: int | None
    reason: str
    would_deny: tuple[str, ...]
    trace_id: str
    request_id: str
    problems: tuple[str, ...] = ()
    extauthz: str = ""  # CACHE_MISS, CACHE_HIT, NOT_ASKED, or "" (no access-log line)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def rule_ref(self) -> str:
        if self.policy is None:
            return "-"
        return self.policy if self.rule is None else f"{self.policy}#{self.rule}"

    def to_json(self) -> dict[str, Any]:
        c = self.call
        return {
            "index": self.index,
            "kind": "call",
            "section": c.section,
            "source": c.source,
            "target": c.target,
            "method": c.method,
            "path": c.path,
            "token_scope": c.scope,
            "expected": c.expect,
            "expected_decider": c.decider,
            "expected_policy": c.policy,
            "actual": self.actual,
            "status": self.status,
            "decider": self.decider,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "would_deny": list(self.would_deny),
            "expected_extauthz": c.extauthz,
            "extauthz": self.extauthz,
            "trace_id": self.trace_id,
            "request_id": self.request_id,
            "ok": self.ok,
            "problems": list(self.problems),
            "note": c.note,
        }


@dataclass(frozen=True)
class EditResult:
    index: int
    edit: PolicyEdit
    policy_version: str
    seconds: float
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": "policy-edit",
            "section": self.edit.section,
            "title": self.edit.title,
            "file": self.edit.file,
            "policy_version": self.policy_version,
            "converged_seconds": round(self.seconds, 3),
            "ok": self.ok,
            "problems": list(self.problems),
        }


Result = CallResult | EditResult


@dataclass
class TourResult:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def to_json(self) -> dict[str, Any]:
        calls = [r for r in self.results if isinstance(r, CallResult)]
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "calls": len(calls),
            "expectations_held": sum(1 for r in self.results if r.ok),
            "steps": [r.to_json() for r in self.results],
        }


# -- judging (pure) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    status: int  # 0: no HTTP response (connection refused, reset, TLS required)
    body: str
    error: str = ""  # exception class name when status == 0


def judge(
    index: int,
    call: Call,
    response: Response,
    verdict: evidence.Verdict | None,
    *,
    request_id: str,
    trace_id: str,
) -> CallResult:
    actual = ALLOW if 0 < response.status < 400 else DENY
    problems: list[str] = []
    if call.source is None:
        # No sidecar on the caller's side: an mTLS-only listener closes the connection.
        refused = response.status == 0 and response.error != "ConnectionRefusedError"
        decider = MTLS if refused else "?"
        policy, rule = None, None
        reason = (
            "no client certificate: the STRICT mTLS listener closed the connection"
            if refused
            else (response.error or f"HTTP {response.status}")
        )
        would_deny: tuple[str, ...] = ()
        if response.error == "ConnectionRefusedError":
            problems.append("nothing listens on the inbound port (is the sidecar up?)")
    elif call.decider == NO_ROUTE and response.error == "ConnectionRefusedError":
        decider, policy, rule, would_deny = NO_ROUTE, None, None, ()
        reason = "the caller's sidecar has no outbound listener for the callee"
    elif verdict is None:
        decider, policy, rule, would_deny = "?", None, None, ()
        reason = response.error or f"HTTP {response.status}"
        problems.append("no access-log line for this request on the callee's sidecar")
    else:
        decider, policy, rule = verdict.decider, verdict.policy, verdict.rule
        reason, would_deny = verdict.reason, verdict.would_deny
        trace_id = verdict.trace_id or trace_id
    if actual != call.expect:
        problems.append(f"expected {call.expect}, got {actual} (HTTP {response.status})")
    if call.decider is not None and decider != call.decider:
        problems.append(f"expected {call.decider} to decide, not {decider}")
    if call.policy is not None:
        want = None if call.policy == NONE else call.policy
        if policy != want or (want is not None and call.rule is not None and rule != call.rule):
            got = "no rule" if policy is None else f"{policy}#{rule}"
            wanted = "no rule" if want is None else f"{want}#{call.rule}"
            problems.append(f"expected {wanted} to decide, not {got}")
    if call.would_deny is not None and sorted(would_deny) != sorted(call.would_deny):
        problems.append(
            f"expected dry-run would-deny {list(call.would_deny)}, got {list(would_deny)}"
        )
    asked = extauthz_involvement(verdict) if verdict is not None else ""
    if call.extauthz is not None and verdict is not None and asked != call.extauthz:
        problems.append(f"expected ext_authz {call.extauthz}, got {asked}")
    return CallResult(
        index=index,
        call=call,
        status=response.status,
        actual=actual,
        decider=decider,
        policy=policy,
        rule=rule,
        reason=reason,
        would_deny=would_deny,
        trace_id=trace_id,
        request_id=request_id,
        problems=tuple(problems),
        extauthz=asked,
    )


def extauthz_involvement(verdict: evidence.Verdict) -> str:
    """What ext_authz did for the request, from the metadata it returned (the access log's
    ``ext_authz`` field): no metadata means Envoy never asked it."""
    meta = verdict.raw.get("ext_authz")
    if not isinstance(meta, dict) or not meta:
        return NOT_ASKED
    cache = meta.get("cache")
    return cache if cache in (CACHE_MISS, CACHE_HIT) else "uncached"


# -- running ---------------------------------------------------------------------------------------
def request_key(request_id: str) -> str:
    """Envoy rewrites the UUID version digit of x-request-id to record its trace decision;
    compare ids without it."""
    if len(request_id) == 36 and request_id[14:15].isalnum():
        return request_id[:14] + "_" + request_id[15:]
    return request_id


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def send(
    address: str, method: str, path: str, headers: dict[str, str], timeout: float = 5.0
) -> Response:
    host, port = _split(address)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=b"{}" if method in ("POST", "PUT") else None,
                           headers=headers)  # fmt: skip
        response = connection.getresponse()
        return Response(response.status, response.read().decode(errors="replace"))
    except (OSError, http.client.HTTPException) as exc:
        return Response(0, str(exc), type(exc).__name__)
    finally:
        connection.close()


class Runner:
    """Runs the tour against ``state``; ``progress`` gets one line per step as it happens."""

    def __init__(
        self,
        state: DemoState,
        *,
        tracer: Any = None,  # an OpenTelemetry tracer: each call becomes a client span
        progress: Callable[[str], None] | None = None,
        evidence_timeout: float = 8.0,
        converge_timeout: float = 30.0,
        check_alive: Callable[[], None] | None = None,
        each_call: bool = True,  # a progress line per call (off when a table follows anyway)
    ) -> None:
        self.state = state
        self.each_call = each_call
        self.tracer = tracer
        self.progress = progress or (lambda _line: None)
        self.evidence_timeout = evidence_timeout
        self.converge_timeout = converge_timeout
        self.check_alive = check_alive or (lambda: None)
        self._tokens: dict[str, str] = {}

    # -- one call ------------------------------------------------------------------------------
    def _token(self, scope: str) -> str:
        if scope not in self._tokens:
            from meshward.demo.tokens import mint

            if not self.state.signing_key:
                from meshward.errors import UserError

                raise UserError("the demo state names no JWT signing key (signing_key)")
            self._tokens[scope] = mint(self.state.signing_key, scope=scope)
        return self._tokens[scope]

    @contextlib.contextmanager
    def _span(self, call: Call) -> Iterator[dict[str, str]]:
        """Headers carrying the trace context: the tour's own client span when tracing is on,
        else a fresh sampled W3C traceparent (Envoy continues it either way)."""
        fresh = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
        if self.tracer is None:
            yield fresh
            return
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        with self.tracer.start_as_current_span(
            f"{call.who} {call.method} {call.path}", kind=trace.SpanKind.CLIENT
        ) as span:
            span.set_attribute("meshward.tour.expect", call.expect)
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            yield carrier if "traceparent" in carrier else fresh  # a no-op tracer injects nothing

    def _call(self, call: Call) -> tuple[Response, str, str]:
        """One request, once: a policy edit is a route update that Envoy applies to open
        connections at their next request, so the first call after an edit already sees it."""
        # A UUID: Envoy decides whether to trace from x-request-id and does not trace a request
        # whose id is not one (it also packs its trace decision into the version digit).
        request_id = str(uuid.uuid4())
        with self._span(call) as headers:
            headers = {**headers, "x-request-id": request_id}
            trace_id = headers["traceparent"].split("-")[1]
            if call.scope:
                headers["authorization"] = f"Bearer {self._token(call.scope)}"
            if call.source is None:
                address = self.state.workload(call.target).inbound
            else:
                address = self.state.reserved(call.source, call.target)
            return send(address, call.method, call.path, headers), request_id, trace_id

    # -- evidence ------------------------------------------------------------------------------
    def _collect(self, pending: list[tuple[int, Call, Response, str, str]]) -> list[CallResult]:
        """Access logs are flushed every ~200 ms: poll until every call's line is there."""
        deadline = time.monotonic() + self.evidence_timeout
        found: dict[str, evidence.Verdict] = {}
        wanted = {
            request_key(rid): tid
            for _, call, response, rid, tid in pending
            if call.source is not None and response.status != 0  # no HTTP: nothing was logged
        }
        by_trace = {tid: key for key, tid in wanted.items()}
        while True:
            for target in {call.target for _, call, *_ in pending}:
                for line in evidence.verdicts(read_rotated(self.state.workload(target).access_log)):
                    if line.direction != "inbound":
                        continue
                    key = request_key(line.request_id)
                    if key not in wanted:
                        key = by_trace.get(line.trace_id, "")
                    if key:
                        found[key] = line
            if wanted.keys() <= found.keys() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        records = evidence.decisions(read_rotated(self.state.decision_log))
        results = []
        for index, call, response, request_id, trace_id in pending:
            seen = found.get(request_key(request_id))
            verdict = evidence.with_decision_log(seen, records) if seen is not None else None
            result = judge(index, call, response, verdict, request_id=request_id,
                           trace_id=trace_id)  # fmt: skip
            results.append(result)
            mark = "ok" if result.ok else "FAILED: " + "; ".join(result.problems)
            if self.each_call or not result.ok:
                self.progress(
                    f"[tour ] {index:2d} {call.who:23} {call.request:40} {result.actual:5} {mark}"
                )
        return results

    # -- policy edits --------------------------------------------------------------------------
    def _edit(self, index: int, edit: PolicyEdit) -> EditResult:
        from meshward.policy import PolicyError, load

        started = time.monotonic()
        directory = Path(self.state.policy_dir)
        target = directory / edit.file
        if edit.content is None:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        else:
            tmp = directory / f".{edit.file}.tmp"  # hidden: the watchers skip it
            tmp.write_text(edit.content)
            os.replace(tmp, target)
        try:
            version = load([directory]).version
        except PolicyError as exc:
            return EditResult(index, edit, "", 0.0, (f"the edited policy set is invalid: {exc}",))
        self.progress(f"[edit ] {edit.title}: policy {version[:12]}, waiting for every sidecar")
        problems = self._wait_converged(version)
        seconds = time.monotonic() - started
        if not problems:
            self.progress(f"[edit ] converged in {seconds:.1f}s")
            if edit.settle:
                self.progress(
                    f"[edit ] the listener changed: {edit.settle:.0f}s for connections opened "
                    "before to drain"
                )
                time.sleep(edit.settle)
        return EditResult(index, edit, version, seconds, tuple(problems))

    def _wait_converged(self, version: str) -> list[str]:
        refs = sorted(self.state.workloads)
        deadline = time.monotonic() + self.converge_timeout
        lagging = ["control plane not asked yet"]
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                lagging = []
                if self.state.xds_admin:
                    status = status_poll.fetch_status(self.state.xds_admin)
                    lagging = status_poll.lagging(status, refs, version)
                if not lagging and self.state.extauthz_metrics:
                    lagging = extauthz_lagging(self.state.extauthz_metrics, version)
            except OSError as exc:
                lagging = [f"status unreachable: {exc}"]
            if not lagging:
                return []
            time.sleep(0.1)
        return [f"not converged after {self.converge_timeout:.0f}s: " + "; ".join(lagging[:4])]

    # -- the tour ------------------------------------------------------------------------------
    def run(self, steps: Sequence[Step] = TOUR) -> TourResult:
        started = time.monotonic()
        result = TourResult()
        pending: list[tuple[int, Call, Response, str, str]] = []
        try:
            for index, step in enumerate(steps, start=1):
                if isinstance(step, PolicyEdit):
                    result.results.extend(self._collect(pending))
                    pending = []
                    edit = self._edit(index, step)
                    result.results.append(edit)
                    if not edit.ok:
                        self.progress(f"[edit ] FAILED: {'; '.join(edit.problems)}")
                    continue
                response, request_id, trace_id = self._call(step)
                pending.append((index, step, response, request_id, trace_id))
            result.results.extend(self._collect(pending))
        finally:
            # Never leave the live edit behind (Ctrl-C, a failure): the demo's copy only.
            for step in steps:
                if isinstance(step, PolicyEdit) and step.content is not None:
                    with contextlib.suppress(OSError):
                        (Path(self.state.policy_dir) / step.file).unlink()
        result.seconds = time.monotonic() - started
        return result


def extauthz_lagging(metrics_url: str, version: str) -> list[str]:
    """ext_authz reports the versions it serves as ``..._policy_info{version="<12 hex>"} N``
    (N: processes serving it)."""
    import urllib.request

    with urllib.request.urlopen(metrics_url.rstrip("/") + "/metrics", timeout=2) as response:
        text = response.read().decode(errors="replace")
    serving = [
        line
        for line in text.splitlines()
        if line.startswith("meshward_extauthz_policy_info{") and not line.endswith(" 0.0")
    ]
    if any(f'version="{version[:12]}"' in line for line in serving):
        return []
    return [f"ext_authz does not serve policy {version[:12]} yet"]
