"""The backstop's regexes read from the messages equal those read from their JSON form, for
every resource the compiler emits (and it still finds the one Envoy would refuse)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from meshward.compile import CompileOptions, Endpoint, Mode, compile_mesh
from meshward.compile.envoy_limits import message_problems, regexes
from meshward.compile.message_regexes import message_regexes
from meshward.compile.workload import to_dict
from meshward.policy import load, parse
from meshward.testing import topology

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NOW = datetime(2030, 1, 1, tzinfo=UTC)
LONG = "/x/" + "/".join(["{*}"] * 40) + "/y"
POLICY = f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: orders, namespace: shop, labels: {{app: orders}}}}
spec:
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-long, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["{LONG}", "/a/{{*}}/b", "*.png"]}}}}]}}]
"""


def _compare(compiled: dict[str, object]) -> int:
    found = 0
    for resources in compiled.values():
        for messages in resources.by_type().values():  # type: ignore[attr-defined]
            for message in messages:
                expected = list(regexes(to_dict(message)))
                assert list(message_regexes(message)) == expected, message.name
                found += len(expected)
    return found


def test_same_regexes_as_the_json_form() -> None:
    options = CompileOptions(
        mode=Mode.XDS, extauthz=Endpoint("127.0.0.1", 9191), otlp=Endpoint("127.0.0.1", 4317)
    )
    assert _compare(compile_mesh(load([EXAMPLES]), options, now=NOW)) > 0
    assert _compare(compile_mesh(topology.fleet(40), CompileOptions(), now=NOW)) >= 0
    assert _compare(compile_mesh(topology.worst_case(15), CompileOptions(), now=NOW)) >= 0


def test_the_refused_regex_is_still_found() -> None:
    compiled = compile_mesh(parse({"m.yaml": POLICY}), CompileOptions(), now=NOW)
    assert _compare(compiled) >= 2
    problems = [
        p
        for messages in compiled["shop/orders"].by_type().values()
        for m in messages
        for p in message_problems(m)
    ]
    assert problems and "RE2 program size" in problems[0]


def test_an_any_seen_before_gives_the_same_regexes_from_the_memo() -> None:
    from meshward.compile import message_regexes as module

    compiled = compile_mesh(parse({"m.yaml": POLICY}), CompileOptions(), now=NOW)
    routes = compiled["shop/orders"].routes or compiled["shop/orders"].listeners
    module._IN_ANY = module.AnyMemo()  # a fresh memo: the first walk fills it
    first = [list(message_regexes(m)) for m in routes]
    held = len(module._IN_ANY)
    assert held > 0
    again = [list(message_regexes(m)) for m in routes]
    assert again == first and len(module._IN_ANY) == held
    assert any(LONG.split("/")[1] in r for found in again for r in found)  # the DENY's regexes
