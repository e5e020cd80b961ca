"""Hostile requests through a REAL Envoy running the compiled config of one workload, with the
real ext_authz service: forged and broken tokens, path and header tricks, and callers with the
wrong certificate. Nothing the policy denies reaches the application; nothing a client sends
can pass for an identity the sidecar vouches for.

One sidecar (shop/payments, STRICT mTLS) for the module, compiled exactly as the control plane
compiles it (meshward.compile, static mode), the ext_authz service in this process
(meshward.extauthz.start_service), an echo app behind it. Policy:
- orders may GET anything (native RBAC);
- orders may POST /payments* on behalf of an end user whose token (issuer below, audience
  payments) has scope payments:write (ext_authz);
- nobody reaches /admin or anything under it, and nobody reaches the host admin.internal
  (native DENY).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.certs import CertificateAuthority
from meshward.compile import CompileOptions, Endpoint
from meshward.extauthz.server import ServeOptions
from meshward.policy import Request, evaluate, load
from meshward.policy.paths import PathRejected, normalize_path, strip_trailing_host_dot
from meshward.testing.echo import EchoServer
from meshward.testing.extauthz import start_mtls
from meshward.testing.jwt_issuer import LocalIssuer, unsigned_token
from meshward.testing.sidecar import StaticSidecar, client_context
from meshward.testing.topology import shop_yaml

TD = "cluster.local"
ORDERS_ID = f"spiffe://{TD}/ns/shop/sa/orders"
WORKLOAD = "shop/payments"

BASE = (
    shop_yaml(["payments"], mesh={"jwtEnforcement": "extauthz"})
    + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"]}}]
    to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"],
                     requestPrincipals: ["https://issuer.meshward.local/*"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/payments", "/payments/*"]}}]
    when: [{key: "request.auth.claims[scope]", values: ["payments:write"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
  - to: [{operation: {hosts: ["admin.internal", "admin.internal:*"]}}]
"""
)


@dataclass
class Response:
    status: int  # 0: no HTTP response (TLS refused, connection reset)
    headers: dict[str, str]
    body: bytes

    def seen(self) -> dict[str, Any]:
        """What the echo app saw (only for 200s)."""
        assert self.status == 200, (self.status, self.body[:200])
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Stack:
    port: int
    ca: CertificateAuthority
    issuer: LocalIssuer
    policy: Any
    workdir: Path
    orders: ssl.SSLContext

    def raw(
        self, head: str, *, context: ssl.SSLContext | None = None, body: bytes = b""
    ) -> Response:
        """Send ``head`` (request line + headers, CRLF-separated, without the blank line) over
        mTLS as ``context`` (default: orders) and read the response to the end."""
        context = context or self.orders
        data = head.rstrip("\r\n").encode("latin-1") + b"\r\nconnection: close\r\n"
        if body:
            data += f"content-length: {len(body)}\r\n".encode()
        data += b"\r\n" + body
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=10) as plain,
                context.wrap_socket(plain) as sock,
            ):
                sock.sendall(data)
                received = _read_response(sock)
        except (OSError, ssl.SSLError):
            return Response(0, {}, b"")
        if not received:
            return Response(0, {}, b"")
        head_bytes, _, payload = received.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            payload = _dechunk(payload)
        return Response(int(lines[0].split()[1]), headers, payload)

    def get(self, path: str, headers: Mapping[str, str] | None = None, **kw: Any) -> Response:
        return self.raw(_head("GET", path, headers), **kw)

    def pay(self, token: str | None, path: str = "/payments", **headers: str) -> Response:
        extra = dict(headers)
        if token is not None:
            extra["authorization"] = f"Bearer {token}"
        return self.raw(_head("POST", path, extra), body=b"{}")


def _head(method: str, path: str, headers: Mapping[str, str] | None) -> str:
    lines = [f"{method} {path} HTTP/1.1", "host: payments.shop"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return "\r\n".join(lines)


def _read_response(sock: ssl.SSLSocket) -> bytes:
    """One response, read up to its end (not to EOF: Envoy waits up to a second for the client
    to close first)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lowered = head.lower()
    length = None
    for line in lowered.split(b"\r\n")[1:]:
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while True:
        if length is not None and len(body) >= length:
            break
        if length is None and b"chunked" in lowered and body.endswith(b"0\r\n\r\n"):
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("hostile")
    issuer = LocalIssuer()
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    (policy_dir / "base.yaml").write_text(BASE)
    (policy_dir / "jwt.yaml").write_text(
        issuer.request_authentication_yaml(
            "shop", "payments-jwt", {"app": "payments"}, extra='    audiences: ["payments"]\n'
        )
    )
    policy = load([policy_dir])
    ca = CertificateAuthority.init(workdir / "ca", TD)
    running = start_mtls(
        ServeOptions(policy_paths=[policy_dir], poll_interval=60), ca, policy.mesh, workdir
    )
    try:
        with EchoServer("payments") as app:
            options = CompileOptions(
                extauthz=Endpoint("127.0.0.1", running.port),
                access_log_path=str(workdir / "access.log"),
            )
            sidecar = StaticSidecar(
                policy, WORKLOAD, ca, {8080: app.port}, options=options, workdir=workdir / "sc"
            )
            with sidecar:
                orders = client_context(ca, ORDERS_ID, workdir)
                yield Stack(sidecar.port(8080), ca, issuer, policy, workdir, orders)
                print(f"--- sidecar log ---\n{sidecar.envoy.log_tail(20)}")
    finally:
        running.stop()


def test_the_stack_allows_what_the_policy_allows(stack: Stack) -> None:
    """The control cases: without them every denial below would prove nothing."""
    assert stack.get("/payments/1").seen()["path"] == "/payments/1"
    good = stack.issuer.token("alice", aud="payments", scope="payments:write")
    seen = stack.pay(good).seen()
    assert seen["method"] == "POST" and seen["headers"]["x-meshward-user"].endswith("/alice")
    assert stack.get("/admin").status == 403


# -- tokens --------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(issuer: LocalIssuer, header_json: str, payload_json: str) -> str:
    """A compact JWS over the exact JSON text given (duplicate keys and all), RS256-signed with
    the issuer's real key: what the issuer would have to have signed."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = f"{_b64(header_json.encode())}.{_b64(payload_json.encode())}"
    signature = issuer.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _claims(issuer: LocalIssuer, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": issuer.issuer, "sub": "mallory", "aud": "payments",
              "scope": "payments:write", "iat": now, "exp": now + 600}  # fmt: skip
    claims.update(extra)
    return claims


_TOKENS: dict[int, dict[str, str]] = {}


def hostile_tokens(issuer: LocalIssuer) -> dict[str, str]:
    """Every hostile token, minted once per issuer (RSA keys are slow to make)."""
    if id(issuer) not in _TOKENS:
        _TOKENS[id(issuer)] = _mint_hostile_tokens(issuer)
    return _TOKENS[id(issuer)]


def _mint_hostile_tokens(issuer: LocalIssuer) -> dict[str, str]:
    now = int(time.time())
    good = issuer.token("mallory", aud="payments", scope="payments:write")
    header, payload, signature = good.split(".")
    public_pem = issuer.public_pem
    hs_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.kid}).encode())}"
    hs_input += f".{_b64(json.dumps(_claims(issuer)).encode())}"
    hs_sig = hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest()
    other = LocalIssuer(issuer.issuer, kid=issuer.kid)  # same name and kid, another key
    forged_payload = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged_payload["sub"] = "admin"
    inner = issuer.token("mallory", aud="payments", scope="payments:write")
    r_header, r_payload, r_signature = issuer.token(aud="payments", scope="payments:read").split(
        "."
    )
    raw_payload = base64.urlsafe_b64decode(r_payload + "==").decode()
    escalated = _b64((raw_payload[:-1] + ',"scope":"payments:write"}').encode())
    kid = issuer.kid
    return {
        "alg none": unsigned_token(_claims(issuer)),
        "alg none, signature kept": unsigned_token(_claims(issuer))[:-1] + signature,
        "alg NoNe": unsigned_token(_claims(issuer), {"alg": "NoNe", "kid": kid}),
        "HS256 keyed with the RSA public key": f"{hs_input}.{_b64(hs_sig)}",
        "signed by another key, same kid": other.token(aud="payments", scope="payments:write"),
        "payload swapped under a valid signature": (
            f"{header}.{_b64(json.dumps(forged_payload).encode())}.{signature}"
        ),
        "expired": issuer.token(
            aud="payments", scope="payments:write", exp=now - 3600, iat=now - 7200
        ),
        "nbf in the future": issuer.token(aud="payments", scope="payments:write", nbf=now + 3600),
        "iat in the future": issuer.token(aud="payments", scope="payments:write", iat=now + 3600),
        "wrong issuer": jwt.encode(
            _claims(issuer, iss="https://evil.example"), issuer.private_key, "RS256", {"kid": kid}
        ),
        "wrong audience": issuer.token(aud="orders", scope="payments:write"),
        "no audience": issuer.token(scope="payments:write"),
        "unknown kid": issuer.token(aud="payments", scope="payments:write", headers={"kid": "x"}),
        "RS512 in the header": jwt.encode(
            _claims(issuer), issuer.private_key, "RS512", headers={"kid": kid}
        ),
        "20 KB token (over ext_authz's limit)": issuer.token(
            aud="payments", scope="payments:write", pad="x" * 20_000
        ),
        "not base64": "!!!.@@@.###",
        "two segments": f"{header}.{payload}",
        "five segments (JWE shape)": f"{header}.{payload}.{signature}.x.y",
        "empty segments": "..",
        "duplicate alg, last none": _signed(
            issuer, f'{{"alg":"RS256","kid":"{kid}","alg":"none"}}', json.dumps(_claims(issuer))
        ),
        "duplicate scope, last one lacks payments:write": _signed(
            issuer,
            f'{{"alg":"RS256","kid":"{kid}"}}',
            json.dumps(_claims(issuer))[:-1] + ',"scope":"payments:read"}',
        ),
        "duplicate iss, last one foreign": _signed(
            issuer,
            f'{{"alg":"RS256","kid":"{kid}"}}',
            json.dumps(_claims(issuer))[:-1] + ',"iss":"https://evil.example"}',
        ),
        "duplicate scope appended without re-signing": f"{r_header}.{escalated}.{r_signature}",
        "nested JWT (cty JWT, payload is a token)": _signed(
            issuer, f'{{"alg":"RS256","kid":"{kid}","cty":"JWT"}}', json.dumps(inner)
        ),
        "nested JWT under alg none": (
            f"{_b64(json.dumps({'alg': 'none', 'cty': 'JWT'}).encode())}.{_b64(inner.encode())}."
        ),
        "claims not an object": _signed(issuer, f'{{"alg":"RS256","kid":"{kid}"}}', "[1,2]"),
        "exp not a number": issuer.token(aud="payments", scope="payments:write", exp="never"),
    }


TOKEN_CASES = sorted(_mint_hostile_tokens(LocalIssuer()))  # names only, for the test ids


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_hostile_tokens_are_refused(stack: Stack, case: str) -> None:
    token = hostile_tokens(stack.issuer)[case]
    response = stack.pay(token)
    assert response.status in (401, 403), (response.status, response.body[:300])
    if response.status == 403:  # only a token that verified may be judged on its claims
        assert case.startswith("duplicate scope, last"), response.body[:300]
    body = json.loads(response.body)  # quiet: a code and the trace id, no reason (issue 13)
    assert body["code"] == ("invalid_token" if response.status == 401 else "no_matching_allow")
    assert "reason" not in body and "policy" not in body, body
    assert "x-meshward-denied-by" not in response.headers


def test_a_1mb_token_never_reaches_the_app(stack: Stack) -> None:
    token = "a" * 1_000_000
    for response in (stack.pay(token), stack.get(f"/payments?access_token={token[:70_000]}")):
        assert response.status in (400, 401, 403, 413, 414, 431), response.status
        assert b'"service"' not in response.body


def test_a_bad_token_in_a_query_parameter_is_refused(stack: Stack) -> None:
    token = unsigned_token(_claims(stack.issuer))
    response = stack.raw(_head("POST", f"/payments?access_token={token}", {}), body=b"{}")
    assert response.status == 401, response.body[:200]


def test_two_authorization_headers_never_pass(stack: Stack) -> None:
    good = stack.issuer.token("alice", aud="payments", scope="payments:write")
    bad = unsigned_token(_claims(stack.issuer))
    for first, second in ((good, bad), (bad, good), (good, "garbage")):
        head = _head("POST", "/payments", {"authorization": f"Bearer {first}"})
        response = stack.raw(head + f"\r\nauthorization: Bearer {second}", body=b"{}")
        assert response.status in (400, 401, 403), (response.status, response.body[:200])


# -- paths -----------------------------------------------------------------------------------------
PATHS = [
    "/x/..;/admin", "/x/.;/admin", "/x/..;x=1/admin", "/x/..;;/admin/users", "/x/y/..;/..;/admin",
    "//x//..;//admin", "/x/..;\\..;\\admin", "/x/..;%00/admin", "/x/..;%2F/admin", "/admin/..;",
    "/x/%2e%2e;/admin", "/x/.%2e;/admin", "/x\\..;/admin", "/x/..%3b/admin",
    "/admin", "/admin/", "/admin/users", "/./admin", "/x/../admin", "/x/%2e%2e/admin",
    "/%2e%2e/admin", "/x/%2E%2E/admin/users", "/x/.%2e/admin", "//admin", "///admin//users",
    "/admin%2Fusers", "/x%2F..%2Fadmin", "/x%2f..%2fadmin", "/x%5C..%5Cadmin", "/x\\..\\admin",
    "/admin%00", "/%00/../admin", "/adm%00in", "/ADMIN", "/Admin/users", "/admin;x=1",
    "/admin;/users", "/%61dmin", "/adm%69n/users", "/admin?x=1", "/admin#frag",
    "/admin%23frag", "/admin/.", "/admin/..", "/admin/../payments", "/admin%2e", "/admin.",
    "/admin%20", "/%2fadmin", "/payments/../../admin", "/payments/%2e%2e/%2e%2e/admin",
    "/admin%252F", "/.admin", "/payments",
    # escaped dots keep their ';' parameters in Envoy: 400 before authorization
    "/a/%2e;/b", "/%2E%2E;x/admin", "/x/%2E%2e;x=1/admin", "/ok?next=/..;/x", "/payments?x=/%2e%2e;/a",
    # and with the ';' escaped
    "/x/%2e%2e%3b/admin", "/x/..%3B/admin", "/x/.%3b/admin", "/payments/..%3b", "/a/b..%3b/c",
]  # fmt: skip


def _expected(stack: Stack, raw: str) -> tuple[int, str | None]:
    """(status, path the app must see) by the Python evaluator, which normalizes like Envoy."""
    try:
        path = normalize_path(raw)
    except PathRejected:
        return 400, None
    workload = stack.policy.workload(WORKLOAD)
    decision = evaluate(
        stack.policy,
        workload,
        Request(method="GET", path=raw, source_principal=ORDERS_ID, host="payments.shop",
                destination_port=8080),
        now=datetime.now(UTC),
    )  # fmt: skip
    if decision.reason.startswith("rejected before authorization (HTTP 400)"):
        return 400, None
    return (200, path) if decision.allowed else (403, None)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("/x/%2e%2e;/admin", 400),  # Envoy would forward /x/..;/admin: Tomcat serves /admin
        ("/x/.%2e;/admin", 400),
        ("/a/%2e;/b", 400),
        ("/%2E%2E;x/admin", 400),
        ("/ok?next=/..;/x", 200),  # the query is not the path
        ("/x/..;/admin", 403),  # literal: Envoy strips the parameters, the DENY on /admin applies
        # the ';' escaped: Envoy keeps %3B as sent and strips nothing; an app (or a proxy) that
        # decodes once reads /x/..;/admin. Refused like the raw form (these used to pass).
        ("/x/..%3b/admin", 400),
        ("/x/..%3B/admin", 400),
        ("/x/%2e%2e%3b/admin", 400),
        ("/x/%2E%2e%3B/admin", 400),
        ("/x/.%3B/admin", 400),
        ("/x/.%2E%3bx=1/admin", 400),
        ("/ok?next=/..%3b/x", 200),  # the query is not the path
    ],
)
def test_escaped_dot_segments_with_parameters_are_refused_before_authorization(
    stack: Stack, raw: str, status: int
) -> None:
    response = stack.get(raw)
    assert response.status == status, (response.status, response.body[:200])
    if status == 400:
        assert b"'..' path segment with ';' parameters" in response.body


@pytest.mark.parametrize("raw", PATHS)
def test_paths_cannot_reach_admin_and_envoy_decides_like_the_evaluator(
    stack: Stack, raw: str
) -> None:
    response = stack.get(raw)
    expected, path = _expected(stack, raw)
    assert response.status == expected, (response.status, response.body[:200])
    if response.status == 200:
        seen = response.seen()["path"].split("?")[0]
        assert seen == path  # the app gets exactly the path the policy was checked against
        assert not (seen == "/admin" or seen.startswith("/admin/"))


# -- headers -----------------------------------------------------------------------------------------
SPOOFED = {
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/shop/sa/payments;"
    "URI=spiffe://cluster.local/ns/meshward-system/sa/admin",
    "x-meshward-principal": "spiffe://cluster.local/ns/meshward-system/sa/admin",
    "x-meshward-user": "https://issuer.meshward.local/root",
    "X-Meshward-Denied-By": "nobody",
    "x-meshward-anything": "1",
}


def _xfcc_uris(seen: dict[str, Any]) -> list[str]:
    xfcc = seen["headers"].get("x-forwarded-client-cert", "")
    return [
        part.split("=", 1)[1]
        for part in xfcc.replace(",", ";").split(";")
        if part.startswith("URI=")
    ]


def test_spoofed_identity_headers_are_stripped_on_native_routes(stack: Stack) -> None:
    seen = stack.get("/payments/1", SPOOFED).seen()
    assert _xfcc_uris(seen) == [ORDERS_ID]  # set by the sidecar from the verified certificate
    assert not [h for h in seen["headers"] if h.startswith("x-meshward-")], seen["headers"]


def test_spoofed_identity_headers_are_replaced_on_ext_authz_routes(stack: Stack) -> None:
    good = stack.issuer.token("alice", aud="payments", scope="payments:write")
    seen = stack.pay(good, **SPOOFED).seen()
    assert _xfcc_uris(seen) == [ORDERS_ID]
    meshward = {k: v for k, v in seen["headers"].items() if k.startswith("x-meshward-")}
    assert meshward == {
        "x-meshward-principal": ORDERS_ID,
        "x-meshward-user": f"{stack.issuer.issuer}/alice",
    }


def test_a_duplicated_spoofed_header_is_stripped_too(stack: Stack) -> None:
    head = _head("GET", "/payments/1", {"x-meshward-user": "a"}) + "\r\nX-MESHWARD-USER: b"
    head += "\r\nx-forwarded-client-cert: URI=spiffe://evil\r\nx-forwarded-client-cert: x"
    seen = stack.raw(head).seen()
    assert "x-meshward-user" not in seen["headers"]
    assert _xfcc_uris(seen) == [ORDERS_ID]


@pytest.mark.parametrize(
    ("target", "host", "denied"),
    [
        ("/payments/1", "admin.internal", True),
        ("/payments/1", "ADMIN.internal:8080", True),
        ("/payments/1", "admin.internal.", True),  # strip_trailing_host_dot
        ("/payments/1", "admin.internal.:8080", True),
        ("http://admin.internal/payments/1", "payments.shop", True),
        ("http://payments.shop/payments/1", "admin.internal", False),
        ("http://payments.shop/admin", "payments.shop", True),
    ],
)
def test_the_host_the_policy_judges_is_the_host_the_app_sees(
    stack: Stack, target: str, host: str, denied: bool
) -> None:
    """HTTP/1.1 absolute-form: the URI's authority is the request's authority (RFC 9112 3.2.2)
    and Envoy forwards it as Host; a Host header saying otherwise is ignored by both."""
    response = stack.raw(f"GET {target} HTTP/1.1\r\nhost: {host}")
    if denied:
        assert response.status == 403, response.body[:200]
    else:
        seen = response.seen()
        assert seen["headers"]["host"] == "payments.shop"


@pytest.mark.parametrize(
    "hosts",
    [
        ("payments.shop", "admin.internal"),
        ("admin.internal", "payments.shop"),
        ("payments.shop", "payments.shop"),
        ("payments.shop", "payments.shop:8080"),
    ],
)
def test_two_host_headers_are_refused(stack: Stack, hosts: tuple[str, str]) -> None:
    """Envoy 1.40 joins two Host lines into one authority ('payments.shop,admin.internal'),
    which no host rule matches and which the app would read as it likes; RFC 9112 3.2 says 400.
    The compiled config answers 400 before authorization, and so does the evaluator."""
    first, second = hosts
    response = stack.raw(f"GET /payments/1 HTTP/1.1\r\nhost: {first}\r\nhost: {second}")
    assert response.status == 400, (response.status, response.body[:200])
    assert b"exactly one host" in response.body
    decision = evaluate(
        stack.policy,
        stack.policy.workload(WORKLOAD),  # type: ignore[arg-type]
        Request(method="GET", path="/payments/1", source_principal=ORDERS_ID,
                host=f"{first},{second}", destination_port=8080),
        now=datetime.now(UTC),
    )  # fmt: skip
    assert not decision.allowed and "rejected before authorization (HTTP 400)" in decision.reason


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("payments.shop", 200),
        ("PAYMENTS.shop:8080", 200),
        ("127.0.0.1:8080", 200),
        ("[::1]:8080", 200),
        ("payments.shop, admin.internal", 400),
        ("admin.internal@payments.shop", 400),
        ("%61dmin.internal", 400),
        ("payments.shop;admin.internal", 400),
        ("payments.shop.", 200),  # the app sees payments.shop
        ("payments.shop.:8080", 200),
        ("admin.internal.", 403),  # and so does the DENY on admin.internal
    ],
)
def test_only_one_plain_host_is_accepted(stack: Stack, host: str, status: int) -> None:
    response = stack.raw(f"GET /payments/1 HTTP/1.1\r\nhost: {host}")
    assert response.status == status, (response.status, response.body[:200])
    if status == 200:
        assert response.seen()["headers"]["host"] == strip_trailing_host_dot(host)
    decision = evaluate(
        stack.policy,
        stack.policy.workload(WORKLOAD),  # type: ignore[arg-type]
        Request(method="GET", path="/payments/1", source_principal=ORDERS_ID, host=host,
                destination_port=8080),
        now=datetime.now(UTC),
    )  # fmt: skip
    assert decision.allowed is (status == 200), decision.reason


# -- identity ------------------------------------------------------------------------------------------
def _context_with(cert_pem: bytes, key_pem: bytes, ca: CertificateAuthority, directory: Path,
                  name: str) -> ssl.SSLContext:  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.trust_bundle().roots_pem.decode())
    (directory / f"{name}.crt").write_bytes(cert_pem)
    key = directory / f"{name}.key"
    key.write_bytes(key_pem)
    key.chmod(0o600)
    context.load_cert_chain(directory / f"{name}.crt", key)
    return context


def _signed_by_the_mesh_ca(
    stack: Stack, uri: str | None, dns: str | None = None, *, expired: bool = False
) -> tuple[bytes, bytes]:
    """A leaf signed with the mesh CA's own intermediate key (as if the key leaked or the CA
    misissued) carrying ``uri`` / ``dns`` as its SANs; ``expired``: valid until a minute ago."""
    from cryptography.hazmat.primitives import hashes

    generation = stack.workdir / "ca" / "gen-0001"
    intermediate = x509.load_pem_x509_certificate((generation / "intermediate.pem").read_bytes())
    signer = serialization.load_pem_private_key(
        (generation / "intermediate.key").read_bytes(), None
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    if uri:
        names.append(x509.UniformResourceIdentifier(uri))
    if dns:
        names.append(x509.DNSName(dns))
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now - timedelta(seconds=1) if expired else now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(intermediate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + intermediate.public_bytes(
        serialization.Encoding.PEM
    )
    return chain, key_pem


def test_callers_without_a_valid_mesh_identity_are_refused(stack: Stack, tmp_path: Path) -> None:
    stranger = CertificateAuthority.ephemeral(TD)  # same trust domain, another CA
    foreign = stranger.issue(ORDERS_ID)
    contexts = {
        "certificate from another CA": _context_with(
            foreign.cert_chain_pem, foreign.private_key_pem, stack.ca, tmp_path, "foreign"
        ),
        "expired SVID of the right identity": _context_with(
            *_signed_by_the_mesh_ca(stack, ORDERS_ID, expired=True), stack.ca, tmp_path, "expired"
        ),
        "URI SAN in another trust domain, signed by the mesh CA": _context_with(
            *_signed_by_the_mesh_ca(stack, "spiffe://evil.example/ns/shop/sa/orders"),
            stack.ca,
            tmp_path,
            "other-td",
        ),
        "DNS SAN only, signed by the mesh CA": _context_with(
            *_signed_by_the_mesh_ca(stack, None, "orders.shop"), stack.ca, tmp_path, "dns"
        ),
        "no client certificate (STRICT)": client_context(stack.ca, None, tmp_path),
    }
    for case, context in contexts.items():
        response = stack.get("/payments/1", context=context)
        assert response.status in (0, 403), (case, response.status, response.body[:200])
        assert b'"service"' not in response.body, case
    plaintext = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
    with plaintext:
        plaintext.sendall(b"GET /payments/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        try:
            answer = plaintext.recv(65536)
        except OSError:
            answer = b""
        assert b"200 OK" not in answer
