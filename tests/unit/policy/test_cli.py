"""`meshward policy validate|explain|test|diff`, run in-process through the real entry point."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from meshward.cli import build_parser, main
from meshward.cli import policy as policy_cli

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
CASES = EXAMPLES / "cases.yaml"
TOKEN = '{"iss": "https://auth.shop.example", "sub": "alice", "scope": "payments:write"}'


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", str(EXAMPLES), "--strict")
    assert code == 0, err
    assert "valid: 5 workloads, 7 authorization policies" in out
    assert "version: " in out and err == ""


def test_validate_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec:\n  selector: {matchLabel: {app: x}}\n  rules:\n  - to:\n    - operation:\n"
        "        methods: GET\n        ports: ['99999']\n"
    )
    code, out, err = run(capsys, "validate", str(bad))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[-1] == "3 errors; nothing was loaded"
    assert (
        f"error: {bad}#1 spec.selector.matchLabel: unknown field (did you mean 'matchLabels'?)"
        in lines
    )
    assert (
        f"error: {bad}#1 spec.rules[0].to[0].operation.methods: expected a list of strings" in lines
    )
    code, out, _ = run(capsys, "validate", str(bad), "--json")
    payload = json.loads(out)
    assert code == 1 and payload["valid"] is False and len(payload["errors"]) == 3
    assert payload["errors"][0]["field"] == "spec.rules[0].to[0].operation.methods"


def test_validate_strict_fails_on_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\n"
        "spec: {rules: [{}]}\n"
    )
    code, _, err = run(capsys, "validate", str(tmp_path))
    assert code == 0 and "warning: " in err
    code, out, _ = run(capsys, "validate", str(tmp_path), "--strict", "--json")
    assert code == 1 and json.loads(out)["warnings"]


def test_explain_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "explain", str(EXAMPLES), "--workload", "shop/payments",
        "--source-principal", "cluster.local/ns/shop/sa/orders", "--method", "POST",
        "--path", "/payments", "--claims", TOKEN, "--json",
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out)
    assert {"decision", "policy", "rule", "reason", "dry_run", "audit"} <= payload.keys()
    assert payload["decision"] == "allow"
    assert payload["policy"] == "shop/payments-allow-orders-with-user"
    assert payload["rule"] == 0 and payload["audit"] is False
    assert [(d["policy"], d["would_deny"]) for d in payload["dry_run"]] == [
        ("shop/payments-deny-scraper", False)
    ]


def test_explain_text_shows_why(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "explain", str(EXAMPLES), "--workload", "shop/payments",
        "--source-workload", "shop/orders", "--method", "POST", "--path", "/payments/../admin",
        "--claims", TOKEN,
    )  # fmt: skip
    assert code == 0
    assert "DENY: denied by DENY policy shop/payments-deny-admin rule 0" in out
    assert "path '/payments/../admin' normalized to '/admin'" in out
    code, out, _ = run(
        capsys, "explain", str(EXAMPLES), "--workload", "shop/payments",
        "--source-workload", "shop/orders", "--method", "POST", "--path", "/payments",
    )  # fmt: skip
    assert "DENY: no ALLOW policy matched" in out
    assert "request principal none does not match ['https://auth.shop.example/*']" in out


def test_explain_dry_run_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "explain", str(EXAMPLES), "--workload", "shop/payments",
        "--source-principal", "spiffe://cluster.local/ns/shop/sa/metrics-scraper",
        "--path", "/metrics", "--header", "X-Probe=1", "--json",
    )  # fmt: skip
    payload = json.loads(out)
    assert code == 0 and payload["decision"] == "allow"
    assert payload["dry_run"] == [
        {
            "policy": "shop/payments-deny-scraper",
            "action": "DENY",
            "matched": True,
            "rule": 0,
            "would_deny": True,
            "decision": "deny",
        }
    ]


def test_explain_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["policy", "explain", str(EXAMPLES), "--workload", "orders"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["policy", "explain", str(EXAMPLES), "--workload", "shop/orders", "--claims", "[1]"])
    capsys.readouterr()
    code, _, err = run(capsys, "explain", str(EXAMPLES), "--workload", "shop/nope")
    assert code == 1 and "unknown workload 'shop/nope'" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--source-ip", "999.1.1.1"], "argument --source-ip: '999.1.1.1' is not an IP address"),
        (["--source-ip", "10.0.0.1:80"], "is not an IP address"),
        (["--port", "99999"], "argument --port: 99999 is not a port number (1-65535)"),
        (["--port", "0"], "is not a port number"),
        (["--port", "-1"], "is not a port number"),
        (["--port", "http"], "'http' is not a port number"),
        (["--source-principal", "frontend"], "'frontend' is not a mesh identity"),
        (["--source-principal", "spiffe://cluster.local/sa/x"], "is not a mesh identity"),
        (["--method", "GE T"], "is not an HTTP method"),
        (["--header", "bad name=1"], "is not an HTTP token"),
    ],
)
def test_explain_refuses_inputs_no_request_could_carry(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """These used to be explained as if they were real (a principal 'frontend', port 99999)."""
    with pytest.raises(SystemExit) as info:
        main(["policy", "explain", str(EXAMPLES), "--workload", "shop/orders", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err


def test_explain_accepts_both_principal_forms_and_suggests_a_workload(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for principal in (
        "cluster.local/ns/shop/sa/frontend",
        "spiffe://cluster.local/ns/shop/sa/frontend",
    ):
        code, out, _ = run(capsys, "explain", str(EXAMPLES), "--workload", "shop/orders",
                           "--source-principal", principal, "--source-ip", "fd00::7",
                           "--method", "POST", "--path", "/orders", "--port", "8080", "--json")  # fmt: skip
        assert code == 0 and json.loads(out)["decision"] == "allow"
    code, _, err = run(capsys, "explain", str(EXAMPLES), "--workload", "shop/order")
    assert code == 1 and "did you mean 'shop/orders'?" in err


def test_policy_test_says_the_cases_file_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to be reported as "1 problem in policy files"."""
    code, _, err = run(capsys, "test", str(EXAMPLES), "--cases", str(tmp_path / "nope.yaml"))
    assert code == 1 and "Traceback" not in err
    assert f"cases file {tmp_path / 'nope.yaml'} does not exist" in err
    assert "policy files" not in err
    code, _, err = run(capsys, "test", str(EXAMPLES), "--cases", str(tmp_path))
    assert code == 1 and "is a directory" in err


def test_policy_test_suggests_the_field_a_typo_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "apiVersion: meshward.dev/v1\nkind: PolicyTests\nnwo: 2030-01-01T00:00:00Z\ncases:\n"
        "  - {to: shop/orders, expect: allow, form: shop/frontend, sourceip: 10.0.0.1,"
        " dryrunDenies: [], zzz: 1}\n"
        "  - {to: shop/orders, expect: deny, principal: frontend, port: 99999}\n"
    )
    code, _, err = run(capsys, "test", str(EXAMPLES), "--cases", str(cases))
    assert code == 1 and "in the cases file" in err and "policy files" not in err
    assert "nwo: unknown field (did you mean 'now'?)" in err
    assert "cases[0].form: unknown field (did you mean 'from'?)" in err
    assert "cases[0].sourceip: unknown field (did you mean 'sourceIp'?)" in err
    assert "cases[0].dryrunDenies: unknown field (did you mean 'dryRunDenies'?)" in err
    assert "cases[0].zzz: unknown field (expected one of: name, to, from," in err
    assert "cases[1].principal: 'frontend' is not a mesh identity" in err
    assert "cases[1].port: 99999 is not a port number" in err


def test_policy_test_passes_on_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "test", str(EXAMPLES), "--cases", str(CASES))
    assert code == 0, out
    assert out.splitlines()[-1].endswith("passed, 0 failed")


def test_policy_test_fails_with_a_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "apiVersion: meshward.dev/v1\nkind: PolicyTests\ncases:\n"
        "  - {name: wrong, from: shop/frontend, to: shop/orders, method: POST, path: /orders,"
        " expect: deny, policy: shop/other}\n"
        "  - {name: right, from: shop/frontend, to: shop/orders, expect: deny, path: /x}\n"
    )
    code, out, _ = run(capsys, "test", str(EXAMPLES), "--cases", str(cases), "-q")
    assert code == 1
    assert "FAIL wrong" in out and "PASS right" not in out
    assert "decision: - expected 'deny'" in out and "+ actual   'allow'" in out
    assert "policy: - expected 'shop/other'" in out
    assert out.splitlines()[-1] == "1 passed, 1 failed"
    code, out, _ = run(capsys, "test", str(EXAMPLES), "--cases", str(cases), "--json")
    payload = json.loads(out)
    assert payload["failed"] == 1 and payload["cases"][0]["decision"] == "allow"


def test_policy_test_rejects_bad_case_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "apiVersion: meshward.dev/v1\nkind: PolicyTests\ncases:\n  - {to: shop/orders, expect: maybe, colour: red}\n"
    )
    code, _, err = run(capsys, "test", str(EXAMPLES), "--cases", str(cases))
    assert code == 1
    assert 'cases[0].expect: expected "allow" or "deny"' in err
    assert "cases[0].colour: unknown field" in err


def test_diff_lists_changed_flows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new"
    shutil.copytree(EXAMPLES, new)
    orders = new / "orders.yaml"
    orders.write_text(orders.read_text().replace('methods: ["GET", "POST"]', 'methods: ["GET"]'))
    code, out, _ = run(capsys, "diff", str(EXAMPLES), str(new), "--exit-code")
    assert code == 1
    assert "shop/frontend -> shop/orders:8080 POST /orders: allow -> deny" in out
    assert all(
        "-> shop/orders" in line for line in out.splitlines() if "->" in line and ":" in line
    )
    code, out, _ = run(capsys, "diff", str(EXAMPLES), str(new), "--json")
    payload = json.loads(out)
    assert code == 0 and payload["changes"]
    assert {(c["source"], c["method"], c["before"], c["after"]) for c in payload["changes"]} >= {
        ("shop/frontend", "POST", "allow", "deny")
    }
    code, out, _ = run(capsys, "diff", str(EXAMPLES), str(EXAMPLES), "--exit-code")
    assert code == 0 and out.startswith("no change")


def test_diff_finds_jwt_flows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new"
    shutil.copytree(EXAMPLES, new)
    payments = new / "payments.yaml"
    payments.write_text(
        payments.read_text().replace('values: ["payments:write"]', 'values: ["payments:admin"]')
    )
    code, out, _ = run(capsys, "diff", str(EXAMPLES), str(new))
    assert code == 0
    assert "shop/orders -> shop/payments:8080 POST /payments with token" in out
    assert "allow -> deny" in out and "deny -> allow" in out


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("validate", "explain", "test", "diff"):
        with pytest.raises(SystemExit) as info:
            main(["policy", sub, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out
    assert "policy" in build_parser().format_help()


def test_compile_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiler package plugs `compile` in by providing configure_compile(subparsers)."""
    import argparse

    seen: list[object] = []
    module = types.ModuleType("meshward.compile.compile_cli")

    def configure_compile(subparsers: object) -> None:
        seen.append(subparsers)
        parser = subparsers.add_parser("compile", help="x")  # type: ignore[attr-defined]
        parser.set_defaults(func=lambda args: 0)

    module.configure_compile = configure_compile  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "meshward.compile.compile_cli", module)
    parser = argparse.ArgumentParser()
    policy_cli.configure(parser)
    assert seen and parser.parse_args(["compile"]).func(None) == 0
