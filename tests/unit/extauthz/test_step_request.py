"""Step 1 alone: the CheckRequest protobuf read into plain values, or refused."""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2

from meshward.extauthz import request
from meshward.extauthz.client import build_check_request
from meshward.extauthz.request import PORT_KEY, HttpCheck
from meshward.extauthz.result import Rejection


def test_reads_the_http_attributes_and_the_declared_port() -> None:
    check_request = build_check_request(
        method="POST",
        path="/a/../b?x=1",
        host="httpbin.foo",
        headers={"X-Team": "blue"},
        source_principal="spiffe://cluster.local/ns/web/sa/frontend",
        destination_port=15006,
        workload="foo/httpbin",
        sni="httpbin.foo.svc",
    )
    check_request.attributes.context_extensions[PORT_KEY] = "8000"
    read = request.read(check_request)
    assert isinstance(read, HttpCheck)
    assert (read.method, read.raw_path, read.host) == ("POST", "/a/../b?x=1", "httpbin.foo")
    assert read.headers["x-team"] == "blue"
    assert read.destination_port == 8000  # rules name declared ports, not the runtime one
    assert read.workload == "foo/httpbin"
    assert read.source_principal == "spiffe://cluster.local/ns/web/sa/frontend"
    assert (read.source_ip, read.sni) == ("127.0.0.1", "httpbin.foo.svc")
    assert read.jwt_payload() is None  # no jwt_authn metadata


def test_a_port_extension_that_is_not_a_number_falls_back_to_the_socket_port() -> None:
    check_request = build_check_request(path="/", destination_port=15006)
    check_request.attributes.context_extensions[PORT_KEY] = (
        "\uff18\uff10"  # fullwidth digits: isdigit() but not ASCII
    )
    read = request.read(check_request)
    assert isinstance(read, HttpCheck) and read.destination_port == 15006
    assert read.workload == ""  # no extension: the input step looks the workload up


def test_no_method_or_path_is_a_malformed_request() -> None:
    read = request.read(external_auth_pb2.CheckRequest())
    assert isinstance(read, Rejection)
    assert (read.status, read.code) == (403, "malformed_request")


def test_an_oversized_path_is_refused_and_reported_clipped() -> None:
    read = request.read(build_check_request(path="/" + "a" * (request.MAX_PATH_BYTES + 1)))
    assert isinstance(read, Rejection) and read.code == "request_too_large"
    assert len(read.path) == 256


def test_too_many_header_bytes_are_refused() -> None:
    headers = {f"x-h{i}": "v" * 1024 for i in range(100)}
    read = request.read(build_check_request(path="/", headers=headers))
    assert isinstance(read, Rejection) and "bytes of headers" in read.reason


def test_raw_header_map_is_lowercased_and_repeats_are_joined() -> None:
    check_request = build_check_request(path="/")
    http = check_request.attributes.request.http
    http.ClearField("headers")
    for key, value in (("X-Team", b"blue"), ("x-team", b"red"), (":path", b"/")):
        http.header_map.headers.add(key=key, raw_value=value)
    read = request.read(check_request)
    assert isinstance(read, HttpCheck)
    assert read.headers == {"x-team": "blue,red", ":path": "/"}
