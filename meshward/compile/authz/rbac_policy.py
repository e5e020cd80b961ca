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
from meshward.policy.vocabulary import OPERATION_FIELDS, SOURCE_FIELDS, FieldPair, header_name


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


Build = Callable[[str], Json | list[Json]]


def _field(
    values: Sequence[str] | Sequence[int],
    build: Build,
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


def _pair(
    values: Sequence[str] | Sequence[int],
    not_values: Sequence[str] | Sequence[int],
    build: Build,
    *,
    permission: bool,
) -> list[Json]:
    """``x`` (OR of its values) and ``not_x`` (NOT of that), the parts each present field adds."""
    parts: list[Json] = []
    if values:
        parts.append(_field(values, build, permission=permission))
    if not_values:
        parts.append(_field(not_values, build, permission=permission, negate=True))
    return parts


def _port(ctx: RuleContext) -> Build:
    def build(value: str) -> Json:
        runtime = ctx.port_map.get(int(value))
        if runtime is None:
            return m.NO_PERMISSION  # not a port of this workload: never the destination
        return {"destination_port": runtime}

    return build


def _always(build: Build) -> Callable[[RuleContext], Build]:
    return lambda _ctx: build


def _direct_ip(value: str) -> Json:
    return {"direct_remote_ip": m.cidr(value)}


def _remote_ip(value: str) -> Json:
    return {"remote_ip": m.cidr(value)}


# Each field pair's matcher, in the order the RBAC output lists them (the golden files fix that
# order; it is not the model's). Which fields exist and which only HTTP has: the vocabulary's.
FieldMatchers = tuple[tuple[FieldPair, Callable[[RuleContext], Build]], ...]
_OPERATION_MATCHERS: FieldMatchers = (
    (OPERATION_FIELDS["hosts"], _always(m.host)),
    (OPERATION_FIELDS["methods"], _always(m.method)),
    (OPERATION_FIELDS["paths"], _always(m.path)),
    (OPERATION_FIELDS["ports"], _port),
)
_SOURCE_MATCHERS: FieldMatchers = (
    (SOURCE_FIELDS["principals"], _always(m.principal)),
    (SOURCE_FIELDS["namespaces"], _always(m.namespace)),
    (SOURCE_FIELDS["ip_blocks"], _always(_direct_ip)),
    (SOURCE_FIELDS["remote_ip_blocks"], _always(_remote_ip)),
    # end-user JWT (meshward.compile.authz.jwt_authn)
    (SOURCE_FIELDS["request_principals"], _always(jwt_authn.request_principal)),
)


def _parts(
    item: Operation | Source, matchers: FieldMatchers, ctx: RuleContext, *, permission: bool
) -> list[Json]:
    """The AND parts of one operation or source; HTTP-only fields dropped for TCP DENY."""
    parts: list[Json] = []
    for pair, matcher in matchers:
        if pair.http_only and ctx.drop_http:
            continue
        values, not_values = getattr(item, pair.name), getattr(item, pair.negated)
        parts += _pair(values, not_values, matcher(ctx), permission=permission)
    return parts


def _operation(op: Operation, ctx: RuleContext) -> Json | None:
    """AND of the operation's fields; None when TCP dropped every field (matches everything)."""
    parts = _parts(op, _OPERATION_MATCHERS, ctx, permission=True)
    if not parts:
        return None if ctx.drop_http else m.ANY_PERMISSION
    return m.and_permissions(parts)


def _source(src: Source, ctx: RuleContext) -> Json | None:
    parts = _parts(src, _SOURCE_MATCHERS, ctx, permission=False)
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
    build: Build
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


def _values(c: Condition, build: Build, *, permission: bool) -> Json | None:
    parts = _pair(c.values, c.not_values, build, permission=permission)
    if not parts:
        return None
    return m.and_permissions(parts) if permission else m.and_principals(parts)
