"""Request-path normalization and path patterns, kept identical to what the sidecar Envoy does.

Envoy is configured with ``normalize_path: true``, ``merge_slashes: true`` and
``path_with_escaped_slashes_action: REJECT_REQUEST``; RBAC then matches the normalized path with
the query string removed. The evaluator must see the same path or a policy tested with
``meshward policy explain`` would behave differently in the mesh (``/admin/../api`` and
``//admin`` are the classic bypasses).
"""

from __future__ import annotations

import re
from functools import lru_cache

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Characters Envoy passes through unchanged in a path (RFC 3986 pchar, "/", "%", "[" and "]").
_PATH_CHARS = frozenset(UNRESERVED | set("!$&'()*+,;=:@/%[]"))
# Characters Envoy's (Chromium-derived) canonicalizer percent-encodes instead of rejecting.
_ESCAPED = {ch: f"%{ord(ch):02X}" for ch in '"<>`{}|^'}
# Anything else (space, control characters, raw non-ASCII, "#") makes Envoy answer 400.
_REQUEST_LINE_REJECTS = re.compile(
    "[^" + re.escape("".join(sorted(_PATH_CHARS | set(_ESCAPED) | {"\\"}))) + "]|%(?:2[fF]|5[cC])"
)

# Envoy's uri_template literal class (source/extensions/path/uri_template_lib): pchar without
# "*" and "=". `{*}` is one or more of these; `{**}` is zero or more of these or "/".
_TEMPLATE_LITERAL = "a-zA-Z0-9\\-._~%!$&'()+,;:@"
_ONE_SEGMENT = f"[{_TEMPLATE_LITERAL}]+"
_ANY_SEGMENTS = f"[{_TEMPLATE_LITERAL}/]*"
_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$")
_TEMPLATE_TOKEN = re.compile(r"\{\*\*\}|\{\*\}")


# The one ``host[:port]`` an HTTP request's authority may be (RFC 9110 7.2, RFC 3986 3.2.2):
# an IP literal or a name, without the reg-name characters no DNS name has (sub-delims,
# ``%``, ``~``, ``@``). A comma is what Envoy makes of two Host headers
# (``payments.shop,admin.internal``), which RFC 9112 3.2 says a server must answer with 400.
# RE2 and Python ``re`` read it alike: the compiler gives it to Envoy as a full-match route
# header matcher (meshward.compile.listeners) and the evaluator applies it here, so both reject
# exactly the same requests before authorization.
AUTHORITY_REGEX = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*)(?::[0-9]*)?"
_AUTHORITY = re.compile(AUTHORITY_REGEX)

# A request whose normalized path has a segment that is ``.`` or ``..`` followed by ``;``
# parameters, the ``;`` raw or escaped (``%3B``, ``%3b``). Envoy 1.40 strips the parameters only
# after a LITERAL dot segment and a LITERAL ``;``, so ``/x/%2e%2e;/admin`` reaches the application
# as ``/x/..;/admin``, which Tomcat, Jetty and Spring serve as ``/admin`` while RBAC matched
# ``/x/..;/admin``; and ``/x/..%3b/admin`` reaches it unchanged, where any layer that decodes
# once before splitting parameters (a proxy, a servlet filter, ``URLDecoder`` in the app) reads
# ``..;`` again. Envoy keeps ``%3B``/``%3b`` as sent (not unreserved, case preserved), hence both
# cases. Full match on ``:path``, whose route matcher sees the query: ``[^?]*`` keeps the match in
# the path part (``/ok?next=/..;/x`` is fine). The escaped dots (``%2e``) never survive
# normalization; they are here for the outbound listeners, which do not normalize. The compiler
# gives it to Envoy as a route header matcher (meshward.compile.listeners) and the evaluator
# applies it here (RE2 and Python ``re`` read it alike), so both reject exactly the same
# requests before authorization.
DOT_SEGMENT_PARAMETERS_REGEX = r"[^?]*/(?:\.|%2[Ee]){1,2}(?:;|%3[Bb]).*"
_DOT_SEGMENT_PARAMETERS = re.compile(DOT_SEGMENT_PARAMETERS_REGEX)


class PathRejected(ValueError):
    """Envoy answers such a request with 400 before any authorization runs."""


class HostRejected(PathRejected):
    """The request's Host (``:authority``) is not one ``host[:port]``: the sidecar answers 400
    before any authorization runs. A PathRejected so every caller that handles "rejected before
    authorization" handles it too."""


class DotSegmentRejected(PathRejected):
    """The normalized path has a ``.;``/``..;`` segment: the sidecar answers 400 before any
    authorization runs (DOT_SEGMENT_PARAMETERS_REGEX)."""


def check_dot_segment_parameters(path: str) -> None:
    """Raise DotSegmentRejected when ``path`` (normalized, query allowed) has a segment that is
    ``.`` or ``..`` followed by ``;`` or its escape ``%3B``: the application would read it as a
    dot segment that authorization never saw."""
    if _DOT_SEGMENT_PARAMETERS.fullmatch(path) is not None:
        raise DotSegmentRejected(
            f"path {path!r} has a '.' or '..' segment with ';' parameters (';' raw or escaped as "
            "%3B), which Tomcat, Jetty and Spring read as a dot segment (path traversal past "
            "authorization)"
        )


def strip_trailing_host_dot(host: str) -> str:
    """The Host as Envoy forwards and matches it with ``strip_trailing_host_dot: true``
    (HeaderUtility::stripTrailingHostDot): one dot removed from the end of the name, before the
    port if there is one (``admin.internal.:80`` is ``admin.internal:80``). Without it
    ``admin.internal.`` would slip past ``hosts: [admin.internal]``."""
    dot = host.rfind(".")
    if dot == -1:
        return host
    if dot == len(host) - 1:
        return host[:-1]
    if host[dot + 1] == ":":
        return host[:dot] + host[dot + 1 :]
    return host


def check_authority(host: str) -> None:
    """Raise HostRejected unless ``host`` is one ``host[:port]`` (an empty host is left to
    Envoy's own checks, as the evaluator reads it as "no host")."""
    if host and _AUTHORITY.fullmatch(host) is None:
        if "," in host:
            raise HostRejected(
                f"Host {host!r} joins several Host headers; a request must name exactly one "
                "host[:port] (RFC 9112 3.2)"
            )
        raise HostRejected(f"Host {host!r} is not a valid host[:port] (RFC 9112 3.2)")


def check_request_target(host: str, normalized_path: str) -> str:
    """What the sidecar's first routes check before any authorization, in their order: one
    ``host[:port]`` (trailing dot stripped first, as the HCM does), then no ``;`` parameters on
    a dot segment. Returns the host as Envoy matches it; raises PathRejected (HostRejected,
    DotSegmentRejected). The evaluator and ext_authz (before its decision cache) both call it."""
    host = strip_trailing_host_dot(host)
    check_authority(host)
    check_dot_segment_parameters(normalized_path)
    return host


def normalize_path(raw: str) -> str:
    """Return the path RBAC will match, as Envoy 1.40 computes it (checked against a running
    Envoy): the query removed; ``\\`` turned into ``/``; escapes of unreserved characters
    decoded (other escapes kept, case preserved); ``"<>`{}|^`` percent-encoded; dot-segments
    removed (RFC 3986 5.2.4, ``%2e`` counts as ``.``; a literal ``.``/``..`` segment loses its
    ``;`` parameters first, ``/x/..;/admin`` is ``/admin``); repeated slashes merged. Case is kept
    (``/ADMIN`` is not ``/admin``). Raises PathRejected where Envoy answers 400: ``%2F``/``%5C``
    (escaped slashes), ``%00``, ``#`` anywhere, and characters no request line may carry."""
    if "#" in raw:
        raise PathRejected(f"'#' (a fragment) in request path {raw!r}")
    path, _, query = raw.partition("?")
    bad = next((ch for ch in query if not "!" <= ch <= "~"), None)
    if bad is not None:
        raise PathRejected(f"invalid character {bad!r} in query of {raw!r}")
    if not path.startswith("/"):
        raise PathRejected(f"path must start with '/': {raw!r}")
    _check_request_line(path, raw)
    decoded = _decode(_strip_dot_segment_parameters(path), raw)
    return _merge_slashes(_remove_dot_segments(decoded))


def _check_request_line(path: str, raw: str) -> None:
    """What Envoy refuses before it touches the path: characters no request line may carry
    (its HTTP codec) and escaped slashes (``path_with_escaped_slashes_action``). Checked on the
    whole raw path, so they reject even inside parameters that are stripped afterwards."""
    bad = _REQUEST_LINE_REJECTS.search(path)
    if bad is None:
        return
    if bad.group().startswith("%"):
        raise PathRejected(f"escaped slash {bad.group()!r} in path {raw!r}")
    raise PathRejected(f"invalid character {bad.group()!r} in path {raw!r}")


def _strip_dot_segment_parameters(path: str) -> str:
    """Envoy 1.40 (CVE-2026-73511, runtime guard
    ``envoy.reloadable_features.strip_path_parameters_per_segment``) drops the ``;``
    parameters of a segment that is a literal ``.`` or ``..`` before ``;``, so ``/x/..;/admin``
    is ``/admin`` (Tomcat and Jetty read it that way). Measured against Envoy 1.40: segments are
    split on literal ``/`` only (``\\`` inside the parameters is dropped with them, and
    ``/a\\..;/b`` keeps its ``..;``); escaped dots (``%2e.;``) and an escaped ``;`` (``%3B``)
    do not count; everything up to the next ``/`` goes, even ``%00`` that would otherwise be
    rejected."""
    if ";" not in path:
        return path
    segments = path.split("/")
    for index, segment in enumerate(segments):
        head, semicolon, _ = segment.partition(";")
        if semicolon and (head == "." or head == ".."):
            segments[index] = head
    return "/".join(segments)


def _decode(path: str, raw: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch == "%" and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            escape = path[i : i + 3]
            value = chr(int(escape[1:], 16))
            if value == "\0":
                raise PathRejected(f"escaped NUL {escape!r} in path {raw!r}")
            out.append(value if value in UNRESERVED else escape)
            i += 3
            continue
        if ch == "\\":
            out.append("/")
        else:  # _check_request_line let only path characters and _ESCAPED through
            out.append(_ESCAPED.get(ch, ch))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    if "." not in path:
        return path
    segments = path.split("/")[1:]
    output: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
            continue
        if segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
            continue
        output.append(segment)
    return "/" + "/".join(output)


def _merge_slashes(path: str) -> str:
    if "//" not in path:
        return path
    return re.sub("/{2,}", "/", path)


def unanchored_path_problem(pattern: str) -> str | None:
    """A path pattern that cannot match because it does not start with ``/``.

    Every request path Envoy authorizes starts with ``/`` (anything else is answered 400), so
    an exact or prefix pattern such as ``admin`` or ``admin/*`` never matches. Istio accepts it
    (its validation checks only emptiness and templates) and compiles a matcher that never
    fires; that is a silent allow wherever the pattern was meant to catch something (``paths``
    of a DENY, ``notPaths`` of an ALLOW), so Meshward refuses it everywhere. ``*`` and suffix
    patterns (``*.php``) are fine: they do not anchor the start, and neither does a template
    starting with ``{**}`` (zero or more segments, slashes included: ``{**}/x`` matches ``/x``);
    one starting with ``{*}`` (one segment, no slash) cannot match the leading ``/``."""
    if pattern.startswith(("/", "*", "{**}")):
        return None
    return (
        f"{pattern!r} does not start with '/': request paths always do, so it never matches "
        f"(write '/{pattern}'; for a suffix match, '*{pattern}')"
    )


def is_path_template(pattern: str) -> bool:
    """Istio reads a path containing ``{*}`` or ``{**}`` as an Envoy URI template."""
    return "{*}" in pattern or "{**}" in pattern


def check_path_template(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid template (Istio's rules), or None when it is valid."""
    rest = _TEMPLATE_TOKEN.sub("", pattern)
    if "*" in rest or "{" in rest or "}" in rest:
        return "a path template may use '*', '{' and '}' only inside {*} or {**}"
    for segment in pattern.split("/"):
        if _TEMPLATE_TOKEN.search(segment) and segment not in ("{*}", "{**}"):
            return f"segment {segment!r} mixes a template operator with other characters"
    tokens = _TEMPLATE_TOKEN.findall(pattern)
    if "{**}" in tokens[:-1]:
        return "{**} must be the last operator in a path template"
    return None


@lru_cache(maxsize=4096)
def path_template_regex(pattern: str) -> str:
    """An RE2-compatible regex (full match) equivalent to Envoy's uri_template matcher for this
    Istio template; the compiler may emit it as a ``safe_regex`` path matcher."""
    parts: list[str] = []
    pos = 0
    for token in _TEMPLATE_TOKEN.finditer(pattern):
        parts.append(re2_escape(pattern[pos : token.start()]))
        parts.append(_ANY_SEGMENTS if token.group() == "{**}" else _ONE_SEGMENT)
        pos = token.end()
    parts.append(re2_escape(pattern[pos:]))
    return "".join(parts)


def re2_escape(literal: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in literal)


@lru_cache(maxsize=4096)
def compiled_path_template(pattern: str) -> re.Pattern[str]:
    return re.compile(path_template_regex(pattern))
