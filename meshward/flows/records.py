"""One Envoy ALS entry -> one :class:`FlowRecord` (pure: protobuf in, facts out).

The entry is read into the shape of the JSON file access log (meshward.compile.observe) and
judged by the same code that reads those files (:func:`meshward.flows.evidence.verdict_from_access_log`), so a denial reads the same in a file, in ``meshward denials`` and in
the flow store. The custom tags set at compile time (meshward.compile.observe.flow_log) say
which workload, direction and port the entry belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from meshward.compile import names
from meshward.compile.observe import TAG_DIRECTION, TAG_KIND, TAG_PORT, TAG_WORKLOAD
from meshward.flows import evidence
from meshward.flows.paths import template

MAX_FIELD = 256  # request-controlled strings are cut to this many characters
UNKNOWN = "unknown"  # a caller whose SPIFFE ID names no workload of the mesh
PLAINTEXT = "plaintext"  # a caller without a client certificate
ALLOW, DENY, ERROR = "allow", "deny", "error"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_OUTBOUND_CLUSTER = re.compile(r"^outbound\|(\d+)\|\|([^.|]+)\.([^.|]+)$")
_FLAG_NAMES = {
    "no_route_found": "NR",
    "upstream_connection_failure": "UF",
    "no_healthy_upstream": "UH",
    "upstream_retry_limit_exceeded": "URX",
    "downstream_protocol_error": "DPE",
    "upstream_protocol_error": "UPE",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "no_filter_config_found": "NFCF",
    "downstream_connection_termination": "DC",
}


class RecordError(ValueError):
    """The entry is not one a Meshward sidecar writes (no flow tags): dropped and counted."""


class ForeignWorkload(RecordError):
    """The entry is about another workload than the reporting node's: the stream is refused."""


@dataclass(frozen=True)
class FlowRecord:
    """One request (or refused connection) as a sidecar saw it."""

    time: datetime
    source: str  # caller workload "ns/name", UNKNOWN or PLAINTEXT
    source_principal: str  # the caller's SPIFFE ID ("" without mTLS)
    destination: str  # callee workload "ns/name" (UNKNOWN when the caller's side cannot tell)
    port: int  # the callee's declared port (0: unknown)
    method: str
    path: str  # the template (meshward.flows.paths)
    status: int  # HTTP status (0: no HTTP response)
    decision: str  # ALLOW, DENY or ERROR
    reason: str  # who decided and why (mtls, no route, RBAC, ext_authz, jwt_authn...)
    policy: str  # "ns/name#rule" of the deciding policy, "" when none
    dry_run: str  # ","-joined dry-run policies that would have denied it
    duration_ms: int
    trace_id: str
    reporter: str  # the workload whose sidecar reported it
    direction: str  # inbound | outbound
    kind: str  # http | tcp | connection


def _cut(value: Any) -> str:
    return ("" if value is None else str(value))[:MAX_FIELD]


def _flags(common: Any) -> list[str]:
    flags = common.response_flags
    found = [short for field, short in _FLAG_NAMES.items() if getattr(flags, field, False) is True]
    if flags.HasField("unauthorized_details"):  # a message, not a bool
        found.append("UAEX")
    return found


def _struct(common: Any, namespace: str) -> dict[str, Any]:
    meta = common.metadata.filter_metadata
    if namespace not in meta:
        return {}
    result = json_format.MessageToDict(meta[namespace])
    return result if isinstance(result, dict) else {}


def _peer_principal(common: Any) -> str:
    for san in common.tls_properties.peer_certificate_properties.subject_alt_name:
        if san.uri:
            return _cut(san.uri)
    return ""


def _time(common: Any) -> datetime:
    if common.HasField("start_time"):
        value: datetime = common.start_time.ToDatetime(tzinfo=UTC)
        return value
    return datetime.fromtimestamp(0, UTC)


def _duration_ms(common: Any) -> int:
    for field in ("duration", "time_to_last_downstream_tx_byte"):
        if common.HasField(field):
            return max(0, int(getattr(common, field).ToMilliseconds()))
    return 0


def _trace_id(headers: Mapping[str, str]) -> str:
    match = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    return match.group(1) if match else ""


def _request_id(value: str) -> str:
    compact = value.replace("-", "").lower()
    return compact if len(compact) == 32 and all(c in "0123456789abcdef" for c in compact) else ""


def _tags(common: Any, node_workload: str) -> tuple[str, str, int, str]:
    """Outbound entries carry no workload tag (their listener is the same for every caller):
    they are the reporting node's own; inbound ones must name it."""
    tags = common.custom_tags
    direction = tags.get(TAG_DIRECTION, "")
    workload = tags.get(TAG_WORKLOAD, node_workload if direction == "outbound" else "")
    kind = tags.get(TAG_KIND, "")
    port_text = tags.get(TAG_PORT, "0")
    if not workload or direction not in ("inbound", "outbound") or not port_text.isdigit():
        raise RecordError("entry without Meshward's flow tags (workload, direction, port)")
    return workload, direction, int(port_text), kind or "http"


def _policy(verdict: evidence.Verdict) -> str:
    if verdict.policy is None:
        return ""
    return _cut(verdict.rule_ref)


def from_http(
    entry: Any, *, node_workload: str, resolve: Callable[[str], str | None]
) -> FlowRecord:
    """An ``HTTPAccessLogEntry``; ``node_workload``: the reporting node's workload (the entry
    must be about it, or RecordError); ``resolve``: SPIFFE ID -> workload ref or None."""
    common = entry.common_properties
    workload, direction, port, kind = _tags(common, node_workload)
    if workload != node_workload:
        raise ForeignWorkload(
            f"entry for workload {workload[:100]!r} from a node of {node_workload}"
        )
    headers = dict(entry.request.request_headers)
    principal = _peer_principal(common)
    flags = _flags(common)
    line: dict[str, Any] = {
        "workload": workload,
        "direction": direction,
        "response_code": entry.response.response_code.value
        if entry.response.HasField("response_code") else 0,
        "response_code_details": _cut(entry.response.response_code_details),
        "rbac": _struct(common, names.RBAC_METADATA_NAMESPACE),
        "ext_authz": _struct(common, "envoy.filters.http.ext_authz"),
        "peer_principal": principal,
        # Without tracing there is no traceparent: Envoy's x-request-id (a UUID) stands in, so
        # every denial still has one id to find it by (`meshward denials --trace ID`).
        "trace_id": _trace_id(headers) or _request_id(entry.request.request_id),
        "method": _cut(_method(entry.request.request_method)),
        "path": entry.request.path[:2048],
    }  # fmt: skip
    verdict = evidence.verdict_from_access_log(line)
    assert verdict is not None  # response_code is always set above
    decision = ALLOW if verdict.allowed else DENY
    reason = verdict.reason
    details = verdict.details
    if details.startswith("jwt_authn"):
        reason = f"jwt_authn: {details}"
    if direction == "outbound":
        decision, reason = _outbound_refusal(flags, details)
    source, destination = _ends(direction, workload, principal, common, resolve)
    return FlowRecord(
        time=_time(common),
        source=source,
        source_principal=principal,
        destination=destination,
        port=port or _outbound_port(common),
        method=verdict.method,
        path=template(verdict.path)[:MAX_FIELD],
        status=verdict.status,
        decision=decision,
        reason=_cut(reason),
        policy=_policy(verdict),
        dry_run=_cut(",".join(verdict.would_deny)),
        duration_ms=_duration_ms(common),
        trace_id=verdict.trace_id,
        reporter=workload,
        direction=direction,
        kind=kind,
    )


_METHODS = {v.number: v.name for v in base_pb2.RequestMethod.DESCRIPTOR.values}


def _method(value: int) -> str:
    name = _METHODS.get(value, "")
    return "" if name == "METHOD_UNSPECIFIED" else name


def _outbound_refusal(flags: list[str], details: str) -> tuple[str, str]:
    if "NR" in flags:
        return DENY, "no route: the caller's sidecar has no route to this destination"
    if "UF" in flags or "URX" in flags:
        return ERROR, f"upstream connection failed (TLS refused or peer down): {details}"
    if "UH" in flags:
        return ERROR, "no healthy upstream"
    return ERROR, details or "refused at the caller's sidecar"


def _outbound_port(common: Any) -> int:
    match = _OUTBOUND_CLUSTER.match(common.upstream_cluster)
    return int(match.group(1)) if match else 0


def _ends(
    direction: str,
    workload: str,
    principal: str,
    common: Any,
    resolve: Callable[[str], str | None],
) -> tuple[str, str]:
    if direction == "outbound":
        match = _OUTBOUND_CLUSTER.match(common.upstream_cluster)
        destination = f"{match.group(3)}/{match.group(2)}" if match else UNKNOWN
        return workload, destination
    if not principal:
        return PLAINTEXT, workload
    return resolve(principal) or UNKNOWN, workload


def from_tcp(
    entry: Any, *, node_workload: str, resolve: Callable[[str], str | None]
) -> FlowRecord | None:
    """A ``TCPAccessLogEntry`` (TCP proxy or listener): a refused connection or a TCP flow;
    None for a listener entry that refused nothing."""
    common = entry.common_properties
    workload, direction, port, kind = _tags(common, node_workload)
    if workload != node_workload:
        raise ForeignWorkload(
            f"entry for workload {workload[:100]!r} from a node of {node_workload}"
        )
    principal = _peer_principal(common)
    flags = _flags(common)
    failure = _cut(common.downstream_transport_failure_reason)
    termination = _cut(common.connection_termination_details)
    rbac = _struct(common, names.NETWORK_RBAC_METADATA_NAMESPACE)
    policy = ""
    if failure:
        decision, reason = DENY, f"mTLS: {failure}"
    elif termination.startswith("rbac_access_denied_matched_policy["):
        name, rule = evidence.parse_policy_id(
            termination[len("rbac_access_denied_matched_policy[") : -1]
        )
        decision = DENY
        reason = (
            f"DENY rule {name}#{rule} matched" if name else "no ALLOW rule matched (default deny)"
        )
        policy = f"{name}#{rule}" if name is not None and rule is not None else (name or "")
    elif kind == "connection":
        if not flags:
            return None
        decision, reason = DENY, f"connection refused ({','.join(flags)})"
    elif direction == "outbound":
        decision, reason = _outbound_refusal(flags, termination)
    else:
        decision, reason = ALLOW, "connection allowed"
    source, destination = _ends(direction, workload, principal, common, resolve)
    return FlowRecord(
        time=_time(common),
        source=source,
        source_principal=principal,
        destination=destination,
        port=port or _outbound_port(common),
        method="",
        path="",
        status=0,
        decision=decision,
        reason=_cut(reason),
        policy=_cut(policy),
        dry_run=_cut(",".join(evidence.dry_run_denials(rbac))),
        duration_ms=_duration_ms(common),
        trace_id="",
        reporter=workload,
        direction=direction,
        kind=kind,
    )
