"""The decision cache under a flood of distinct 15 KB paths (issue 13: 1,500 such requests
raised ext_authz RSS by 123 MiB): the accounted bytes stay under the budget, and the memory
Python really holds for the cache (tracemalloc) stays under budget + a small baseline."""

from __future__ import annotations

import gc
import random
import tracemalloc
from typing import Any

from meshward.extauthz.authorizer import Authorizer, decision_cache
from meshward.extauthz.client import build_check_request

WORKLOAD = "foo/httpbin"
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: paths, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: ["/allowed/*"]}}]
"""
BUDGET = 512 * 1024
REQUESTS = 400  # ~6 MB of distinct paths: 12x the budget


def _path(rng: random.Random, prefix: str) -> str:
    return prefix + rng.randbytes(7_500).hex()


def test_a_flood_of_long_paths_stays_within_the_budget(policy_set_for: Any) -> None:
    authorizer = Authorizer(policy_set_for(POLICY), cache=decision_cache(BUDGET, 60.0))
    rng = random.Random(13)
    principal = "spiffe://cluster.local/ns/web/sa/frontend"

    def check(prefix: str) -> Any:
        return authorizer.check(
            build_check_request(
                path=_path(rng, prefix), workload=WORKLOAD, source_principal=principal
            ),
            "0" * 31 + "1",
        )

    for _ in range(20):  # warm: plans, normalizer, protobuf modules
        check("/allowed/")
        check("/denied/")
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    peak_accounted = 0
    for i in range(REQUESTS):
        result = check("/allowed/" if i % 2 else "/denied/")
        assert result.allowed == bool(i % 2)
        peak_accounted = max(peak_accounted, authorizer.cache.size_bytes)
    del result
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    stats = authorizer.cache.stats
    assert stats.misses >= REQUESTS and stats.evictions > REQUESTS // 3
    assert peak_accounted <= BUDGET
    # What Python holds for the cache (and the normalizer's memo, itself bounded) is at most the
    # budget plus 512 KiB: the accounting over-estimates, it never under-estimates by much.
    assert held <= BUDGET + 512 * 1024, (held, peak_accounted)
