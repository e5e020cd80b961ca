"""A model of what Envoy does with a compiled inbound HTTP listener: a fast test oracle.

It interprets the compiled RBAC/ext_authz filters the way Envoy's C++ does (the subset of the
RBAC API the compiler emits) so property tests can compare thousands of generated requests with
meshward.policy.evaluate in milliseconds. The decision-equivalence test against a real Envoy is
what proves this model faithful; neither replaces the other.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from meshward.compile import names
from meshward.compile.authz.jwt_authn import FILTER_JWT_AUTHN, PAYLOAD_KEY
from meshward.policy.paths import PathRejected, normalize_path, strip_trailing_host_dot

Json = dict[str, Any]


@dataclass(frozen=True)
class Connection:
    """What Envoy knows about one request when the HTTP filters run."""

    method: str
    path: str  # raw, as sent
    host: str
    headers: Mapping[str, str]  # lowercase names, as sent by the client
    port: int  # runtime port the listener is bound to
    peer_uri: str | None  # URI SAN of the verified client certificate; None: plaintext
    source_ip: str = "127.0.0.1"
    destination_ip: str = "127.0.0.1"
    sni: str | None = None

    @property
    def remote_ip(self) -> str:
        """use_remote_address=false, no trusted hops: the last X-Forwarded-For entry."""
        xff = self.headers.get("x-forwarded-for")
        return xff.split(",")[-1].strip() if xff else self.source_ip


@dataclass(frozen=True)
class Outcome:
    status: int  # 200, 403 or 400
    detail: str  # Envoy's response code details, roughly
    metadata: Mapping[str, str]
    extauthz_called: bool


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def string_match(m: Json, value: str | None) -> bool:
    if value is None:
        return False
    ignore = bool(m.get("ignore_case"))
    v = value.lower() if ignore else value

    def norm(s: str) -> str:
        return s.lower() if ignore else s

    if "exact" in m:
        return v == norm(m["exact"])
    if "prefix" in m:
        return v.startswith(norm(m["prefix"]))
    if "suffix" in m:
        return v.endswith(norm(m["suffix"]))
    if "contains" in m:
        return norm(m["contains"]) in v
    if "safe_regex" in m:
        return _regex(m["safe_regex"]["regex"]).fullmatch(value) is not None
    raise ValueError(f"unsupported string matcher {m}")


class _Request:
    def __init__(self, conn: Connection, path: str) -> None:
        self.conn = conn
        self.path = path  # normalized, with query
        self.url_path = path.split("?", 1)[0]
        # After the header_mutation filter: client-sent x-meshward-* are gone.
        self.headers = {
            k: v for k, v in conn.headers.items() if not k.startswith(names.MESHWARD_HEADER_PREFIX)
        }
        self.metadata: dict[str, str] = {}
        self.payload: Mapping[str, Any] | None = None  # jwt_authn's verified payload

    def header(self, name: str) -> str | None:
        if name == ":authority":  # every compiled HCM sets strip_trailing_host_dot
            return strip_trailing_host_dot(self.conn.host)
        if name == ":method":
            return self.conn.method
        if name == ":path":
            return self.path
        return self.headers.get(name)


def _header(m: Json, req: _Request) -> bool:
    value = req.header(m["name"])
    if "present_match" in m:
        return (value is not None) == bool(m["present_match"])
    if value is None:
        return False
    return string_match(m["string_match"], value)


def _cidr(m: Json, ip: str) -> bool:
    network = ipaddress.ip_network(f"{m['address_prefix']}/{m.get('prefix_len', 32)}", strict=False)
    return ipaddress.ip_address(ip) in network


def permission(p: Json, req: _Request) -> bool:
    if p.get("any"):
        return True
    if "and_rules" in p:
        return all(permission(r, req) for r in p["and_rules"]["rules"])
    if "or_rules" in p:
        return any(permission(r, req) for r in p["or_rules"]["rules"])
    if "not_rule" in p:
        return not permission(p["not_rule"], req)
    if "header" in p:
        return _header(p["header"], req)
    if "url_path" in p:
        return string_match(p["url_path"]["path"], req.url_path)
    if "destination_port" in p:
        return int(p["destination_port"]) == req.conn.port
    if "destination_ip" in p:
        return _cidr(p["destination_ip"], req.conn.destination_ip)
    if "requested_server_name" in p:
        return string_match(p["requested_server_name"], req.conn.sni or "")
    raise ValueError(f"unsupported permission {p}")


def principal(p: Json, req: _Request) -> bool:
    if p.get("any"):
        return True
    if "and_ids" in p:
        return all(principal(r, req) for r in p["and_ids"]["ids"])
    if "or_ids" in p:
        return any(principal(r, req) for r in p["or_ids"]["ids"])
    if "not_id" in p:
        return not principal(p["not_id"], req)
    if "authenticated" in p:
        if req.conn.peer_uri is None:
            return False
        name = p["authenticated"].get("principal_name")
        return name is None or string_match(name, req.conn.peer_uri)
    if "direct_remote_ip" in p:
        return _cidr(p["direct_remote_ip"], req.conn.source_ip)
    if "remote_ip" in p:
        return _cidr(p["remote_ip"], req.conn.remote_ip)
    if "header" in p:
        return _header(p["header"], req)
    if "sourced_metadata" in p:
        matcher = p["sourced_metadata"]["metadata_matcher"]
        assert matcher["filter"] == FILTER_JWT_AUTHN
        return _payload_match(matcher, req.payload)
    if "metadata" in p:
        m = p["metadata"]
        assert m["filter"] == names.RBAC_METADATA_NAMESPACE
        return string_match(m["value"]["string_match"], req.metadata.get(m["path"][0]["key"]))
    raise ValueError(f"unsupported principal {p}")


def _payload_match(m: Json, payload: Mapping[str, Any] | None) -> bool:
    """An RBAC metadata matcher on jwt_authn's payload: Envoy's ValueMatcher on the value at
    the path (a string for ``string_match``, a list with a matching string for ``list_match``)."""
    keys = [step["key"] for step in m["path"]]
    assert keys[0] == PAYLOAD_KEY
    node: Any = payload
    for key in keys[1:]:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    value = m["value"]
    if "string_match" in value:
        return isinstance(node, str) and string_match(value["string_match"], node)
    inner = value["list_match"]["one_of"]["string_match"]
    return isinstance(node, list) and any(
        isinstance(v, str) and string_match(inner, v) for v in node
    )


# ---- the generic matcher API (RBAC ``matcher`` / ``shadow_matcher``) ----------------------


def _input(config: Json, req: _Request) -> str | None:
    kind = config["typed_config"]["@type"].rsplit(".", 1)[-1]
    conn = req.conn
    if kind == "HttpRequestHeaderMatchInput":
        return req.header(config["typed_config"]["header_name"])
    if kind == "UriSanInput":
        return conn.peer_uri
    if kind == "DestinationPortInput":
        return str(conn.port)
    if kind == "DestinationIPInput":
        return conn.destination_ip
    if kind == "DirectSourceIPInput":
        return conn.source_ip
    if kind == "SourceIPInput":
        return conn.remote_ip
    if kind == "ServerNameInput":
        return conn.sni or None
    raise ValueError(f"unsupported matcher input {kind}")


def _predicate(p: Json, req: _Request) -> bool:
    if "and_matcher" in p:
        return all(_predicate(x, req) for x in p["and_matcher"]["predicate"])
    if "or_matcher" in p:
        return any(_predicate(x, req) for x in p["or_matcher"]["predicate"])
    if "not_matcher" in p:
        return not _predicate(p["not_matcher"], req)
    single = p["single_predicate"]
    value = _input(single["input"], req)
    if value is None:
        return False
    if "value_match" in single:
        return string_match(single["value_match"], value)
    ranges = single["custom_match"]["typed_config"]["cidr_ranges"]
    return any(_cidr(r, value) for r in ranges)


def _match(matcher: Json, req: _Request) -> Json | None:
    """The action (``{"name", "action"}``) the matcher yields, or None for no match."""
    result: Json | None = None
    if "matcher_list" in matcher:
        for entry in matcher["matcher_list"]["matchers"]:
            if _predicate(entry["predicate"], req):
                result = _on_match(entry["on_match"], req)
                break
    else:
        tree = matcher["matcher_tree"]
        key = _input(tree["input"], req)
        if key is None:
            return None  # Envoy: no input value, no match, and the tree's on_no_match unused
        if "exact_match_map" in tree:
            entry = tree["exact_match_map"]["map"].get(key)
        else:  # the longest prefix of the value that is a key (no fallback to shorter ones)
            table = tree["prefix_match_map"]["map"]
            entry = next(
                (table[key[:end]] for end in range(len(key), 0, -1) if key[:end] in table), None
            )
        if entry is not None:
            result = _on_match(entry, req)
    if result is None and "on_no_match" in matcher:
        result = _on_match(matcher["on_no_match"], req)
    return result


def _on_match(on_match: Json, req: _Request) -> Json | None:
    if "action" in on_match:
        typed: Json = on_match["action"]["typed_config"]
        return typed
    return _match(on_match["matcher"], req)


def _matcher_engine(matcher: Json, req: _Request) -> tuple[bool, str | None]:
    action = _match(matcher, req)
    if action is None:
        return False, None  # no match: RBAC denies
    return action.get("action", "ALLOW") == "ALLOW", action["name"]


def _engine(rules: Json, req: _Request) -> tuple[bool, str | None]:
    """(allowed, matched policy id) for one RBAC engine; Envoy walks policies in name order."""
    action = rules.get("action", "ALLOW")
    matched = None
    for name in sorted(rules.get("policies", {})):
        policy = rules["policies"][name]
        if any(permission(p, req) for p in policy["permissions"]) and any(
            principal(p, req) for p in policy["principals"]
        ):
            matched = name
            break
    if action == "DENY":
        return matched is None, matched
    if action == "LOG":
        return True, matched
    return matched is not None, matched


def _metadata_enabled(matcher: Json, metadata: Mapping[str, str]) -> bool:
    key = matcher["path"][0]["key"]
    matched = string_match(matcher["value"]["string_match"], metadata.get(key))
    return matched != bool(matcher.get("invert"))


# jwt_authn: the verified payload, None (no token) or False (invalid token: 401).
JwtVerify = Callable[[Connection, Json], "Mapping[str, Any] | bool | None"]

# ext_authz answers a Check: True (allow), False (403) or an HTTP status (e.g. 401).
ExtAuthz = Callable[[Connection, str, Mapping[str, str]], bool | int]


def http_filters(listener: Json, *, tls: bool = True) -> tuple[list[Json], Json]:
    """(http_filters, route config) of the mTLS (or plaintext) chain of an inbound listener."""
    wanted = "mtls" if tls else "plaintext"
    chains = listener["filter_chains"]
    chain = next((c for c in chains if c.get("name") == wanted), None)
    if chain is None:
        raise ValueError(f"listener {listener['name']} has no {wanted} chain")
    hcm = chain["filters"][0]["typed_config"]
    return hcm["http_filters"], hcm["route_config"]


def _route_header(m: Json, req: _Request) -> bool:
    """A route's header matcher (``present_match`` or ``string_match``, maybe inverted;
    ``:path`` with query). An absent header matches no string matcher, inverted or not."""
    value = req.header(m["name"])
    if m.get("present_match"):
        return value is not None
    if value is None:
        return False
    return string_match(m["string_match"], value) != bool(m.get("invert_match"))


def select_route(route_config: Json, req: _Request) -> tuple[Json, Json]:
    """(virtual host, first matching route): every compiled route matches prefix ``/``."""
    vhost = route_config["virtual_hosts"][0]
    for route in vhost["routes"]:
        match = route["match"]
        assert match.get("prefix") == "/", match
        if all(_route_header(h, req) for h in match.get("headers", [])):
            return vhost, route
    raise ValueError("no route matched")


def per_filter_config(vhost: Json, route: Json, name: str) -> Json | None:
    """Envoy's most specific per-filter config: the route's, else the virtual host's."""
    found: Json | None = route.get("typed_per_filter_config", {}).get(name)
    if found is None:
        found = vhost.get("typed_per_filter_config", {}).get(name)
    return found


def _rbac(config: Json, local: Json | None, req: _Request) -> Outcome | None:
    """One RBAC filter: engines from the route-local RBACPerRoute when present (else the
    listener's), metadata key prefixes from the route when set there (else the listener's)."""
    rbac = local.get("rbac", {}) if local is not None else config
    metadata = req.metadata
    shadow = None
    if "shadow_rules" in rbac:
        shadow = _engine(rbac["shadow_rules"], req)
    elif "shadow_matcher" in rbac:
        shadow = _matcher_engine(rbac["shadow_matcher"], req)
    if shadow is not None:
        allowed, matched = shadow
        prefix = rbac.get("shadow_rules_stat_prefix") or config.get("shadow_rules_stat_prefix", "")
        metadata[prefix + "shadow_engine_result"] = "allowed" if allowed else "denied"
        if matched:
            metadata[prefix + "shadow_effective_policy_id"] = matched
    enforced = None
    if "rules" in rbac:
        enforced = _engine(rbac["rules"], req)
    elif "matcher" in rbac:
        enforced = _matcher_engine(rbac["matcher"], req)
    if enforced is None:
        return None
    allowed, matched = enforced
    metadata["enforced_engine_result"] = "allowed" if allowed else "denied"
    if matched:
        metadata["enforced_effective_policy_id"] = matched
    if allowed:
        return None
    return Outcome(403, f"rbac_access_denied_matched_policy[{matched or 'none'}]", metadata, False)


def run(
    listener: Json,
    conn: Connection,
    extauthz: ExtAuthz | None = None,
    jwt: JwtVerify | None = None,
) -> Outcome:
    """Send ``conn`` through the listener's HTTP filters. ``extauthz(conn, normalized path,
    context_extensions)`` answers Checks (True: allowed, False: 403, or a status such as 401);
    without it a Check fails closed (403). ``jwt(conn, jwt_authn config)`` stands in for token
    verification: the verified payload, None (no token) or False (a token that does not
    verify: 401); without it every request is token-less."""
    try:
        path = normalize_path(conn.path)
        if "?" in conn.path:
            path += "?" + conn.path.split("?", 1)[1].split("#", 1)[0]
    except PathRejected:
        return Outcome(400, "path_normalization_failed", {}, False)
    req = _Request(conn, path)
    filters, route_config = http_filters(listener, tls=conn.peer_uri is not None)
    vhost, route = select_route(route_config, req)
    metadata = req.metadata
    called = False
    for f in filters:
        config = f["typed_config"]
        kind = config["@type"].rsplit(".", 1)[-1]
        local = per_filter_config(vhost, route, f["name"])
        if kind == "RBAC":
            denied = _rbac(config, local, req)
            if denied is not None:
                return denied
        elif kind == "ExtAuthz":
            if local is not None and local.get("disabled"):
                continue
            enabled = config.get("filter_enabled_metadata")
            if enabled is not None and not _metadata_enabled(enabled, metadata):
                continue
            context = (local or {}).get("check_settings", {}).get("context_extensions", {})
            called = True
            answer = extauthz(conn, path, context) if extauthz is not None else False
            status = 200 if answer is True else 403 if answer is False else int(answer)
            if status != 200:
                return Outcome(status, "ext_authz_denied", metadata, True)
        elif kind == "JwtAuthentication":
            if local is not None and local.get("disabled"):
                continue
            verified = jwt(conn, config) if jwt is not None else None
            if verified is False:
                return Outcome(401, "jwt_authn_access_denied", metadata, called)
            req.payload = verified if isinstance(verified, Mapping) else None
        elif kind == "HeaderMutation":
            continue
        elif kind == "Router":
            direct = route.get("direct_response")
            if direct is not None:
                return Outcome(int(direct["status"]), "direct_response", metadata, called)
        else:
            raise ValueError(f"unexpected filter {f['name']}")
    return Outcome(200, "via_upstream", metadata, called)
