"""End-user JWT rules: who should decide them, as ratios measured side by side in one run (issue 16).

(Not bench/jwt.py: a script's directory comes first on sys.path, and that name would shadow
PyJWT's ``jwt`` module.)

Same rule, same load, three Envoys (one worker each, direct 200 response), driven by wrk:

- rbac-only:   native RBAC on an equivalent rule without the JWT (paths /bench*, GET);
- jwt_authn:   Meshward's compiled jwt_authn filter (token cache on) + the compiled RBAC rule
               (paths /bench*, GET, request.auth.claims[groups] = admin) - jwtEnforcement native;
- ext_authz:   the same rule decided by `meshward extauthz serve` (decision-cache hits) -
               jwtEnforcement extauthz, the earlier path.

Reported: requests/s (saturated, wrk -c16), Envoy CPU per request, and p50/p99 unloaded (wrk -c1);
ratios against rbac-only (target: jwt_authn >= 0.8 by requests/s and by Envoy CPU). Rounds are
interleaved and the median of per-round ratios is reported (the cores are shared).

    python bench/jwt_native.py [--duration 3] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import extauthz as xb  # noqa: E402  (wrk, service process, policy)
from meshward.envoy.process import EnvoyProcess  # noqa: E402
from meshward.extauthz.envoyconfig import T_RBAC, rbac_allow_paths, sidecar  # noqa: E402
from meshward.testing.jwt_issuer import LocalIssuer  # noqa: E402
from meshward.testing.processes import Launcher  # noqa: E402


def native_filters(issuer: LocalIssuer) -> list[dict[str, Any]]:
    """What Meshward compiles for the bench workload under jwtEnforcement native: the jwt_authn
    filter and the RBAC ALLOW rule on its payload (meshward.compile, not hand-written)."""
    from meshward.compile.authz import jwt_authn
    from meshward.compile.authz.rbac_policy import RuleContext, rule_policy
    from meshward.policy import parse

    text = xb.policy_yaml(issuer).replace("jwtEnforcement: extauthz", "jwtEnforcement: native")
    policy_set = parse({"bench.yaml": text})
    verify = jwt_authn.jwt_authn_filter(policy_set.request_authentications, {})
    assert verify is not None
    (policy,) = policy_set.authorization_policies
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": T_RBAC,
            "rules": {
                "action": "ALLOW",
                "policies": {"admins": rule_policy(policy.rules[0], RuleContext(port_map={}))},
            },
        },
    }
    return [verify, rbac]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk (Debian) and run again")

    issuer = LocalIssuer()
    token = issuer.token(groups=["admin"], ttl=3600)
    workdir = Path(tempfile.mkdtemp(prefix="bench-jwt-"))
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    (policy_dir / "bench.yaml").write_text(xb.policy_yaml(issuer))  # jwtEnforcement: extauthz
    from meshward.certs.ca import CertificateAuthority
    from meshward.policy import load
    from meshward.testing.extauthz import issue_service_tls, sidecar_tls

    ca = CertificateAuthority.ephemeral("cluster.local")
    mesh = load([policy_dir]).mesh
    tls_dir = issue_service_tls(ca, mesh, workdir / "extauthz-tls").directory
    upstream_tls = sidecar_tls(ca, "spiffe://cluster.local/ns/foo/sa/bench", mesh)
    print(
        f"cpus: {os.cpu_count()}  wrk -t1 -c{args.connections} -d{args.duration:g}s "
        f"x {args.rounds} rounds (median); Envoy --concurrency 1; tracing off"
    )
    names = ("rbac-only", "jwt_authn", "ext_authz")
    saturated: dict[str, list[xb.WrkResult]] = {n: [] for n in names}
    unloaded: dict[str, list[xb.WrkResult]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        launcher = stack.enter_context(Launcher(workdir / "processes", quiet=True))
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name in names:
            if name == "ext_authz":
                port, _ = xb.service_process(launcher, "extauthz", "sync", policy_dir, tls_dir)
                config = sidecar(
                    workload=xb.WORKLOAD,
                    extauthz_port=port,
                    timeout_ms=2000,
                    extauthz_tls=upstream_tls,
                )
            else:
                extra = (
                    [rbac_allow_paths(["/bench"])]
                    if name == "rbac-only"
                    else native_filters(issuer)
                )
                config = sidecar(workload=xb.WORKLOAD, extauthz_port=None, extra_filters=extra)
            envoy = stack.enter_context(
                EnvoyProcess(config, name=f"bench-{name}", workdir=workdir / name)
            )
            ports[name] = envoy.listener_port("ingress")
            assert envoy.pid is not None
            pids[name] = envoy.pid
        url = "http://127.0.0.1:{}/bench/x"
        for port in ports.values():  # warm: token and decision caches, connections
            xb.wrk(url.format(port), duration=1, connections=args.connections, token=token)
        for round_ in range(args.rounds):
            for name, port in ports.items():
                before = xb.cpu_seconds(pids[name])
                result = xb.wrk(
                    url.format(port),
                    duration=args.duration,
                    connections=args.connections,
                    token=token,
                )
                result.cpu_us = (xb.cpu_seconds(pids[name]) - before) / result.requests * 1e6
                if result.non_2xx:
                    raise SystemExit(f"{name}: {result.non_2xx} non-2xx responses: setup is wrong")
                saturated[name].append(result)
                unloaded[name].append(
                    xb.wrk(url.format(port), duration=args.duration, connections=1, token=token)
                )
            print(
                f"  round {round_ + 1}: "
                + "  ".join(f"{n} {r[-1].rps:,.0f}/s" for n, r in saturated.items())
            )

    def med(results: dict[str, list[xb.WrkResult]], name: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[name]))

    def ratio(a: str, b: str) -> float:
        return statistics.median(
            x.rps / y.rps for x, y in zip(saturated[a], saturated[b], strict=True)
        )

    base = "rbac-only"
    print(f"\nsame rule, same load (wrk -c{args.connections}); ratios vs {base}")
    print(f"  {'':<10} {'req/s':>8} {'ratio':>6}   {'Envoy CPU/req':>13} {'ratio':>6}"
          f"   unloaded p50 / p99 (added vs {base})")  # fmt: skip
    for name in names:
        cpu = med(saturated, name, "cpu_us")
        p50, p99 = med(unloaded, name, "p50_ms"), med(unloaded, name, "p99_ms")
        added50 = p50 - med(unloaded, base, "p50_ms")
        added99 = p99 - med(unloaded, base, "p99_ms")
        print(
            f"  {name:<10} {med(saturated, name, 'rps'):>8,.0f} {ratio(name, base):>6.2f}"
            f"   {cpu:>10.1f} us {med(saturated, base, 'cpu_us') / cpu:>6.2f}"
            f"   {p50:.2f} / {p99:.2f} ms ({added50:+.2f} / {added99:+.2f})"
        )
    print(
        "  target: jwt_authn >= 0.80 of rbac-only by req/s and by Envoy CPU per request; "
        "ext_authz's Envoy CPU excludes the Python service's own CPU"
    )


if __name__ == "__main__":
    main()
