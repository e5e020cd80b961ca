"""AuthorizationPolicy rules as Envoy RBAC policies (``envoy.config.rbac.v3.Policy`` dicts).

A rule becomes one RBAC policy named ``ns[<ns>]-policy[<name>]-rule[<i>]``. Rule fields AND,
list items OR, ``not*`` negates, as in Istio:

- permissions: the ``to`` operations (OR of ANDs) AND the ``when`` keys about the destination
  (``destination.ip``, ``destination.port``, ``connection.sni``);
- principals: the ``from`` sources (OR of ANDs) AND the ``when`` keys about the source
  (``source.*``, ``remote.ip``, ``request.headers[...]``).

Ports are translated to the runtime inbound port (``port_map``): that is the port Envoy sees. A
declared port the workload does not have can never be the destination, so it matches nothing.

For TCP ports (network RBAC) HTTP-only fields cannot be evaluated: the caller drops ALLOW rules
that use them (they match no connection) and passes ``drop_http=True`` for DENY rules, which
removes those fields so the rule matches more connections (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshward.compile.authz import jwt_authn
from meshward.compile.authz import matchers as m
from meshward.compile.authz.matchers import Json
from meshward.compile.authz.placement import JWT_KEY_PREFIX
from meshward.policy.model import Condition, Operation, Rule, Source
from meshward.policy.vocabulary import header_name


@dataclass(frozen=True)
class RuleContext:
    port_map: Mapping[int, int]  # declared port -> runtime inbound port
    drop_http: bool = False  # TCP DENY: ignore HTTP-only fields


def rule_policy(rule: Rule, ctx: RuleContext) -> Json:
    """One RBAC Policy (``permissions`` + ``principals``) for one rule."""
    permission_parts: list[Json] = []
    principal_parts: list[Json] = []
    built = [_operation(op, ctx) for op in rule.operations]
    ops = [op for op in built if op is not None]
    if ops and len(ops) == len(rule.operations):
        permission_parts.append(m.or_permissions(ops))
    # else: some operation lost all its fields (TCP DENY) and now matches everything.
    sources = [_source(src, ctx) for src in rule.sources]
    if rule.sources and all(s is not None for s in sources):
        principal_parts.append(m.or_principals([s for s in sources if s is not None]))
    for condition in rule.conditions:
        side, matcher = _condition(condition, ctx)
        if matcher is None:
            continue
        (permission_parts if side == "permission" else principal_parts).append(matcher)
    return {
        "permissions": [m.and_permissions(permission_parts)],
        "principals": [m.and_principals(principal_parts)],
    }


def _field(
    values: Sequence[str] | Sequence[int],
    build: Callable[[str], Json | list[Json]],
    *,
    permission: bool,
    negate: bool = False,
) -> Json:
    leaves: list[Json] = []
    for value in values:
        built = build(str(value))
        leaves.extend(built if isinstance(built, list) else [built])
    if permission:
        combined = m.or_permissions(leaves)
        return m.not_permission(combined) if negate else combined
    combined = m.or_principals(leaves)
    return m.not_principal(combined) if negate else combined


def _port(ctx: RuleContext) -> Callable[[str], Json]:
    def build(value: str) -> Json:
        runtime = ctx.port_map.get(int(value))
        if runtime is None:
            return m.NO_PERMISSION  # not a port of this workload: never the destination
        return {"destination_port": runtime}

    return build


def _operation(op: Operation, ctx: RuleContext) -> Json | None:
    """AND of the operation's fields; None when TCP dropped every field (matches everything)."""
    parts: list[Json] = []
    if not ctx.drop_http:
        if op.hosts:
            parts.append(_field(op.hosts, m.host, permission=True))
        if op.not_hosts:
            parts.append(_field(op.not_hosts, m.host, permission=True, negate=True))
        if op.methods:
            parts.append(_field(op.methods, m.method, permission=True))
        if op.not_methods:
            parts.append(_field(op.not_methods, m.method, permission=True, negate=True))
        if op.paths:
            parts.append(_field(op.paths, m.path, permission=True))
        if op.not_paths:
            parts.append(_field(op.not_paths, m.path, permission=True, negate=True))
    if op.ports:
        parts.append(_field(op.ports, _port(ctx), permission=True))
    if op.not_ports:
        parts.append(_field(op.not_ports, _port(ctx), permission=True, negate=True))
    if not parts:
        return None if ctx.drop_http else m.ANY_PERMISSION
    return m.and_permissions(parts)


def _direct_ip(value: str) -> Json:
    return {"direct_remote_ip": m.cidr(value)}


def _remote_ip(value: str) -> Json:
    return {"remote_ip": m.cidr(value)}


def _source(src: Source, ctx: RuleContext) -> Json | None:
    parts: list[Json] = []
    if src.principals:
        parts.append(_field(src.principals, m.principal, permission=False))
    if src.not_principals:
        parts.append(_field(src.not_principals, m.principal, permission=False, negate=True))
    if src.namespaces:
        parts.append(_field(src.namespaces, m.namespace, permission=False))
    if src.not_namespaces:
        parts.append(_field(src.not_namespaces, m.namespace, permission=False, negate=True))
    if src.ip_blocks:
        parts.append(_field(src.ip_blocks, _direct_ip, permission=False))
    if src.not_ip_blocks:
        parts.append(_field(src.not_ip_blocks, _direct_ip, permission=False, negate=True))
    if src.remote_ip_blocks:
        parts.append(_field(src.remote_ip_blocks, _remote_ip, permission=False))
    if src.not_remote_ip_blocks:
        parts.append(_field(src.not_remote_ip_blocks, _remote_ip, permission=False, negate=True))
    if not ctx.drop_http:  # end-user JWT (meshward.compile.authz.jwt_authn): HTTP only
        if src.request_principals:
            parts.append(
                _field(src.request_principals, jwt_authn.request_principal, permission=False)
            )
        if src.not_request_principals:
            parts.append(
                _field(
                    src.not_request_principals,
                    jwt_authn.request_principal,
                    permission=False,
                    negate=True,
                )
            )
    if not parts:
        return None if ctx.drop_http else m.ANY_PRINCIPAL
    return m.and_principals(parts)


_PRINCIPAL_KEYS: Mapping[str, Callable[[str], Json]] = {
    "source.ip": _direct_ip,
    "remote.ip": _remote_ip,
    "source.namespace": m.namespace,
    "source.principal": m.principal,
}


def _condition(c: Condition, ctx: RuleContext) -> tuple[str, Json | None]:
    """(side, matcher): side is "permission" or "principal"; None drops the condition (TCP)."""
    key = c.key
    if key.startswith(JWT_KEY_PREFIX):
        if ctx.drop_http:
            return "principal", None

        def build_jwt(value: str) -> Json:
            return jwt_authn.condition_value(key, value)

        return "principal", _values(c, build_jwt, permission=False)
    side: str
    build: Callable[[str], Json | list[Json]]
    name = header_name(key)
    if name is not None:
        if ctx.drop_http:
            return "principal", None

        def build_header(value: str) -> list[Json]:
            return m.header(name, value)

        side, build = "principal", build_header
    elif key in _PRINCIPAL_KEYS:
        side, build = "principal", _PRINCIPAL_KEYS[key]
    elif key == "destination.ip":
        side, build = "permission", lambda v: {"destination_ip": m.cidr(v)}
    elif key == "destination.port":
        side, build = "permission", _port(ctx)
    elif key == "connection.sni":
        side, build = "permission", m.sni
    else:
        raise ValueError(f"unsupported condition key {key!r}")
    return side, _values(c, build, permission=side == "permission")


def _values(
    c: Condition, build: Callable[[str], Json | list[Json]], *, permission: bool
) -> Json | None:
    parts: list[Json] = []
    if c.values:
        parts.append(_field(c.values, build, permission=permission))
    if c.not_values:
        parts.append(_field(c.not_values, build, permission=permission, negate=True))
    if not parts:
        return None
    if permission:
        return m.and_permissions(parts)
    return m.and_principals(parts)
