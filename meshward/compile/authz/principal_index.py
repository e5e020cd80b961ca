"""Principal-indexed RBAC: rules that name their callers exactly, looked up by the peer's identity.

Envoy's RBAC ``rules`` engine walks every policy until one matches, so a workload with 1,000
rules pays for 1,000 checks on every request it allows late or denies. Least-privilege rules
mostly say *who* may call: exact identities, principal prefixes (``td/ns/team/*``), namespaces
or namespace prefixes, sometimes narrowed by notPrincipals. Such a rule can only match a
request whose peer URI SAN starts with one of a few known prefixes (``spiffe://td/ns/team/`` for
a namespace), so these rules compile to RBAC's ``matcher`` form instead: a matcher tree with a
prefix map on the URI SAN, whose entry for the longest matching prefix holds only the rules that
SAN can match, each with the complete rule as its predicate and the rule's name as the action
name (a denial still reports ``rbac_access_denied_matched_policy[ns[..]-policy[..]-rule[..]]``).
Rules with suffix or ``*`` principals, ``*...`` namespaces, only negations or no ``from`` stay
in the rules engine.

The predicates are a mechanical translation of the same RBAC policy JSON the ``rules`` engine
gets (meshward.compile.authz.rbac_policy), into the generic matcher API's inputs: request headers, the path,
ports, addresses, SNI and the URI SAN. ``url_path`` (the path without its query) has no matcher
input, so path patterns are matched against ``:path`` with an optional query/fragment tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshward.compile.authz.matchers import SPIFFE
from meshward.compile.authz.placement import PlacedRule, envoy_policy_order, rule_extauthz_reason
from meshward.compile.authz.rbac_policy import RuleContext, rule_policy
from meshward.policy.model import Source
from meshward.policy.paths import re2_escape

Json = dict[str, Any]

T_ACTION = "type.googleapis.com/envoy.config.rbac.v3.Action"
T_HEADER_INPUT = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput"
T_URI_SAN = "type.googleapis.com/envoy.extensions.matching.common_inputs.ssl.v3.UriSanInput"
_NETWORK = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."
T_IP_MATCHER = "type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip"
_QUERY_TAIL = r"(?:[?#].*)?"

# The action when no indexed DENY rule matched: the request goes on to the next filter.
NO_DENY_MATCHED = "meshward-no-indexed-deny-rule-matched"
# The action of an entry with no rule (never taken: its predicate never holds).
NO_INDEXED_RULE = "meshward-no-indexed-rule"


def _source_keys(source: Source, trust_domain: str) -> list[tuple[str, bool]] | None:
    """URI SAN prefixes that every peer matching ``source`` has (``(prefix, any_td)``), or None
    when the source admits peers no prefix covers (a suffix or ``*`` principal, a ``*...``
    namespace, only negations or IP blocks). ``any_td``: a namespace pattern, which matches in
    any trust domain; its prefix is written for the mesh's own one."""
    if source.principals:
        if any(p.startswith("*") for p in source.principals):
            return None
        return [(SPIFFE + (p[:-1] if p.endswith("*") else p), False) for p in source.principals]
    if source.namespaces and trust_domain:
        if any(n.startswith("*") for n in source.namespaces):
            return None
        base = f"{SPIFFE}{trust_domain}/ns/"
        return [(base + (n[:-1] if n.endswith("*") else n + "/"), True) for n in source.namespaces]
    return None


def keyable_source(source: Source) -> bool:
    """The source can be keyed in some mesh (namespaces need the trust domain): for checks that
    must cover every rule that may be indexed (meshward.compile.envoy_limits)."""
    return _source_keys(source, "td") is not None


def rule_keys(rule: PlacedRule, trust_domain: str = "") -> tuple[tuple[str, bool], ...] | None:
    """The URI SAN prefixes under which ``rule`` is filed in the index (a peer that can match
    the rule has one of them), or None when the rule is not indexable: some ``from`` entry
    admits callers no prefix covers, or the rule has no ``from`` at all."""
    sources = rule.rule.sources
    if not sources or rule_extauthz_reason(rule.rule) is not None:
        # No sources, or the rule reads the end-user JWT: its payload matchers (dynamic
        # metadata) have no matcher-tree form here, so it stays in the rules engine.
        return None
    out: list[tuple[str, bool]] = []
    for source in sources:
        keys = _source_keys(source, trust_domain)
        if keys is None:
            return None
        out.extend(keys)
    return tuple(dict.fromkeys(out))


def exact_principals(rule: PlacedRule) -> tuple[str, ...] | None:
    """The callers that could match ``rule`` (full SPIFFE IDs), or None when it is not limited
    to exact identities (every ``from`` entry must list exact principals)."""
    sources = rule.rule.sources
    if not sources or rule_extauthz_reason(rule.rule) is not None:
        # No sources, or the rule reads the end-user JWT: its payload matchers (dynamic
        # metadata) have no matcher-tree form here, so it stays in the rules engine.
        return None
    out: list[str] = []
    for source in sources:
        if not source.principals or any("*" in p for p in source.principals):
            return None
        out.extend(SPIFFE + p for p in source.principals)
    return tuple(dict.fromkeys(out))


def _input(name: str, typed: Json) -> Json:
    return {"name": name, "typed_config": typed}


def _header_input(header: str) -> Json:
    return _input(f"header:{header}", {"@type": T_HEADER_INPUT, "header_name": header})


def _network_input(kind: str) -> Json:
    return _input(kind, {"@type": _NETWORK + kind})


URI_SAN = _input("uri_san", {"@type": T_URI_SAN})
# Inside an entry keyed on the URI SAN, the SAN is present: a predicate that always holds.
TRUE: Json = {"single_predicate": {"input": URI_SAN, "value_match": {"prefix": SPIFFE}}}


def _xds_string(m: Json) -> Json:
    """envoy.type.matcher StringMatcher -> xds.type.matcher StringMatcher (same shape)."""
    if "safe_regex" in m:
        return {"safe_regex": {"google_re2": {}, "regex": m["safe_regex"]["regex"]}}
    return dict(m)


def _path_string(m: Json) -> Json:
    """A ``url_path`` matcher as a matcher on ``:path``, which still carries the query."""
    if "prefix" in m and "?" not in m["prefix"] and "#" not in m["prefix"]:
        return {"prefix": m["prefix"]}
    if "exact" in m:
        body = re2_escape(m["exact"])
    elif "suffix" in m:
        body = ".*" + re2_escape(m["suffix"])
    elif "prefix" in m:
        body = re2_escape(m["prefix"]) + ".*"
    elif "safe_regex" in m:
        body = f"(?:{m['safe_regex']['regex']})"
    else:
        raise ValueError(f"unsupported path matcher {m}")
    return {"safe_regex": {"google_re2": {}, "regex": body + _QUERY_TAIL}}


def _single(input_: Json, value: Json) -> Json:
    return {"single_predicate": {"input": input_, "value_match": value}}


def _ip(input_: Json, cidr: Json) -> Json:
    matcher = {"@type": T_IP_MATCHER, "cidr_ranges": [cidr], "stat_prefix": "meshward_rbac_ip"}
    return {
        "single_predicate": {
            "input": input_,
            "custom_match": {"name": "ip", "typed_config": matcher},
        }
    }


def predicate(node: Json) -> Json:
    """An RBAC Permission or Principal (JSON) as an xds matcher predicate."""
    if node.get("any"):
        return TRUE
    for key, inner in (("and_rules", "rules"), ("and_ids", "ids")):
        if key in node:
            return _combine("and_matcher", [predicate(n) for n in node[key][inner]])
    for key, inner in (("or_rules", "rules"), ("or_ids", "ids")):
        if key in node:
            return _combine("or_matcher", [predicate(n) for n in node[key][inner]])
    if "not_rule" in node:
        return {"not_matcher": predicate(node["not_rule"])}
    if "not_id" in node:
        return {"not_matcher": predicate(node["not_id"])}
    if "header" in node:
        header = node["header"]
        if header.get("present_match"):
            value: Json = {"safe_regex": {"google_re2": {}, "regex": "(?s).*"}}
        else:
            value = _xds_string(header["string_match"])
        return _single(_header_input(header["name"]), value)
    if "url_path" in node:
        path = node["url_path"]["path"]
        exact = path.get("exact")
        if isinstance(exact, str) and "?" not in exact and "#" not in exact:
            # The path alone, or followed by a query or fragment: plain string matchers, no
            # regex (whose RE2 program would grow with the path, past Envoy's limit of 100).
            header = _header_input(":path")
            return _combine(
                "or_matcher",
                [
                    _single(header, {"exact": exact}),
                    _single(header, {"prefix": exact + "?"}),
                    _single(header, {"prefix": exact + "#"}),
                ],
            )
        return _single(_header_input(":path"), _path_string(path))
    if "destination_port" in node:
        return _single(
            _network_input("DestinationPortInput"), {"exact": str(node["destination_port"])}
        )
    if "destination_ip" in node:
        return _ip(_network_input("DestinationIPInput"), node["destination_ip"])
    if "direct_remote_ip" in node:
        return _ip(_network_input("DirectSourceIPInput"), node["direct_remote_ip"])
    if "remote_ip" in node:
        return _ip(_network_input("SourceIPInput"), node["remote_ip"])
    if "requested_server_name" in node:
        return _single(
            _network_input("ServerNameInput"), _xds_string(node["requested_server_name"])
        )
    if "authenticated" in node:
        name = node["authenticated"].get("principal_name")
        return TRUE if name is None else _single(URI_SAN, _xds_string(name))
    raise ValueError(f"no matcher predicate for {node}")


def _combine(kind: str, items: list[Json]) -> Json:
    if kind == "and_matcher":
        items = [i for i in items if i is not TRUE and i != TRUE]
        if not items:
            return TRUE
    elif any(i == TRUE for i in items):
        return TRUE
    return items[0] if len(items) == 1 else {kind: {"predicate": items}}


def _action(name: str, action: str) -> Json:
    return {
        "action": {
            "name": name,
            "typed_config": {"@type": T_ACTION, "name": name, "action": action},
        }
    }


def rule_predicate(rule: PlacedRule, ctx: RuleContext) -> Json:
    policy = rule_policy(rule.rule, ctx)
    permission = _combine("or_matcher", [predicate(p) for p in policy["permissions"]])
    principal = _combine("or_matcher", [predicate(p) for p in policy["principals"]])
    return _combine("and_matcher", [permission, principal])


# An index whose entries would repeat rules more often than this (a namespace rule is filed
# under every caller of that namespace the index also names exactly) keeps only the rules that
# name exact callers: the route stays small, the rest go to the rules engine.
MAX_ENTRY_RULES = 20_000


@dataclass(frozen=True)
class _Layout:
    """Where each indexed rule is filed: prefix -> positions (in Envoy's policy order)."""

    rules: tuple[PlacedRule, ...]  # Envoy's policy order
    entries: dict[str, tuple[int, ...]]
    any_td: tuple[int, ...]  # rules with a namespace key: the only ones a foreign peer can match
    own: str  # ``spiffe://<trust domain>/``, or "" without a trust domain

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.entries.values()) + len(self.any_td)


def _layout(rules: Sequence[PlacedRule], trust_domain: str) -> _Layout:
    """Each prefix's entry holds every rule filed under a prefix of it, so whichever prefix is
    the longest one a peer's SAN starts with (the one Envoy's prefix map picks) holds every rule
    that peer can match, in policy order. Namespace keys are written for the mesh's trust
    domain; a peer of another trust domain can still match them (Istio's namespace ignores the
    trust domain), so entries outside the own domain, and the no-match branch, add those rules;
    the own domain's root is a key of its own, so local peers never reach that branch."""
    ordered = tuple(envoy_policy_order(rules))
    filed: dict[str, list[int]] = {}
    any_td: list[int] = []
    for pos, rule in enumerate(ordered):
        keys = rule_keys(rule, trust_domain)
        if keys is None:
            raise ValueError(f"{rule.rbac_name} is not indexable")
        if any(flag for _, flag in keys):
            any_td.append(pos)
        for key, _ in keys:
            filed.setdefault(key, []).append(pos)
    own = f"{SPIFFE}{trust_domain}/" if trust_domain else ""
    prefixes = set(filed)
    if any_td and own:
        prefixes.add(own)
    entries: dict[str, tuple[int, ...]] = {}
    # The rules filed under a non-empty prefix of ``key``: found by trying each of its
    # prefixes, or each filed key, whichever is fewer (a SAN key is ~50 characters; a
    # workload's index has a few dozen keys, or thousands in the worst case).
    nonempty = [(k, v) for k, v in filed.items() if k]
    for key in sorted(prefixes):
        members: set[int] = set()
        if len(nonempty) < len(key):
            for prefix, positions in nonempty:
                if key.startswith(prefix):
                    members.update(positions)
        else:
            for end in range(1, len(key) + 1):
                members.update(filed.get(key[:end], ()))
        if any_td and not key.startswith(own):
            members.update(any_td)
        entries[key] = tuple(sorted(members))
    return _Layout(ordered, entries, tuple(any_td), own)


def split(
    rules: Sequence[PlacedRule], min_rules: int | None, trust_domain: str = ""
) -> tuple[list[PlacedRule], list[PlacedRule]]:
    """(indexed, plain): the rules the index can take, when there are at least ``min_rules``
    of them (None: never). Rules naming callers by exact identity, prefix or namespace are
    indexed; when filing the prefixes and namespaces would repeat rules past MAX_ENTRY_RULES,
    only the exact ones are."""
    rules = list(rules)
    if min_rules is None:
        return [], rules
    keyed = [r for r in rules if rule_keys(r, trust_domain) is not None]
    if keyed and _layout(keyed, trust_domain).size > MAX_ENTRY_RULES:
        keyed = [r for r in keyed if exact_principals(r) is not None]
    if not keyed or len(keyed) < min_rules:
        return [], rules
    chosen = {id(r) for r in keyed}
    return keyed, [r for r in rules if id(r) not in chosen]


# A predicate that never holds: an ALLOW entry with no rule to try.
NEVER: Json = {"not_matcher": TRUE}


def matcher(
    rules: Sequence[PlacedRule], ctx: RuleContext, action: str, trust_domain: str = ""
) -> Json:
    """The matcher tree for indexable ``rules`` (see :func:`split`).

    A prefix map on the peer's URI SAN: the entry of the longest prefix the SAN starts with
    lists every rule that SAN can match, in Envoy's policy order, each with the complete rule
    as its predicate. ALLOW: a request is allowed by the first of those rules that matches;
    anything else is no match, which RBAC denies. DENY: a match denies, naming the rule;
    anything else ends in the NO_DENY_MATCHED allow action (set on every level, so it holds
    whether or not Envoy falls back to an outer ``on_no_match`` or a shorter prefix, which
    would only try rules already tried).

    Only for mTLS filter chains: when the URI SAN input has no value (a plaintext connection)
    Envoy cannot evaluate the tree at all and RBAC denies, whatever ``on_no_match`` says.
    Plaintext chains get the plain rules engine (where these rules simply never match).
    """
    layout = _layout(rules, trust_domain)
    built = [
        {"predicate": rule_predicate(rule, ctx), "on_match": _action(rule.rbac_name, action)}
        for rule in layout.rules
    ]
    fallback = _action(NO_DENY_MATCHED, "ALLOW") if action == "DENY" else None

    def listing(positions: Sequence[int]) -> Json:
        if not positions:
            if fallback is not None:
                return fallback
            never = {"predicate": NEVER, "on_match": _action(NO_INDEXED_RULE, "DENY")}
            return {"matcher": {"matcher_list": {"matchers": [never]}}}
        nested: Json = {"matcher_list": {"matchers": [built[i] for i in positions]}}
        if fallback is not None:
            nested["on_no_match"] = fallback
        return {"matcher": nested}

    entries = {key: listing(positions) for key, positions in layout.entries.items()}
    tree: Json = {"matcher_tree": {"input": URI_SAN, "prefix_match_map": {"map": entries}}}
    if layout.any_td:
        tree["on_no_match"] = listing(layout.any_td)
    elif fallback is not None:
        tree["on_no_match"] = fallback
    return tree
