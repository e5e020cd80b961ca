"""One Check, start to finish, without gRPC or telemetry, in OPA-Envoy's four steps, each its
own module and unit-tested alone:

1. request  (meshward.extauthz.request):  the CheckRequest protobuf read into plain values;
2. input    (meshward.extauthz.inputs):   which workload, who is calling (peer SPIFFE ID and
   end-user JWT), the facts the policy reads, or a refusal made before any rule;
3. decision (meshward.extauthz.decision): cached, or from meshward.policy.evaluate;
4. response (meshward.extauthz.response): the CheckResult and the CheckResponse carrying it.

The policy set lives in an immutable snapshot (meshward.extauthz.snapshot) swapped atomically
on update; a Check reads one snapshot from start to finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from meshward.extauthz import decision as decisions
from meshward.extauthz import inputs, request, response
from meshward.extauthz.cache import DEFAULT_MAX_BYTES, DEFAULT_TTL, DecisionCache
from meshward.extauthz.decision import (
    CachedDecision,
    Custom,
    Decider,
    Evaluate,
    decision_cache,
)
from meshward.extauthz.request import PORT_KEY, WORKLOAD_KEY
from meshward.extauthz.result import CheckResult, Rejection
from meshward.extauthz.snapshot import PreparedWorkload, Snapshot
from meshward.extauthz.tokens import JwtVerifier
from meshward.policy import evaluate as policy_evaluate

__all__ = [
    "PORT_KEY",
    "WORKLOAD_KEY",
    "Authorizer",
    "CachedDecision",
    "CheckResult",
    "decision_cache",
]


class Authorizer:
    """Thread-safe. ``check(request, trace_id)`` never raises for bad input: malformed requests,
    unknown workloads and bad tokens are denials with a reason (internal errors are the
    caller's to catch; see service.py)."""

    def __init__(
        self,
        policy_set: Any,
        *,
        verifier: JwtVerifier | None = None,
        cache: DecisionCache[CachedDecision] | None = None,
        custom: Custom | None = None,
        evaluate: Evaluate | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verifier = verifier if verifier is not None else JwtVerifier()
        self.cache: DecisionCache[CachedDecision] = (
            cache if cache is not None else decision_cache(DEFAULT_MAX_BYTES, DEFAULT_TTL)
        )
        self.custom = custom
        self.evaluations = 0  # policy evaluations (cache misses and uncacheable requests)
        self._count_lock = threading.Lock()
        self._decider = Decider(
            cache=self.cache,
            evaluate=evaluate or policy_evaluate,
            custom=custom,
            wall=wall_clock,
            clock=clock,
            on_evaluate=self._count,
        )
        self._snapshot = self._new_snapshot(policy_set)

    def _count(self) -> None:
        with self._count_lock:
            self.evaluations += 1

    def _new_snapshot(self, policy_set: Any) -> Snapshot:
        return Snapshot(
            policy_set, custom_hook=self.custom is not None, rules_id=self.verifier.rules_id
        )

    # -- policy ----------------------------------------------------------------------------------
    def update(self, policy_set: Any) -> None:
        """Swap in a new policy set. Old cache entries become unreachable (keys carry the
        version) and age out."""
        if policy_set.version != self._snapshot.version:
            self._snapshot = self._new_snapshot(policy_set)

    @property
    def policy_set(self) -> Any:
        return self._snapshot.policy_set

    @property
    def version(self) -> str:
        return self._snapshot.version

    @property
    def verbose_denials(self) -> bool:
        """The mesh's ``denialDetails: verbose``: denial bodies name policy, rule and reason."""
        return self._snapshot.verbose

    def plan(self, ref: str) -> PreparedWorkload | None:
        return self._snapshot.plan(ref)

    # -- the check -------------------------------------------------------------------------------
    def check(self, check_request: Any, trace_id: str = "") -> CheckResult:
        snapshot = self._snapshot  # one version for the whole check
        version, verbose = snapshot.version, snapshot.verbose
        http = request.read(check_request)
        if isinstance(http, Rejection):
            return response.rejected(http, version=version, verbose=verbose, trace_id=trace_id)
        inp = inputs.build(http, snapshot, self.verifier)
        if isinstance(inp, Rejection):
            return response.rejected(inp, version=version, verbose=verbose, trace_id=trace_id)
        outcome = decisions.decide(inp, snapshot, self._decider)
        return response.respond(
            inp,
            outcome,
            version=version,
            verbose=verbose,
            trace_id=trace_id,
            recharge=self.cache.recharge,
        )
