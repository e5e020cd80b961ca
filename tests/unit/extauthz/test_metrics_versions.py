"""ext_authz's policy_info keeps one series however many policy versions it serves in turn;
the hit ratio is left to PromQL."""

from __future__ import annotations

from prometheus_client import generate_latest

from meshward.extauthz.authorizer import Authorizer
from meshward.extauthz.metrics import Metrics, version_number
from meshward.policy import parse
from meshward.testing.extauthz import HTTPBIN_YAML

WORKLOAD = HTTPBIN_YAML


def policy(i: int) -> object:
    return parse(
        {"w.yaml": WORKLOAD + f"---\n# revision {i}\n" + WORKLOAD.replace("httpbin", f"w{i}")}
    )


def test_many_policy_versions_leave_one_policy_info_series() -> None:
    authorizer = Authorizer(policy(0))
    metrics = Metrics()
    metrics.attach(authorizer)
    versions = set()
    for i in range(200):
        authorizer.update(policy(i))
        versions.add(authorizer.version[:12])
        text = generate_latest(metrics.registry).decode()  # a scrape syncs first
    assert len(versions) == 200
    info = [x for x in text.splitlines() if x.startswith("meshward_extauthz_policy_info{")]
    assert info == [f'meshward_extauthz_policy_info{{version="{authorizer.version[:12]}"}} 1.0']
    assert "cache_hit_ratio" not in text and "policy_version" not in text
    assert "meshward_extauthz_policy_id" not in text  # the multiprocess carrier stays internal


def test_the_numeric_policy_id_round_trips_a_version() -> None:
    version = "0f3a9c00b1e2d4"
    assert f"{version_number(version):012x}" == version[:12]
    assert version_number("not hex") == 0
