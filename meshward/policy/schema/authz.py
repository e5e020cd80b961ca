"""AuthorizationPolicy: action, selector, rules (from/to/when), dry-run and expiry annotations."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from meshward.policy.matching import parse_network, strip_spiffe, wildcard_problem
from meshward.policy.model import (
    DRY_RUN_ANNOTATION,
    EXPIRES_AT_ANNOTATION,
    Action,
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
)
from meshward.policy.paths import (
    check_path_template,
    is_path_template,
    unanchored_path_problem,
)
from meshward.policy.schema.base import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DocumentReader,
    did_you_mean,
    port_value,
    type_name,
)
from meshward.policy.vocabulary import (
    HEADER_NAME,
    IP_KEYS,
    OPERATION_FORMS,
    PLAIN_KEYS,
    PORT_KEYS,
    SOURCE_FORMS,
    FieldForm,
    claim_path,
    header_name,
)

# Istio's serviceAccounts / notServiceAccounts: NAMESPACE/NAME written out as principals, so
# each adds to the field it stands for (and may not be combined with it in one source).
_SERVICE_ACCOUNTS: Mapping[str, FieldForm] = {
    "serviceAccounts": next(f for f in SOURCE_FORMS if f.attr == "principals"),
    "notServiceAccounts": next(f for f in SOURCE_FORMS if f.attr == "not_principals"),
}


class AuthzSchema(DocumentReader):
    def authorization_policy(self) -> AuthorizationPolicy | None:
        count = len(self.problems)
        name, namespace, _, annotations = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"),
            "spec",
            ("selector", "action", "provider", "rules", "targetRef", "targetRefs"),
        )
        for unsupported in ("targetRef", "targetRefs"):
            if unsupported in spec:
                self.error(
                    f"spec.{unsupported}",
                    "not supported (it binds policies to gateways and waypoints); "
                    "use spec.selector to pick sidecar workloads",
                )
        selector = self.selector(spec.get("selector"), "spec.selector")
        action = Action.ALLOW
        if spec.get("action") is not None:
            text = self.string(spec["action"], "spec.action")
            if text is not None:
                try:
                    action = Action(text)
                except ValueError:
                    self.error(
                        "spec.action",
                        f"{text!r} is not one of {', '.join(a.value for a in Action)}",
                    )
        provider: str | None = None
        if spec.get("provider") is not None:
            prov = self.mapping(spec["provider"], "spec.provider", ("name",))
            provider = self.string(prov.get("name"), "spec.provider.name", required=True)
        if action is Action.CUSTOM and provider is None and "provider" not in spec:
            self.error("spec.provider", "required when action is CUSTOM")
        if action is not Action.CUSTOM and "provider" in spec:
            self.error("spec.provider", "allowed only when action is CUSTOM")
        rules = self.rules(spec.get("rules"), namespace)
        dry_run = self.dry_run(annotations)
        if dry_run and action is Action.CUSTOM:
            self.error(
                f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
                "dry-run is not supported for CUSTOM policies (as in Istio)",
            )
        expires_at = self.expires_at(annotations)
        if len(self.problems) > count:
            return None
        return AuthorizationPolicy(
            namespace=namespace,
            name=name,
            action=action,
            selector=selector,
            rules=rules,
            provider=provider,
            dry_run=dry_run,
            expires_at=expires_at,
            origin=self.doc.origin,
        )

    def dry_run(self, annotations: Mapping[str, Any]) -> bool:
        value = annotations.get(DRY_RUN_ANNOTATION)
        if value is None or isinstance(value, bool):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.error(
            f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
            f'expected "true" or "false", got {value!r}',
        )
        return False

    def expires_at(self, annotations: Mapping[str, Any]) -> datetime | None:
        value = annotations.get(EXPIRES_AT_ANNOTATION)
        field = f"metadata.annotations[{EXPIRES_AT_ANNOTATION}]"
        if value is None:
            return None
        parsed: datetime | None = None
        if isinstance(value, datetime):
            parsed = value
        elif isinstance(value, str) and ("T" in value or "t" in value):
            try:
                parsed = datetime.fromisoformat(value.upper())
            except ValueError:
                parsed = None
        if parsed is None:
            self.error(field, f"{value!r} is not an RFC 3339 timestamp (e.g. 2030-01-31T18:00:00Z)")
            return None
        if parsed.tzinfo is None:
            self.error(field, f"{value!r} needs a time zone (e.g. a trailing Z for UTC)")
            return None
        return parsed.astimezone(UTC)

    def rules(self, value: Any, namespace: str) -> tuple[Rule, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error("spec.rules", f"expected a list of rules, got {type_name(value)}")
            return ()
        return tuple(self.rule(item, f"spec.rules[{i}]", namespace) for i, item in enumerate(value))

    def rule(self, value: Any, path: str, namespace: str) -> Rule:
        data = self.mapping(value, path, ("from", "to", "when"))
        sources: list[Source] = []
        for i, item in enumerate(self.entries(data.get("from"), f"{path}.from")):
            entry = self.mapping(item, f"{path}.from[{i}]", ("source",))
            sources.append(self.source(entry.get("source"), f"{path}.from[{i}].source", namespace))
        operations: list[Operation] = []
        for i, item in enumerate(self.entries(data.get("to"), f"{path}.to")):
            entry = self.mapping(item, f"{path}.to[{i}]", ("operation",))
            operations.append(self.operation(entry.get("operation"), f"{path}.to[{i}].operation"))
        conditions = tuple(
            self.condition(item, f"{path}.when[{i}]")
            for i, item in enumerate(self.entries(data.get("when"), f"{path}.when"))
        )
        return Rule(sources=tuple(sources), operations=tuple(operations), conditions=conditions)

    def source(self, value: Any, path: str, namespace: str) -> Source:
        fields = (*(f.key for f in SOURCE_FORMS), *_SERVICE_ACCOUNTS)
        if value is None:
            self.error(path, "required (a `from` entry needs a source)")
            return Source()
        data = self.mapping(value, path, fields)
        if isinstance(value, dict) and set(value) <= set(fields) and not any(map(data.get, fields)):
            self.error(path, "must set at least one field")
        readers = {
            "principals": self.principals,
            "request_principals": self.patterns,
            "namespaces": self.patterns,
            "ip_blocks": self.networks,
            "remote_ip_blocks": self.networks,
        }
        values = {
            f.attr: readers[f.pair.name](data.get(f.key), f"{path}.{f.key}") for f in SOURCE_FORMS
        }
        for field, twin in _SERVICE_ACCOUNTS.items():
            accounts = self.service_accounts(data.get(field), f"{path}.{field}", namespace)
            if accounts and values[twin.attr]:
                self.error(
                    f"{path}.{field}",
                    f"cannot be combined with {twin.key} in one source (both name the peer "
                    "identity)",
                )
            values[twin.attr] += accounts
        return Source(**values)

    def principals(self, value: Any, path: str) -> tuple[str, ...]:
        items = self.patterns(value, path)
        return tuple(strip_spiffe(item) for item in items)

    def service_accounts(self, value: Any, path: str, namespace: str) -> tuple[str, ...]:
        out: list[str] = []
        for i, item in enumerate(self.str_list(value, path)):
            ns, slash, sa = item.rpartition("/")
            ns = ns if slash else namespace
            if "*" in item or not DNS_LABEL.match(ns) or not DNS_SUBDOMAIN.match(sa):
                self.error(
                    f"{path}[{i}]",
                    f"{item!r} is not a service account (NAMESPACE/NAME, or NAME in the "
                    "policy's namespace; no wildcards)",
                )
                continue
            out.append(f"{self.mesh.trust_domain}/ns/{ns}/sa/{sa}")
        return tuple(out)

    def operation(self, value: Any, path: str) -> Operation:
        fields = tuple(f.key for f in OPERATION_FORMS)
        if value is None:
            self.error(path, "required (a `to` entry needs an operation)")
            return Operation()
        data = self.mapping(value, path, fields)
        if isinstance(value, dict) and set(value) <= set(fields) and not any(map(data.get, fields)):
            self.error(path, "must set at least one field")
        readers: dict[str, Callable[[Any, str], tuple[Any, ...]]] = {
            "hosts": self.patterns,
            "ports": self.ports,
            "methods": self.patterns,
            "paths": self.paths,
        }
        return Operation(
            **{
                f.attr: readers[f.pair.name](data.get(f.key), f"{path}.{f.key}")
                for f in OPERATION_FORMS
            }
        )

    def paths(self, value: Any, path: str) -> tuple[str, ...]:
        items = self.str_list(value, path)
        for i, item in enumerate(items):
            problem = (
                check_path_template(item) if is_path_template(item) else wildcard_problem(item)
            ) or unanchored_path_problem(item)
            if problem:
                self.error(f"{path}[{i}]", problem)
        return items

    def condition(self, value: Any, path: str) -> Condition:
        data = self.mapping(value, path, ("key", "values", "notValues"))
        key = self.string(data.get("key"), f"{path}.key", required=True) or ""
        numbers = True  # YAML turns `values: [91]` into ints; Istio users mean the string
        values = self.str_list(data.get("values"), f"{path}.values", numbers=numbers)
        not_values = self.str_list(data.get("notValues"), f"{path}.notValues", numbers=numbers)
        if isinstance(value, dict) and not values and not not_values:
            self.error(path, "set values or notValues (or both)")
        if key:
            self.condition_key(key, f"{path}.key")
            for field, items in (("values", values), ("notValues", not_values)):
                self.condition_values(key, items, f"{path}.{field}")
        return Condition(key=key, values=values, not_values=not_values)

    def condition_key(self, key: str, path: str) -> None:
        if key.startswith("experimental."):
            self.error(
                path,
                f"unsupported key {key!r}: experimental.* keys match Envoy filter metadata, "
                "which Meshward sidecars do not expose; remove this condition",
            )
            return
        if key in IP_KEYS or key in PORT_KEYS or key in PLAIN_KEYS:
            return
        name = header_name(key)
        if name is not None:
            if not HEADER_NAME.match(name):
                self.error(path, f"{name!r} is not a valid header name")
            return
        if claim_path(key) is not None:
            return
        known = sorted(
            {
                *IP_KEYS,
                *PORT_KEYS,
                *PLAIN_KEYS,
                "request.headers[NAME]",
                "request.auth.claims[NAME]",
            }
        )
        self.error(
            path, f"unknown key {key!r}{did_you_mean(key, known)}; known: {', '.join(known)}"
        )

    def condition_values(self, key: str, items: tuple[str, ...], path: str) -> None:
        for i, item in enumerate(items):
            if key in IP_KEYS:
                try:
                    parse_network(item)
                except ValueError:
                    self.error(f"{path}[{i}]", f"{item!r} is not an IP address or CIDR block")
            elif key in PORT_KEYS:
                if port_value(item) is None:
                    self.error(f"{path}[{i}]", f"{item!r} is not a port number (1-65535)")
            else:
                problem = wildcard_problem(item)
                if problem:
                    self.error(f"{path}[{i}]", problem)
